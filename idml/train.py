"""Training (docs/method.md, section 4): data -> model -> loss -> step -> evaluation.

Each epoch: shuffled (or --IPC balanced) batches; per step a mixup of the batch, the clean
and the mixed batch forwarded, the three-term introspective Proxy Anchor loss, gradient
clipping by value, an optimizer step (skipped, on the device, when the loss or the gradient is
not finite or the loss jumps past --max-loss-jump). After every epoch: StepLR, evaluation on the unseen
classes, metrics.jsonl, checkpoint_last.pt, and the best checkpoint by R@1.

Under torchrun every rank runs this same loop on its slice of each global batch; the loss
is that of the global batch (idml/distributed.py says how). Only rank 0 prints, shows
progress and writes files; evaluation is sharded over the ranks.
"""

import contextlib
import itertools
import json
import os
import shutil
import signal
import sys
import threading
import types
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from torch.utils.data import Subset
from tqdm import tqdm

from idml import distributed, plots, tracking
from idml.checkpoint import load_checkpoint, non_finite_weights, require, restore_rng_state, rng_state, save_checkpoint
from idml.config import OptimConfig, TrainConfig
from idml.data import build_dataset, default_image_size
from idml.data.datasets import BadImageBudget
from idml.data.samplers import BalancedBatchSampler, RandomBatchSampler
from idml.errors import Interrupted, TrainingDiverged, UsageError
from idml.evaluate import embed, format_metrics, kmeans_runs, recall_ks
from idml.files import LOCK_NAME, FolderLock, atomic_write_text, remove_stale_temporaries
from idml.losses import build_criterion
from idml.metrics import compute_metrics, non_finite_rows
from idml.models import IDMLNet
from idml.precision import autocast, configure_cudnn, describe, place_model, resolve_amp
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


