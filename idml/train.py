"""Training (docs/method.md, section 4): data -> model -> loss -> step -> evaluation.

Each epoch: shuffled (or --IPC balanced) batches; per step a mixup of the batch, the clean
and the mixed batch forwarded, the three-term introspective Proxy Anchor loss, gradient
clipping by value, an optimizer step (skipped, on the device, when the loss or the gradient is
not finite or the loss jumps past --max-loss-jump). After every epoch: StepLR, evaluation on the unseen
classes, metrics.jsonl, checkpoint_last.pt, and the best checkpoint by R@1.

build_parts makes what a run trains with from its TrainConfig and writes nothing; Trainer runs
the loop on those parts; its Recorder (idml/recorder.py) owns the run folder and its files.

Under torchrun every rank runs this same loop on its slice of each global batch; the loss
is that of the global batch (idml/distributed.py says how). Only rank 0 prints, shows
progress and writes files; evaluation is sharded over the ranks.
"""

import contextlib
import os
import signal
import sys
import threading
import types
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from torch.utils.data import Subset
from tqdm import tqdm

from idml import distributed
from idml.checkpoint import load_checkpoint, non_finite_weights, require, restore_rng_state, rng_state
from idml.config import OptimConfig, TrainConfig
from idml.data import build_dataset, default_image_size
from idml.data.datasets import BadImageBudget
from idml.data.samplers import BalancedBatchSampler, RandomBatchSampler
from idml.errors import Interrupted, TrainingDiverged, UsageError
from idml.evaluate import embed, format_metrics, kmeans_runs, recall_ks
from idml.losses import build_criterion
from idml.metrics import compute_metrics, non_finite_rows
from idml.models import IDMLNet
from idml.precision import autocast, configure_cudnn, describe, place_model, resolve_amp
from idml.recorder import Recorder
from idml.runtime import build_model, eval_loader, resolve_device, seed_everything, train_loader

GRADIENT_CLIP = 10.0
PROXY_LR_FACTOR = 100.0
PROGRESS_EVERY = 10  # steps between progress updates (each one synchronises with the device)
MAX_SKIPPED_IN_A_ROW = 10  # steps skipped for a non-finite loss in a row that stop the run as diverged
LOSS_MEAN_DECAY = 0.9  # of the running mean of finite losses that --max-loss-jump compares with
SCHEDULE_FLAGS = ("lr", "weight_decay", "lr_decay_step", "lr_decay_gamma")  # a resumed run applies them


@contextlib.contextmanager
def stop_requests():
    """While inside, SIGTERM and SIGINT only set `.signal`: the loop finishes its step,
    saves, and stops (torchrun forwards these signals to every rank)."""
    request = types.SimpleNamespace(signal=None)
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be installed from the main thread
        return

    def handler(signal_number, frame):
        request.signal = signal_number

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def group_learning_rates(optim: OptimConfig) -> list[float]:
    """The initial lr of each parameter group of build_optimizer."""
    return [optim.lr, optim.lr, optim.lr * PROXY_LR_FACTOR]


def build_optimizer(optim: OptimConfig, model, criterion) -> torch.optim.Optimizer:
    """Backbone and heads at lr, proxies at 100 x lr (as published)."""
    head_parameters = list(model.semantic.parameters()) + list(model.uncertainty_head.parameters())
    parts = [list(model.backbone.parameters()), head_parameters, list(criterion.parameters())]
    groups = [{"params": params, "lr": lr} for params, lr in zip(parts, group_learning_rates(optim))]
    # Adam(W) fused: one kernel per parameter group instead of a chain of foreach operators,
    # the same update to rounding and several times faster on the CPU.
    # Not SGD: its fused kernel fills the momentum buffers on a step GradScaler skips (torch 2.14).
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay, fused=True)
    if optim.optimizer == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, weight_decay=optim.weight_decay, fused=True)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, weight_decay=optim.weight_decay, momentum=0.9, nesterov=True)
    return torch.optim.RMSprop(groups, lr=optim.lr, alpha=0.9, weight_decay=optim.weight_decay, momentum=0.9)


