"""The typed configuration (idml/config.py): the command line's flags and defaults, and the flat
dict a checkpoint's "args" holds, read back by one function."""

import re
from dataclasses import replace

import pytest

from idml.cli import evaluate_parser, train_config, train_parser
from idml.config import DataConfig, EvaluateConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from idml.errors import UsageError


def test_defaults_are_the_command_lines():
    assert TrainConfig() == train_config([])


def test_every_flag_has_one_field_and_every_field_a_flag():
    assert TrainConfig().flat() == vars(train_parser().parse_args([]))
    flags = vars(evaluate_parser().parse_args(["--resume", "x"]))
    config = EvaluateConfig.from_args(evaluate_parser().parse_args(["--resume", "x"]))
    assert set(flags) - {"json"} | {"progress"} == set(vars(config))


def test_flags_land_in_their_sections():
    config = train_config(["--dataset", "cub", "--embedding-size", "64", "--mrg", "0.2", "--lr", "1e-3", "--seed", "3"])
    assert config == TrainConfig(
        data=DataConfig(dataset="cub"),
        model=ModelConfig(embedding_size=64),
        loss=LossConfig(mrg=0.2),
        optim=OptimConfig(lr=1e-3),
        run=RunConfig(seed=3),
    )


def test_the_flat_dict_reads_back_into_the_same_config():
    config = train_config(["--model", "resnet18", "--max-loss-jump", "3", "--IPC", "4", "--remark", "_x"])
    assert TrainConfig.from_dict(config.flat()) == config
    assert all(isinstance(value, (str, int, float, type(None))) for value in config.flat().values())


def test_args_of_an_older_checkpoint_take_the_defaults_of_flags_it_predates():
    older = {key: value for key, value in TrainConfig().flat().items() if key not in ("max_loss_jump", "compile")}
    assert TrainConfig.from_dict({**older, "model": "resnet18", "gone": 1}) == replace(
        TrainConfig(), model=ModelConfig(model="resnet18")
    )


def test_evaluate_json_turns_progress_off():
    parsed = evaluate_parser().parse_args(["--resume", "x", "--json", "--plots", "d"])
    assert EvaluateConfig.from_args(parsed) == EvaluateConfig(resume="x", plots="d", progress=False)


def test_the_run_state_reads_back_from_the_checkpoint_keys_it_writes():
    from dataclasses import asdict

    from idml.train import RunState

    state = RunState(epoch=2, step=3, epoch_loss_sum=1.5, best={"epoch": 1, "metrics": {"R@1": 0.5}}, wandb_run_id="x")
    state.history.append({"epoch": 0, "loss": None, "R@1": 0.25})
    assert RunState.from_checkpoint({**asdict(state), "model": {}, "rng": {}}) == state


@pytest.mark.parametrize(
    "sections, message",
    [
        (dict(model=ModelConfig(model="resnet9")), "model must be one of resnet18, resnet34, resnet50, resnet101, got"),
        (dict(data=DataConfig(dataset="sop")), "dataset must be one of digits, cub, cars, SOP, custom, got 'sop'"),
        (dict(optim=OptimConfig(lr=float("nan"))), "lr must be a positive number, got nan"),
        (dict(data=DataConfig(batch_size=0)), "batch_size must be a positive number, got 0"),
    ],
)
def test_a_config_built_in_python_refuses_what_the_command_line_would(sections, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        TrainConfig(**sections)
