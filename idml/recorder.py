"""The outputs of a training run: its folder under --LOG_DIR (claimed, then locked for the run's
life), metrics.jsonl, the plots, the checkpoints and the wandb run.

Under torchrun only rank 0 writes; every rank takes part in claiming and locking the folder so
that all of them stop together when that fails.
"""

import itertools
import json
import os
import shutil
from collections.abc import Callable

from idml import distributed, plots, tracking
from idml.checkpoint import save_checkpoint
from idml.config import TrainConfig
from idml.errors import UsageError
from idml.files import LOCK_NAME, FolderLock, atomic_write_text, remove_stale_temporaries

LAST_CHECKPOINT = "checkpoint_last.pt"


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


def best_results_text(epoch: int, metrics: dict) -> str:
    """<dataset>_<model>_best_results.txt, in the published format (percentages)."""
    lines = [f"Best Epoch: {epoch}"]
    for name, value in metrics.items():
        label = f"Recall@{name[2:]}" if name.startswith("R@") else name
        lines.append(f"Best {label}: {value * 100:.4f}")
    return "\n".join(lines) + "\n"


class Recorder:
    """Owns the run folder: opened on construction (`run_dir`, a resumed run's folder, or a
    newly claimed one; locked; wandb started), released by `release`."""

    def __init__(self, config: TrainConfig, run_dir: str | None, wandb_run_id: str | None = None):
        self.config = config
        self.run_dir, self.lock, self.created, self.wandb = run_dir, None, False, None
        if run_dir is None:  # rank 0 claims a folder, the others write into it
            try:
                self.run_dir = distributed.broadcast_object(claim_run_folder(config) if distributed.is_main() else None)
            except OSError as error:
                raise UsageError(
                    f"cannot create a run folder under --LOG_DIR {config.run.LOG_DIR} ({error.strerror})"
                ) from None
            self.created = True
        try:
            self._lock()
            if distributed.is_main():
                self.wandb = tracking.open_run(
                    config.run.wandb, f"{config.data.dataset}_ProxyAnchor", self.run_dir, config.flat(), wandb_run_id
                )
        except BaseException:
            self.release(failed=True)
            raise

    @property
    def last_checkpoint(self) -> str:
        return os.path.join(self.run_dir, LAST_CHECKPOINT)

    def _lock(self) -> None:
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

    def release(self, failed: bool) -> None:
        """Unlocks the run folder; after a failed start, removes the folder this run created
        if nothing was written into it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if (
            failed
            and self.created
            and distributed.is_main()
            and os.path.isdir(self.run_dir)
            and set(os.listdir(self.run_dir)) <= {LOCK_NAME}
        ):
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def save_last(self, checkpoint: Callable[[], dict]) -> None:
        """checkpoint_last.pt of `checkpoint()`, called on rank 0 only (the state is the same on
        every rank)."""
        if distributed.is_main():
            save_checkpoint(self.last_checkpoint, checkpoint())

    def record(self, history: list[dict], best_weights: dict | None) -> None:
        """metrics.jsonl and the loss/recall plot of `history`, its last entry to wandb; with
        `best_weights` (a new best epoch's file, holding "epoch" and "metrics"), that epoch's
        <dataset>_<model>_best.pth and _best_results.txt."""
        if not distributed.is_main():
            return
        atomic_write_text(os.path.join(self.run_dir, "metrics.jsonl"), "".join(json.dumps(e) + "\n" for e in history))
        plots.history_plot(self.run_dir, history)
        entry = history[-1]
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in entry.items() if v is not None}, step=entry["epoch"])
        if best_weights is not None:
            prefix = os.path.join(self.run_dir, f"{self.config.data.dataset}_{self.config.model.model}_best")
            save_checkpoint(prefix + ".pth", best_weights)
            atomic_write_text(
                prefix + "_results.txt", best_results_text(best_weights["epoch"], best_weights["metrics"])
            )

    def finish(self, test_uncertainty, uncertainty_mode: str) -> None:
        """After the last epoch: the histogram of the test set's uncertainty, and wandb's end."""
        if distributed.is_main():
            plots.uncertainty_plot(self.run_dir, test_uncertainty, uncertainty_mode)
        if self.wandb is not None:
            self.wandb.finish()