def apply_schedule(optimizer: torch.optim.Optimizer, scheduler, optim: OptimConfig, epochs_done: int) -> None:
    """Sets the groups' lr and weight decay and the StepLR of --lr, --weight-decay,
    --lr-decay-step and --lr-decay-gamma as they stand after `epochs_done` epochs."""
    bases = group_learning_rates(optim)
    factor = optim.lr_decay_gamma ** (epochs_done // optim.lr_decay_step)
    for group, base in zip(optimizer.param_groups, bases):
        group.update(initial_lr=base, lr=base * factor, weight_decay=optim.weight_decay)
    scheduler.step_size, scheduler.gamma, scheduler.base_lrs = optim.lr_decay_step, optim.lr_decay_gamma, bases
    scheduler.last_epoch = epochs_done
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


class StepGuard:
    """Decides on the device, without a host synchronisation, which steps update the weights:
    not one whose loss or gradient norm is NaN or infinite, nor (with --max-loss-jump F) one
    whose loss exceeds F times the running mean of recent finite losses. Counts on the device
    what it skipped; the loop reads the counts where it synchronises anyway.

    With fp16, a gradient that overflows with a finite loss is GradScaler's business (it
    lowers its scale): skipped, but not counted towards stopping the run."""

    COUNTERS = ("in_a_row", "most_in_a_row", "skipped", "epoch_skipped", "finite_losses")

    def __init__(self, device: torch.device, max_loss_jump: float | None, overflow_is_normal: bool):
        self.max_loss_jump, self.overflow_is_normal = max_loss_jump, overflow_is_normal
        self.loss_mean = torch.zeros((), device=device)
        for name in self.COUNTERS:
            setattr(self, name, torch.zeros((), dtype=torch.long, device=device))

    def check(self, loss: torch.Tensor, gradients: list[torch.Tensor]) -> torch.Tensor:
        """True (a 0-d bool tensor) when this step's update must be skipped; updates the counts."""
        loss = loss.detach().float()
        finite_loss = torch.isfinite(loss)
        bad_loss = ~finite_loss
        if self.max_loss_jump:
            warm = self.finite_losses >= PROGRESS_EVERY  # a mean of a few losses is no baseline yet
            bad_loss = bad_loss | (warm & (loss > self.max_loss_jump * self.loss_mean))
        bad_gradient = ~torch.isfinite(torch.nn.utils.get_total_norm(gradients)) if gradients else bad_loss
        skip = bad_loss | bad_gradient
        counted = bad_loss if self.overflow_is_normal else skip
        mean = torch.where(
            self.finite_losses == 0, loss, LOSS_MEAN_DECAY * self.loss_mean + (1.0 - LOSS_MEAN_DECAY) * loss
        )
        self.loss_mean = torch.where(finite_loss, mean, self.loss_mean)
        self.finite_losses = self.finite_losses + finite_loss
        self.in_a_row = torch.where(counted, self.in_a_row + 1, 0)
        self.most_in_a_row = torch.maximum(self.most_in_a_row, self.in_a_row)
        self.skipped = self.skipped + skip
        self.epoch_skipped = self.epoch_skipped + skip
        return skip

    def counts(self) -> dict:
        """The counters on the host (one synchronisation)."""
        values = torch.stack([getattr(self, name) for name in self.COUNTERS]).tolist()
        return dict(zip(self.COUNTERS, values))

    def state_dict(self) -> dict:
        return {name: getattr(self, name).cpu() for name in ("loss_mean",) + self.COUNTERS}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value.to(getattr(self, name).device))


def guarded_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step(), or no change to the weights nor the optimizer's state where `skip`
    is true, decided on the device. Fused Adam(W) takes the flag as GradScaler's found_inf
    (its kernel then leaves parameters, moments and step counts unchanged); the others step
    and are put back with torch.where (state they create on a skipped step keeps its
    initial zeros)."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
        return
    before = {id(t): t.clone() for t in _stepped_tensors(optimizer, skip.device)}
    optimizer.step()
    with torch.no_grad():
        for t in _stepped_tensors(optimizer, skip.device):
            previous = before.get(id(t))
            t.copy_(torch.where(skip, torch.zeros_like(t) if previous is None else previous, t))