def claim_run_folder(config: TrainConfig) -> str:
    """Creates and returns the run folder: the published name, so logs line up with the
    published code's, or when another run has it, the first free one of <name>_2, <name>_3,
    ... (created with mkdir, which only one of two runs started together can win)."""
    model, loss, optim = config.model, config.loss, config.optim
    name = (
        f"{model.model}_{loss.loss}_embedding{model.embedding_size}_alpha{loss.alpha:g}_mrg{loss.mrg:g}"
        f"_{optim.optimizer}_lr{optim.lr:g}_batch{config.data.batch_size}{config.run.remark}"
    )
    path = os.path.join(config.run.LOG_DIR, f"logs_{config.data.dataset}", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for number in itertools.count(1):
        candidate = path if number == 1 else f"{path}_{number}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue


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


class Trainer:
    def __init__(self, config: TrainConfig, device: torch.device | None = None):
        self.config = config
        self.device = device or resolve_device(config.run.device, config.run.gpu)
        self.image_size = config.data.image_size or default_image_size(config.data.dataset)
        seed_everything(config.run.seed)
        self.train_set = build_dataset(
            config.data.dataset, config.data.data_root, train=True, image_size=self.image_size
        )
        test_set = build_dataset(config.data.dataset, config.data.data_root, train=False, image_size=self.image_size)
        self.num_classes = max(self.train_set.labels) + 1
        shard = dict(rank=distributed.rank(), world_size=distributed.world_size())  # of every global batch
        if config.data.IPC:
            self.sampler = BalancedBatchSampler(
                self.train_set.labels, config.data.batch_size, config.data.IPC, config.run.seed, **shard
            )
        else:
            self.sampler = RandomBatchSampler(self.train_set.labels, config.data.batch_size, config.run.seed, **shard)
        self.train_loader = train_loader(
            config.data.loader,
            self.train_set,
            self.sampler,
            config.run.seed,
            config.data.workers,
            self.device,
            self.image_size,
        )
        if distributed.world_size() > 1:  # each rank embeds its contiguous share, gathered in order
            test_set = Subset(test_set, range(*distributed.shard(len(test_set), granule=config.data.batch_size)))
        self.test_loader = eval_loader(
            test_set, config.data.batch_size, config.data.workers, self.device, config.data.loader, self.image_size
        )

        self.amp = resolve_amp(config.run.amp, self.device)
        if self.device.type == "cpu" and self.amp in ("fp16", "bf16"):
            print_main(
                f"warning: --amp {self.amp} on a CPU is much slower than float32 (tens of times on a ResNet): "
                f"pass --amp off (or auto) unless you mean to test the mixed-precision path",
                file=sys.stderr,
            )
        configure_cudnn(self.device, self.amp)
        self.model = place_model(self._sync_batch_norm(build_model(config.model)), self.device, self.amp)
        self.criterion = build_criterion(config.loss, config.model.embedding_size, self.num_classes, self.device)
        if config.model.compile:  # in place: the state_dict keys (checkpoints) stay those of the plain modules
            self.model.compile()
            self.criterion.compile()
        self.optimizer = build_optimizer(config.optim, self.model, self.criterion)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, config.optim.lr_decay_step, config.optim.lr_decay_gamma
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.guard = StepGuard(self.device, config.optim.max_loss_jump, overflow_is_normal=self.scaler.is_enabled())
        self.reported_skips = 0  # skipped steps already reported in a warning
        self.mixup_generator = torch.Generator().manual_seed(config.run.seed)
        self.stop_request = types.SimpleNamespace(signal=None)  # set by SIGTERM/SIGINT inside run()
        self.forward_pair, self._wrapped_for = None, None  # the (DDP-wrapped) model, built by train_epoch
        self.bad_images = BadImageBudget(config.data.max_bad_images)
        self.state = RunState()
        self.lock, self.created_run_dir = None, False
        try:
            if config.run.resume:
                self._resume(config.run.resume)  # sets run_dir: the checkpoint's folder
            else:  # rank 0 claims a folder, the others write into it
                self.run_dir = distributed.broadcast_object(claim_run_folder(config) if distributed.is_main() else None)
                self.created_run_dir = True
        except OSError as error:
            raise UsageError(
                f"cannot create a run folder under --LOG_DIR {config.run.LOG_DIR} ({error.strerror})"
            ) from None
        self.wandb = None
        try:
            self._lock_run_folder()
            if distributed.is_main():
                self.wandb = tracking.open_run(
                    config.run.wandb,
                    f"{config.data.dataset}_ProxyAnchor",
                    self.run_dir,
                    config.flat(),
                    self.state.wandb_run_id,
                )
        except BaseException:
            self._release(failed=True)
            raise
        if self.wandb is not None:
            self.state.wandb_run_id = self.wandb.id

    def _lock_run_folder(self) -> None:
        """Rank 0 holds the run folder's lock for the run's life: a second run resuming the
        same checkpoint stops (on every rank) instead of overwriting this one's files. With
        the lock held, temporary files there are those of killed writers: removed."""
        refused = None
        if distributed.is_main():
            try:
                self.lock = FolderLock(self.run_dir)
            except UsageError as error:
                refused = str(error)
        refused = distributed.broadcast_object(refused)
        if refused:
            raise UsageError(refused)
        if distributed.is_main():
            removed = remove_stale_temporaries(self.run_dir)
            if removed:
                print(f"removed {removed} temporary file(s) that an interrupted write left in {self.run_dir}")

    def _release(self, failed: bool) -> None:
        """Unlocks the run folder; after a failed start, removes the folder this run created
        if nothing was written into it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if (
            failed
            and self.created_run_dir
            and distributed.is_main()
            and os.path.isdir(self.run_dir)
            and set(os.listdir(self.run_dir)) <= {LOCK_NAME}
        ):
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _per_rank_batch_norm(self) -> bool:
        """BatchNorm statistics that differ between ranks: trained (--bn-freeze 0) on several
        CPU processes, where SyncBatchNorm is not available."""
        return not self.config.model.bn_freeze and distributed.is_distributed() and self.device.type != "cuda"

    def _sync_batch_norm(self, model: IDMLNet) -> IDMLNet:
        """Training BatchNorm (--bn-freeze 0) on several ranks: statistics of the global batch."""
        if model.bn_freeze or not distributed.is_distributed():
            return model
        if not self._per_rank_batch_norm():
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        print_main(
            "note: --bn-freeze 0 on several CPU processes: BatchNorm statistics are per process "
            "(SyncBatchNorm needs GPUs), so steps differ slightly from a single process"
        )
        return model

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> RunState:
        try:
            state = self._run()
        except BaseException:
            self._release(failed=True)
            raise
        self._release(failed=False)
        return state

    def _run(self) -> RunState:
        config = self.config
        print_main(
            f"training IDML on {config.data.dataset} ({len(self.train_set)} images, {self.num_classes} classes) "
            f"on {self.device} ({describe(self.device, self.amp)}{', compiled' if config.model.compile else ''}"
            f"{distributed.describe()}); run folder {self.run_dir}"
        )
        with stop_requests() as self.stop_request:
            if self.state.epoch == 0 and self.state.step == 0:
                self._record(0, None, self._evaluate("before training"))
            for epoch in range(self.state.epoch, config.optim.epochs):
                loss = self.train_epoch(epoch)
                self.scheduler.step()
                metrics = self._evaluate(f"epoch {epoch + 1}/{config.optim.epochs}")
                self.state.epoch, self.state.step, self.state.epoch_loss_sum = epoch + 1, 0, 0.0
                self._record(epoch + 1, loss, metrics)
        if distributed.is_main():
            plots.uncertainty_plot(self.run_dir, self.test_uncertainty, self.model.uncertainty)
            self._summary()
        if self.wandb is not None:
            self.wandb.finish()
        return self.state

    def train_epoch(self, epoch: int) -> float:
        """Trains epoch `epoch` from step state.step on; returns its mean loss."""
        config = self.config
        self.model.train()
        self.model.set_warmup(epoch < config.optim.warm)
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if trainable != self._wrapped_for:  # DDP registers the trainable parameters when built
            self.forward_pair = distributed.wrap(
                CleanAndMixed(self.model),
                self.device,
                find_unused_parameters=config.loss.loss != "Proxy_Anchor",
                buffers_differ=self._per_rank_batch_norm(),
            )
            self._wrapped_for = trainable
        steps = min(self.sampler.num_batches, config.optim.max_steps or self.sampler.num_batches)
        self.sampler.set_epoch(epoch, start_step=self.state.step)
        loss_sum = torch.tensor(self.state.epoch_loss_sum, device=self.device)
        if self.state.step == 0:
            self.guard.epoch_skipped.zero_()
        progress = tqdm(
            total=steps,
            initial=self.state.step,
            desc=f"epoch {epoch + 1}/{config.optim.epochs}",
            leave=False,
            disable=not distributed.is_main(),
        )
        for step, (images, labels, dropped) in enumerate(self.train_loader, start=self.state.step):
            if step >= steps:
                break
            self.bad_images.add(dropped)
            if dropped and distributed.world_size() > 1:
                images, labels = refill_share(images, labels, len(dropped))
            if images is None:
                continue
            images = images.to(self.device, non_blocking=True)
            loss, skipped = self.train_step(images, labels.to(self.device, non_blocking=True))
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
                stop = distributed.any_rank(self.stop_request.signal or 0, self.device)
            if sync_now or stop:
                self._check_skipped_steps(epoch, done)
                progress.set_postfix(loss=f"{float(loss):.4f}")
            if save_now or stop:
                self._check_weights(f"epoch {epoch + 1}, step {done}", probe=images)
                self.state.step, self.state.epoch_loss_sum = done, float(loss_sum)
                self._save_last()
            if stop:
                progress.close()
                raise Interrupted(stop, os.path.join(self.run_dir, "checkpoint_last.pt"), epoch, done)
        progress.close()
        return float(loss_sum) / max(steps - self.guard.counts()["epoch_skipped"], 1)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor):
        """One optimisation step on a batch; returns its loss and whether the update was
        skipped (StepGuard), both on the device (no host synchronisation)."""
        lam, permutation = mixup_draw(images.shape[0] * distributed.world_size(), self.mixup_generator)
        if self.device.type == "cuda":  # a copy from pageable memory would wait for the GPU to finish
            permutation = permutation.pin_memory()
        loss = idml_loss(
            self.forward_pair,
            self.criterion,
            images,
            labels,
            lam,
            permutation.to(self.device, non_blocking=True),
            self.amp,
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        distributed.average_gradients(self.criterion.parameters())  # DDP averages the model's
        self.scaler.unscale_(self.optimizer)
        parameters = list(self.model.parameters()) + list(self.criterion.parameters())
        # before clipping, which would turn an infinite gradient into a finite one
        skip = self.guard.check(loss, [p.grad for p in parameters if p.grad is not None])
        torch.nn.utils.clip_grad_value_(parameters, GRADIENT_CLIP)
        guarded_step(self.optimizer, skip)  # (GradScaler's own skip is part of `skip`: inf gradients)
        self.scaler.update()
        return loss, skip

    def _check_skipped_steps(self, epoch: int, done: int) -> None:
        """Where the loop synchronises: a warning for steps skipped since the last one, and
        the stop of a run whose loss keeps failing."""
        counts = self.guard.counts()
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
        bad = bool(non_finite_weights({"model": self.model.state_dict(), "criterion": self.criterion.state_dict()}))
        if not bad and probe is not None:
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad(), autocast(self.device, self.amp):
                mu, _ = self.model(probe)
            self.model.train(was_training)
            bad = not bool(torch.isfinite(mu).all())
        if distributed.any_rank(int(bad), self.device):
            raise self._diverged(f"the weights at {when} are not finite or give NaN or infinite embeddings")

    def _diverged(self, what: str) -> TrainingDiverged:
        """`what` went wrong; the error names checkpoint_last.pt only after checking that its
        weights give finite embeddings of the test set (every rank takes part)."""
        last = os.path.join(self.run_dir, "checkpoint_last.pt")
        advice = "with a lower --lr (or --amp off, or --max-loss-jump)"
        if not os.path.isfile(last):
            return TrainingDiverged(f"{what}; no checkpoint was written yet: start again {advice}")
        checkpoint = load_checkpoint(last, required=("model", "epoch", "step"))
        self.model.load_state_dict(checkpoint["model"])  # this run ends: its own weights are of no more use
        embeddings = distributed.gather_eval(
            embed(self.model, self.test_loader, self.device, self.amp, progress=False, bad_images=self.bad_images)[0]
        )
        if non_finite_rows(embeddings):
            return TrainingDiverged(f"{what}; {last} gives NaN or infinite embeddings too: start again {advice}")
        return TrainingDiverged(
            f"{what}; {last} is good (its test embeddings are finite; it resumes at epoch "
            f"{checkpoint['epoch'] + 1}, step {checkpoint['step']}): resume from it {advice}"
        )

    def _evaluate(self, when: str) -> dict:
        config = self.config
        if self._per_rank_batch_norm():
            distributed.share_buffers(self.model)
        shares = embed(
            self.model,
            self.test_loader,
            self.device,
            self.amp,
            progress=distributed.is_main(),
            bad_images=self.bad_images,
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
        entry = {"epoch": epoch, "loss": loss, **metrics}
        self.state.history.append(entry)
        is_best = epoch > 0 and (self.state.best is None or metrics["R@1"] > self.state.best["metrics"]["R@1"])
        if is_best:
            self.state.best = {"epoch": epoch, "metrics": metrics}
        if epoch > 0:  # before any checkpoint of it is written (every rank: it may stop them all)
            self._check_weights(f"epoch {epoch}")
        if not distributed.is_main():  # the state is the same on every rank; rank 0 writes
            return
        atomic_write_text(
            os.path.join(self.run_dir, "metrics.jsonl"), "".join(json.dumps(e) + "\n" for e in self.state.history)
        )
        plots.history_plot(self.run_dir, self.state.history)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in entry.items() if v is not None}, step=epoch)
        if is_best:
            prefix = os.path.join(self.run_dir, f"{self.config.data.dataset}_{self.config.model.model}_best")
            save_checkpoint(prefix + ".pth", self._weights(epoch, metrics))
            atomic_write_text(prefix + "_results.txt", best_results_text(epoch, metrics))
        if epoch > 0:
            self._save_last()

    def _save_last(self) -> None:
        if distributed.is_main():
            save_checkpoint(os.path.join(self.run_dir, "checkpoint_last.pt"), self._checkpoint())

    def _weights(self, epoch: int, metrics: dict) -> dict:
        """The best epoch's file: what evaluation, export and search read, without the optimiser
        state that only resuming needs (it would double the file)."""
        return {
            "args": self.config.flat(),
            "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict(),
            "epoch": epoch,
            "metrics": metrics,
        }

    def _checkpoint(self) -> dict:
        return {
            "args": self.config.flat(),
            "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **asdict(self.state),
            "rng": rng_state(self.mixup_generator),
            "step_guard": self.guard.state_dict(),
        }

    def _resume(self, path: str) -> None:
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
        self.model.load_state_dict(checkpoint["model"])
        self.criterion.load_state_dict(checkpoint["criterion"])
        self._restore_schedule(checkpoint, saved)
        self.scaler.load_state_dict(checkpoint["scaler"])
        if "step_guard" in checkpoint:  # (absent from checkpoints older than the guard)
            self.guard.load_state_dict(checkpoint["step_guard"])
            self.reported_skips = int(self.guard.skipped)
        restore_rng_state(checkpoint["rng"], self.mixup_generator)
        self.state = RunState.from_checkpoint(checkpoint)
        self.run_dir = os.path.dirname(os.path.abspath(path))
        print_main(f"resumed from {path} at epoch {self.state.epoch + 1}, step {self.state.step}")

    def _restore_schedule(self, checkpoint: dict, saved: dict) -> None:
        """The optimizer's and StepLR's state of the checkpoint, with the schedule of this
        run's flags where they differ (one line each): so the checkpoint's args always say
        what the run uses. Another --optimizer starts from a fresh state."""
        asked = self.config.flat()
        optimizer = asked["optimizer"]
        same_optimizer = saved.get("optimizer", optimizer) == optimizer
        if same_optimizer:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        else:
            print_main(
                f"--optimizer {saved['optimizer']} -> {optimizer}: the {optimizer} state starts "
                f"afresh (the {saved['optimizer']} state of the checkpoint does not apply)"
            )
        self.scheduler.load_state_dict(checkpoint["scheduler"])  # the epoch count
        changed = [name for name in SCHEDULE_FLAGS if saved.get(name) != asked[name]]
        for name in changed:
            print_main(f"--{name.replace('_', '-')} {saved.get(name)} -> {asked[name]}")
        if changed or not same_optimizer:  # else exactly the saved state, so that the run continues bit for bit
            apply_schedule(self.optimizer, self.scheduler, self.config.optim, self.scheduler.last_epoch)

    def _summary(self) -> None:
        first, last = self.state.history[0], self.state.history[-1]
        print("unseen-class metrics before training -> after training:")
        for name in first:
            if name not in ("epoch", "loss"):
                print(f"  {name:6s} {first[name] * 100:6.2f} -> {last[name] * 100:6.2f}")
        if self.state.best is not None:
            print(
                f"best R@1 {self.state.best['metrics']['R@1'] * 100:.2f} at epoch {self.state.best['epoch']}; "
                f"outputs in {self.run_dir}"
            )


def best_results_text(epoch: int, metrics: dict) -> str:
    """<dataset>_<model>_best_results.txt, in the published format (percentages)."""
    lines = [f"Best Epoch: {epoch}"]
    for name, value in metrics.items():
        label = f"Recall@{name[2:]}" if name.startswith("R@") else name
        lines.append(f"Best {label}: {value * 100:.4f}")
    return "\n".join(lines) + "\n"


def print_main(*values, **options) -> None:
    if distributed.is_main():
        print(*values, **options)


def train(config: TrainConfig) -> RunState:
    device = resolve_device(config.run.device, config.run.gpu)
    with distributed.session(device):
        return Trainer(config, device).run()
