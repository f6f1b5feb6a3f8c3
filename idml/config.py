"""The configuration of a training run and of an evaluation, as typed dataclasses.

The command line (idml/cli.py) parses flags and turns them into these objects in one place
(`TrainConfig.from_args`, `EvaluateConfig.from_args`); the library takes them, so that a run
can be set up from Python without a command line:

    Trainer(TrainConfig(data=DataConfig(dataset="digits"), optim=OptimConfig(epochs=1)))

Every field is named as its flag's argparse destination (--embedding-size: embedding_size)
and defaults to the flag's default. A checkpoint's "args" is the flat dict of those names
(`TrainConfig.flat`), as it has always been, so that files written by earlier versions load;
`TrainConfig.from_dict` reads one back. Free of torch, like idml/cli.py.
"""

from dataclasses import asdict, dataclass, field, fields

from idml.choices import AMP_CHOICES, ARCHITECTURES, DATASETS, LOSSES, UNCERTAINTY_MODES
from idml.errors import UsageError


@dataclass
class DataConfig:
    dataset: str = "digits"
    data_root: str = "./data"
    image_size: int | None = None  # None: the dataset's (idml.data.default_image_size)
    batch_size: int = 150  # global, over every process
    IPC: int = 0  # images per class in balanced batches; 0: shuffled
    workers: int = 4
    loader: str = "pil"
    max_bad_images: int = 10


@dataclass
class ModelConfig:
    model: str = "resnet50"
    embedding_size: int = 512
    l2_norm: int = 1
    uncertainty: str = "normalized"
    bn_freeze: int = 1
    pretrained: str = "imagenet"
    compile: int = 0


@dataclass
class LossConfig:
    loss: str = "Proxy_Anchor"
    alpha: float = 32.0
    mrg: float = 0.1
    ism: int = 1
    ism_offset: float = 4.0
    ism_scale: float = 5.0


@dataclass
class OptimConfig:
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_decay_step: int = 10
    lr_decay_gamma: float = 0.5
    epochs: int = 60
    warm: int = 1
    max_steps: int | None = None
    max_loss_jump: float | None = None


@dataclass
class RunConfig:
    """Where and how the run executes and what it records."""

    device: str = "auto"
    gpu: int = 0
    amp: str = "auto"
    seed: int = 1
    LOG_DIR: str = "./logs"
    remark: str = ""
    resume: str | None = None
    wandb: str = "auto"
    checkpoint_every: int | None = None
    eval_clustering: int = 1
    kmeans_runs: int | None = None


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        """From Python, the command line's one-sentence refusals of names and sizes it would not
        accept (there argparse checks them first)."""
        for name, value, allowed in (
            ("dataset", self.data.dataset, DATASETS),
            ("model", self.model.model, ARCHITECTURES),
            ("uncertainty", self.model.uncertainty, UNCERTAINTY_MODES),
            ("loss", self.loss.loss, LOSSES),
            ("amp", self.run.amp, AMP_CHOICES),
        ):
            if value not in allowed:
                raise UsageError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for name, value in (
            ("batch_size", self.data.batch_size),
            ("embedding_size", self.model.embedding_size),
            ("epochs", self.optim.epochs),
            ("lr", self.optim.lr),
            ("lr_decay_step", self.optim.lr_decay_step),
        ):
            if not value > 0:  # NaN too
                raise UsageError(f"{name} must be a positive number, got {value}")

    def flat(self) -> dict:
        """{flag destination: value}: a checkpoint's "args" and wandb's config."""
        return {name: value for section in fields(self) for name, value in asdict(getattr(self, section.name)).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The configuration of a flat dict (a checkpoint's "args"): names it lacks take their
        default (checkpoints older than a flag), names it has that no field has are ignored."""
        return cls(
            **{
                section.name: section.type(
                    **{name.name: values[name.name] for name in fields(section.type) if name.name in values}
                )
                for section in fields(cls)
            }
        )

    @classmethod
    def from_args(cls, namespace) -> "TrainConfig":
        """The configuration of scripts/train.py's parsed flags (idml.cli.train_parser)."""
        return cls.from_dict(vars(namespace))


@dataclass
class EvaluateConfig:
    """scripts/evaluate.py: None takes the checkpoint's value."""

    resume: str
    dataset: str | None = None
    data_root: str | None = None
    image_size: int | None = None
    batch_size: int | None = None
    workers: int = 4
    loader: str = "pil"
    device: str = "auto"
    gpu: int = 0
    amp: str = "auto"
    kmeans_runs: int | None = None
    published_protocol: bool = False
    plots: str | None = None  # a folder for recall_at_k.png and query_grid.png
    progress: bool = True

    @classmethod
    def from_args(cls, namespace) -> "EvaluateConfig":
        """The configuration of scripts/evaluate.py's parsed flags (idml.cli.evaluate_parser);
        --json prints one object, so no progress bars."""
        values = {name: value for name, value in vars(namespace).items() if name != "json"}
        return cls(**values, progress=not namespace.json)