def _stepped_tensors(optimizer: torch.optim.Optimizer, device: torch.device):
    """The parameters a step changes and their state tensors on `device` (a step counter
    kept on the host is left alone: RMSprop and SGD do not use it in the update)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            yield p
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.device == device and value.is_floating_point():
                    yield value


def mixup_draw(batch_size: int, generator: torch.Generator):
    """lambda ~ Beta(1, 1), which is Uniform(0, 1), and a permutation of the batch."""
    lam = float(torch.rand((), generator=generator))
    return lam, torch.randperm(batch_size, generator=generator)


def refill_share(images: torch.Tensor | None, labels: torch.Tensor | None, dropped: int):
    """Under torchrun every process brings a full share of each batch (the gathers need equal
    sizes): the places of `dropped` unreadable images are taken by repeats of the share's
    readable ones, which then weigh twice in that step's loss."""
    if images is None:
        raise UsageError(
            f"all {dropped} images of this process's share of a batch were unreadable, and under "
            f"torchrun every process needs a share: repair or remove them (paths in the warnings above)"
        )
    repeats = torch.arange(dropped) % images.shape[0]
    return torch.cat([images, images[repeats]]), torch.cat([labels, labels[repeats]])


class CleanAndMixed(nn.Module):
    """(images, mixed) -> mu, sigma, mu_mixed, sigma_mixed in one forward call (what DDP wraps)."""

    def __init__(self, model: IDMLNet):
        super().__init__()
        self.model = model

    def forward(self, images, mixed):
        if self.model.bn_freeze:  # eval-mode BatchNorm is per-sample: one forward of both halves is exact
            mu, sigma = self.model(torch.cat([images, mixed]))
            (mu, mu_mixed), (sigma, sigma_mixed) = mu.chunk(2), sigma.chunk(2)
            return mu, sigma, mu_mixed, sigma_mixed
        (mu, sigma), (mu_mixed, sigma_mixed) = self.model(images), self.model(mixed)
        return mu, sigma, mu_mixed, sigma_mixed


def idml_loss(model, criterion, images, labels, lam: float, permutation, amp: str):
    """L(clean, y) + lam L(mixed, y) + (1 - lam) L(mixed, y[pi]) of the global batch.

    `model`: an IDMLNet, or CleanAndMixed (DDP-wrapped when distributed); `amp`: a resolved
    --amp (idml.precision). Distributed, `images` and `labels` are this rank's slice and
    `permutation` permutes the global batch: the images are gathered to mix, mu and sigma
    gathered (with gradient) for the loss."""
    forward = CleanAndMixed(model) if isinstance(model, IDMLNet) else model
    all_images, all_labels = distributed.gather(images), distributed.gather(labels)
    mine = permutation[distributed.my_slice(len(permutation))]
    mixed = lam * images + (1.0 - lam) * all_images[mine]
    with autocast(images.device, amp):
        outputs = forward(images, mixed)
    mu, sigma, mu_mixed, sigma_mixed = (distributed.gather_with_grad(t) for t in outputs)
    return (
        criterion(mu, sigma, all_labels)
        + lam * criterion(mu_mixed, sigma_mixed, all_labels)
        + (1.0 - lam) * criterion(mu_mixed, sigma_mixed, all_labels[permutation])
    )


@dataclass
class RunState:
    """What a run has done so far; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the epoch after those
    epoch_loss_sum: float = 0.0  # sum of those steps' losses
    best: dict | None = None  # {"epoch": e, "metrics": {...}}
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    wandb_run_id: str | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "RunState":
        """The state a checkpoint holds, one key per field (as `**asdict(state)` wrote it)."""
        return cls(**{name.name: checkpoint[name.name] for name in fields(cls)})


RUN_STATE_KEYS = tuple(name.name for name in fields(RunState))  # a checkpoint holds each one


def per_rank_batch_norm(config: TrainConfig, device: torch.device) -> bool:
    """BatchNorm statistics that differ between ranks: trained (--bn-freeze 0) on several
    CPU processes, where SyncBatchNorm is not available."""
    return not config.model.bn_freeze and distributed.is_distributed() and device.type != "cuda"


def sync_batch_norm(model: IDMLNet, config: TrainConfig, device: torch.device) -> IDMLNet:
    """Training BatchNorm (--bn-freeze 0) on several ranks: statistics of the global batch."""
    if model.bn_freeze or not distributed.is_distributed():
        return model
    if not per_rank_batch_norm(config, device):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    print_main(
        "note: --bn-freeze 0 on several CPU processes: BatchNorm statistics are per process "
        "(SyncBatchNorm needs GPUs), so steps differ slightly from a single process"
    )
    return model


@dataclass
class TrainingParts:
    """What a run trains and evaluates with, as build_parts makes it from the configuration."""

    device: torch.device
    amp: str  # a resolved --amp (idml.precision)
    train_set: object
    num_classes: int
    sampler: BalancedBatchSampler | RandomBatchSampler
    train_loader: object
    test_loader: object
    model: IDMLNet
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    scaler: torch.amp.GradScaler
    guard: StepGuard
    mixup_generator: torch.Generator
    bad_images: BadImageBudget


def build_parts(config: TrainConfig, device: torch.device) -> TrainingParts:
    """The data, model, loss, optimiser and schedule of `config` on `device`, freshly
    initialised from --seed; reads the data set, writes nothing."""
    data = config.data
    image_size = data.image_size or default_image_size(data.dataset)
    seed_everything(config.run.seed)
    train_set = build_dataset(data.dataset, data.data_root, train=True, image_size=image_size)
    test_set = build_dataset(data.dataset, data.data_root, train=False, image_size=image_size)
    num_classes = max(train_set.labels) + 1
    shard = dict(rank=distributed.rank(), world_size=distributed.world_size())  # of every global batch
    if data.IPC:
        sampler = BalancedBatchSampler(train_set.labels, data.batch_size, data.IPC, config.run.seed, **shard)
    else:
        sampler = RandomBatchSampler(train_set.labels, data.batch_size, config.run.seed, **shard)
    training_batches = train_loader(data.loader, train_set, sampler, config.run.seed, data.workers, device, image_size)
    if distributed.world_size() > 1:  # each rank embeds its contiguous share, gathered in order
        test_set = Subset(test_set, range(*distributed.shard(len(test_set), granule=data.batch_size)))
    test_batches = eval_loader(test_set, data.batch_size, data.workers, device, data.loader, image_size)

    amp = resolve_amp(config.run.amp, device)
    if device.type == "cpu" and amp in ("fp16", "bf16"):
        print_main(
            f"warning: --amp {amp} on a CPU is much slower than float32 (tens of times on a ResNet): "
            f"pass --amp off (or auto) unless you mean to test the mixed-precision path",
            file=sys.stderr,
        )
    configure_cudnn(device, amp)
    model = place_model(sync_batch_norm(build_model(config.model), config, device), device, amp)
    criterion = build_criterion(config.loss, config.model.embedding_size, num_classes, device)
    if config.model.compile:  # in place: the state_dict keys (checkpoints) stay those of the plain modules
        model.compile()
        criterion.compile()
    optimizer = build_optimizer(config.optim, model, criterion)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    return TrainingParts(
        device=device,
        amp=amp,
        train_set=train_set,
        num_classes=num_classes,
        sampler=sampler,
        train_loader=training_batches,
        test_loader=test_batches,
        model=model,
        criterion=criterion,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, config.optim.lr_decay_step, config.optim.lr_decay_gamma),
        scaler=scaler,
        guard=StepGuard(device, config.optim.max_loss_jump, overflow_is_normal=scaler.is_enabled()),
        mixup_generator=torch.Generator().manual_seed(config.run.seed),
        bad_images=BadImageBudget(data.max_bad_images),
    )


class Trainer:
    """The loop of a run: trains the parts build_parts makes of `config` (from a checkpoint
    with --resume), evaluates after every epoch, and hands what it computes to its Recorder."""

    def __init__(self, config: TrainConfig, device: torch.device | None = None):
        self.config = config
        self.parts = build_parts(config, device or resolve_device(config.run.device, config.run.gpu))
        self.state = RunState()
        self.reported_skips = 0  # skipped steps already reported in a warning
        self.stop_request = types.SimpleNamespace(signal=None)  # set by SIGTERM/SIGINT inside run()
        self.forward_pair, self._wrapped_for = None, None  # the (DDP-wrapped) model, built by train_epoch
        self.test_uncertainty = None  # |sigma|^2 of the test set at the last evaluation
        run_dir = None
        if config.run.resume:
            self._resume(config.run.resume)
            run_dir = os.path.dirname(os.path.abspath(config.run.resume))
        self.recorder = Recorder(config, run_dir, self.state.wandb_run_id)
        if self.recorder.wandb is not None:
            self.state.wandb_run_id = self.recorder.wandb.id

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> RunState:
        try:
            state = self._run()
        except BaseException:
            self.recorder.release(failed=True)
            raise
        self.recorder.release(failed=False)
        return state

    def _run(self) -> RunState:
        config, parts = self.config, self.parts
        print_main(
            f"training IDML on {config.data.dataset} ({len(parts.train_set)} images, {parts.num_classes} classes) "
            f"on {parts.device} ({describe(parts.device, parts.amp)}{', compiled' if config.model.compile else ''}"
            f"{distributed.describe()}); run folder {self.recorder.run_dir}"
        )
        with stop_requests() as self.stop_request:
            if self.state.epoch == 0 and self.state.step == 0:
                self._record(0, None, self._evaluate("before training"))
            for epoch in range(self.state.epoch, config.optim.epochs):
                loss = self.train_epoch(epoch)
                parts.scheduler.step()
                metrics = self._evaluate(f"epoch {epoch + 1}/{config.optim.epochs}")
                self.state.epoch, self.state.step, self.state.epoch_loss_sum = epoch + 1, 0, 0.0
                self._record(epoch + 1, loss, metrics)
        if distributed.is_main():
            self._summary()
        self.recorder.finish(self.test_uncertainty, parts.model.uncertainty)
        return self.state

    def train_epoch(self, epoch: int) -> float:
        """Trains epoch `epoch` from step state.step on; returns its mean loss."""
        config, parts = self.config, self.parts
        parts.model.train()
        parts.model.set_warmup(epoch < config.optim.warm)
        trainable = tuple(p.requires_grad for p in parts.model.parameters())
        if trainable != self._wrapped_for:  # DDP registers the trainable parameters when built
            self.forward_pair = distributed.wrap(
                CleanAndMixed(parts.model),
                parts.device,
                find_unused_parameters=config.loss.loss != "Proxy_Anchor",
                buffers_differ=per_rank_batch_norm(config, parts.device),
            )
            self._wrapped_for = trainable
        steps = min(parts.sampler.num_batches, config.optim.max_steps or parts.sampler.num_batches)
        parts.sampler.set_epoch(epoch, start_step=self.state.step)
        loss_sum = torch.tensor(self.state.epoch_loss_sum, device=parts.device)
        if self.state.step == 0:
            parts.guard.epoch_skipped.zero_()
        progress = tqdm(
            total=steps,
            initial=self.state.step,
            desc=f"epoch {epoch + 1}/{config.optim.epochs}",
            leave=False,
            disable=not distributed.is_main(),
        )
        for step, (images, labels, dropped) in enumerate(parts.train_loader, start=self.state.step):
            if step >= steps:
                break
            parts.bad_images.add(dropped)
            if dropped and distributed.world_size() > 1:
                images, labels = refill_share(images, labels, len(dropped))
            if images is None:
                continue
            images = images.to(parts.device, non_blocking=True)
            loss, skipped = self.train_step(images, labels.to(parts.device, non_blocking=True))
            loss = loss.detach()
            loss_sum += torch.where(skipped, torch.zeros_like(loss), loss)
            progress.update()
            done = step + 1
            save_now = bool(config.run.checkpoint_every) and done % config.run.checkpoint_every == 0
            sync_now = done % PROGRESS_EVERY == 0 or save_now or done == steps
            # Under torchrun every rank must stop at the same step: the ranks compare their stop
            # requests only at steps that synchronise anyway, so no other step waits for them.
            stop = 0
            if sync_now or distributed.world_size() == 1:
                stop = distributed.any_rank(self.stop_request.signal or 0, parts.device)
            if sync_now or stop:
                self._check_skipped_steps(epoch, done)
                progress.set_postfix(loss=f"{float(loss):.4f}")
            if save_now or stop:
                self._check_weights(f"epoch {epoch + 1}, step {done}", probe=images)
                self.state.step, self.state.epoch_loss_sum = done, float(loss_sum)
                self.recorder.save_last(self._checkpoint)
            if stop:
                progress.close()
                raise Interrupted(stop, self.recorder.last_checkpoint, epoch, done)
        progress.close()
        return float(loss_sum) / max(steps - parts.guard.counts()["epoch_skipped"], 1)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor):
        """One optimisation step on a batch; returns its loss and whether the update was
        skipped (StepGuard), both on the device (no host synchronisation)."""
        parts = self.parts
        lam, permutation = mixup_draw(images.shape[0] * distributed.world_size(), parts.mixup_generator)
        if parts.device.type == "cuda":  # a copy from pageable memory would wait for the GPU to finish
            permutation = permutation.pin_memory()
        loss = idml_loss(
            self.forward_pair,
            parts.criterion,
            images,
            labels,
            lam,
            permutation.to(parts.device, non_blocking=True),
            parts.amp,
        )
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        distributed.average_gradients(parts.criterion.parameters())  # DDP averages the model's
        parts.scaler.unscale_(parts.optimizer)
        parameters = list(parts.model.parameters()) + list(parts.criterion.parameters())
        # before clipping, which would turn an infinite gradient into a finite one
        skip = parts.guard.check(loss, [p.grad for p in parameters if p.grad is not None])
        torch.nn.utils.clip_grad_value_(parameters, GRADIENT_CLIP)
        guarded_step(parts.optimizer, skip)  # (GradScaler's own skip is part of `skip`: inf gradients)
        parts.scaler.update()
        return loss, skip

    def _check_skipped_steps(self, epoch: int, done: int) -> None:
        """Where the loop synchronises: a warning for steps skipped since the last one, and
        the stop of a run whose loss keeps failing."""
        counts = self.parts.guard.counts()
        if counts["skipped"] > self.reported_skips:
            print_main(
                f"warning: {counts['skipped'] - self.reported_skips} step(s) up to epoch {epoch + 1}, step "
                f"{done} did not update the weights: their loss or gradient was NaN or infinite"
                f"{' (or the loss jumped past --max-loss-jump)' if self.config.optim.max_loss_jump else ''}",
                file=sys.stderr,
                flush=True,
            )
            self.reported_skips = counts["skipped"]
        if counts["most_in_a_row"] >= MAX_SKIPPED_IN_A_ROW:
            raise self._diverged(
                f"the loss was NaN or infinite{' or jumped' if self.config.optim.max_loss_jump else ''} "
                f"in {counts['most_in_a_row']} steps in a row (up to epoch {epoch + 1}, step {done})"
            )

    def _check_weights(self, when: str, probe: torch.Tensor | None = None) -> None:
        """Before a checkpoint is written: the weights are finite and (`probe`, a batch of
        images) give finite embeddings in evaluation mode; else the run stops as diverged."""
        parts = self.parts
        bad = bool(non_finite_weights({"model": parts.model.state_dict(), "criterion": parts.criterion.state_dict()}))
        if not bad and probe is not None:
            was_training = parts.model.training
            parts.model.eval()
            with torch.no_grad(), autocast(parts.device, parts.amp):
                mu, _ = parts.model(probe)
            parts.model.train(was_training)
            bad = not bool(torch.isfinite(mu).all())
        if distributed.any_rank(int(bad), parts.device):
            raise self._diverged(f"the weights at {when} are not finite or give NaN or infinite embeddings")

    def _diverged(self, what: str) -> TrainingDiverged:
        """`what` went wrong; the error names checkpoint_last.pt only after checking that its
        weights give finite embeddings of the test set (every rank takes part)."""
        parts = self.parts
        last = self.recorder.last_checkpoint
        advice = "with a lower --lr (or --amp off, or --max-loss-jump)"
        if not os.path.isfile(last):
            return TrainingDiverged(f"{what}; no checkpoint was written yet: start again {advice}")
        checkpoint = load_checkpoint(last, required=("model", "epoch", "step"))
        parts.model.load_state_dict(checkpoint["model"])  # this run ends: its own weights are of no more use
        embeddings = distributed.gather_eval(
            embed(
                parts.model,
                parts.test_loader,
                parts.device,
                parts.amp,
                progress=False,
                bad_images=parts.bad_images,
            )[0]
        )
        if non_finite_rows(embeddings):
            return TrainingDiverged(f"{what}; {last} gives NaN or infinite embeddings too: start again {advice}")
        return TrainingDiverged(
            f"{what}; {last} is good (its test embeddings are finite; it resumes at epoch "
            f"{checkpoint['epoch'] + 1}, step {checkpoint['step']}): resume from it {advice}"
        )

    def _evaluate(self, when: str) -> dict:
        config, parts = self.config, self.parts
        if per_rank_batch_norm(config, parts.device):
            distributed.share_buffers(parts.model)
        shares = embed(
            parts.model,
            parts.test_loader,
            parts.device,
            parts.amp,
            progress=distributed.is_main(),
            bad_images=parts.bad_images,
        )
        embeddings, labels, self.test_uncertainty = (distributed.gather_eval(t) for t in shares)
        # every rank holds them all, so every rank stops on these
        if embeddings.shape[0] < 2:
            raise UsageError(
                f"{embeddings.shape[0]} test images could be read ({when}; see the warnings above): "
                f"retrieval needs at least 2"
            )
        bad = non_finite_rows(embeddings)
        if bad:
            raise self._diverged(
                f"the embeddings of {bad} of {embeddings.shape[0]} test images became NaN or infinite ({when})"
            )
        metrics = None
        if distributed.is_main():
            metrics = compute_metrics(
                embeddings,
                labels,
                ks=recall_ks(config.data.dataset),
                clustering=bool(config.run.eval_clustering),
                progress=True,
                kmeans_runs=kmeans_runs(config.data.dataset, config.run.kmeans_runs),
            )
            print(f"[{when}] unseen classes: {format_metrics(metrics)}", flush=True)
        return distributed.broadcast_object(metrics)

    # --- outputs ------------------------------------------------------------------------

    def _record(self, epoch: int, loss: float | None, metrics: dict) -> None:
        self.state.history.append({"epoch": epoch, "loss": loss, **metrics})
        is_best = epoch > 0 and (self.state.best is None or metrics["R@1"] > self.state.best["metrics"]["R@1"])
        if is_best:
            self.state.best = {"epoch": epoch, "metrics": metrics}
        if epoch > 0:  # before any checkpoint of it is written (every rank: it may stop them all)
            self._check_weights(f"epoch {epoch}")
        self.recorder.record(self.state.history, self._weights(epoch, metrics) if is_best else None)
        if epoch > 0:
            self.recorder.save_last(self._checkpoint)

    def _weights(self, epoch: int, metrics: dict) -> dict:
        """The best epoch's file: what evaluation, export and search read, without the optimiser
        state that only resuming needs (it would double the file)."""
        return {
            "args": self.config.flat(),
            "model": self.parts.model.state_dict(),
            "criterion": self.parts.criterion.state_dict(),
            "epoch": epoch,
            "metrics": metrics,
        }

    def _checkpoint(self) -> dict:
        parts = self.parts
        return {
            "args": self.config.flat(),
            "model": parts.model.state_dict(),
            "criterion": parts.criterion.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict(),
            **asdict(self.state),
            "rng": rng_state(parts.mixup_generator),
            "step_guard": parts.guard.state_dict(),
        }

    def _resume(self, path: str) -> None:
        parts = self.parts
        checkpoint = load_checkpoint(path, required=("args",))  # the others once the args fit (a clearer message)
        saved, asked = checkpoint["args"], self.config.flat()
        for name in (
            "model",
            "embedding_size",
            "dataset",
            "uncertainty",
            "l2_norm",
            "loss",
            "batch_size",
            "IPC",
            "seed",
        ):  # the last three: the sampler's order, so that the run continues exactly
            if name not in saved:
                raise UsageError(
                    f"--resume {path}: its args lack --{name.replace('_', '-')}, which scripts/train.py "
                    f"always records: the file is incomplete or was written by another program"
                )
            if saved[name] != asked[name]:
                raise UsageError(
                    f"--resume {path} was trained with --{name.replace('_', '-')} {saved[name]}, "
                    f"this run asks for {asked[name]}"
                )
        if "optimizer" not in checkpoint:
            raise UsageError(
                f"--resume {path} holds only the best epoch's weights; resume from "
                f"checkpoint_last.pt in the same folder"
            )
        if checkpoint["epoch"] >= self.config.optim.epochs:
            raise UsageError(
                f"--resume {path}: that run has trained all {checkpoint['epoch']} of its epochs; "
                f"pass a larger --epochs to train it further"
            )
        require(checkpoint, path, ("model", "criterion", "scheduler", "scaler", "rng") + RUN_STATE_KEYS)
        parts.model.load_state_dict(checkpoint["model"])
        parts.criterion.load_state_dict(checkpoint["criterion"])
        self._restore_schedule(checkpoint, saved)
        parts.scaler.load_state_dict(checkpoint["scaler"])
        if "step_guard" in checkpoint:  # (absent from checkpoints older than the guard)
            parts.guard.load_state_dict(checkpoint["step_guard"])
            self.reported_skips = int(parts.guard.skipped)
        restore_rng_state(checkpoint["rng"], parts.mixup_generator)
        self.state = RunState.from_checkpoint(checkpoint)
        print_main(f"resumed from {path} at epoch {self.state.epoch + 1}, step {self.state.step}")

    def _restore_schedule(self, checkpoint: dict, saved: dict) -> None:
        """The optimizer's and StepLR's state of the checkpoint, with the schedule of this
        run's flags where they differ (one line each): so the checkpoint's args always say
        what the run uses. Another --optimizer starts from a fresh state."""
        parts = self.parts
        asked = self.config.flat()
        optimizer = asked["optimizer"]
        same_optimizer = saved.get("optimizer", optimizer) == optimizer
        if same_optimizer:
            parts.optimizer.load_state_dict(checkpoint["optimizer"])
        else:
            print_main(
                f"--optimizer {saved['optimizer']} -> {optimizer}: the {optimizer} state starts "
                f"afresh (the {saved['optimizer']} state of the checkpoint does not apply)"
            )
        parts.scheduler.load_state_dict(checkpoint["scheduler"])  # the epoch count
        changed = [name for name in SCHEDULE_FLAGS if saved.get(name) != asked[name]]
        for name in changed:
            print_main(f"--{name.replace('_', '-')} {saved.get(name)} -> {asked[name]}")
        if changed or not same_optimizer:  # else exactly the saved state, so that the run continues bit for bit
            apply_schedule(parts.optimizer, parts.scheduler, self.config.optim, parts.scheduler.last_epoch)

    def _summary(self) -> None:
        first, last = self.state.history[0], self.state.history[-1]
        print("unseen-class metrics before training -> after training:")
        for name in first:
            if name not in ("epoch", "loss"):
                print(f"  {name:6s} {first[name] * 100:6.2f} -> {last[name] * 100:6.2f}")
        if self.state.best is not None:
            print(
                f"best R@1 {self.state.best['metrics']['R@1'] * 100:.2f} at epoch {self.state.best['epoch']}; "
                f"outputs in {self.recorder.run_dir}"
            )


def print_main(*values, **options) -> None:
    if distributed.is_main():
        print(*values, **options)


def train(config: TrainConfig) -> RunState:
    device = resolve_device(config.run.device, config.run.gpu)
    with distributed.session(device):
        return Trainer(config, device).run()
