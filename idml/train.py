"""Training (IDML_METHOD.md section 4): data -> model -> loss -> step -> evaluation.

Each epoch: shuffled (or --IPC balanced) batches; per step a mixup of the batch, the clean
and the mixed batch forwarded, the three-term introspective Proxy Anchor loss, gradient
clipping by value, an optimizer step. After every epoch: StepLR, evaluation on the unseen
classes, metrics.jsonl, checkpoint_last.pt, and the best checkpoint by R@1.
"""
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from idml import plots, tracking
from idml.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from idml.data import build_dataset, default_image_size
from idml.data.samplers import BalancedBatchSampler, RandomBatchSampler
from idml.errors import UsageError
from idml.evaluate import autocast, evaluate, format_metrics
from idml.files import atomic_write_text
from idml.losses import build_criterion
from idml.runtime import build_model, eval_loader, loader_options, resolve_device, seed_everything

GRADIENT_CLIP = 10.0
PROXY_LR_FACTOR = 100.0


def run_folder(args) -> str:
    """The published run folder name, so logs line up with the published code's."""
    name = (f"{args.model}_{args.loss}_embedding{args.embedding_size}_alpha{args.alpha:g}_mrg{args.mrg:g}"
            f"_{args.optimizer}_lr{args.lr:g}_batch{args.batch_size}{args.remark}")
    return os.path.join(args.LOG_DIR, f"logs_{args.dataset}", name)


def build_optimizer(args, model, criterion) -> torch.optim.Optimizer:
    """Backbone and heads at lr, proxies at 100 x lr (as published)."""
    head_parameters = list(model.semantic.parameters()) + list(model.uncertainty_head.parameters())
    groups = [
        {"params": list(model.backbone.parameters())},
        {"params": head_parameters},
        {"params": list(criterion.parameters()), "lr": args.lr * PROXY_LR_FACTOR},
    ]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(groups, lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, weight_decay=args.weight_decay, momentum=0.9, nesterov=True)
    return torch.optim.RMSprop(groups, lr=args.lr, alpha=0.9, weight_decay=args.weight_decay, momentum=0.9)


def mixup_draw(batch_size: int, generator: torch.Generator):
    """lambda ~ Beta(1, 1), which is Uniform(0, 1), and a permutation of the batch."""
    lam = float(torch.rand((), generator=generator))
    return lam, torch.randperm(batch_size, generator=generator)


def idml_loss(model, criterion, images, labels, lam: float, permutation, amp: str):
    """L(clean, y) + lam L(mixed, y) + (1 - lam) L(mixed, y[pi])."""
    mixed = lam * images + (1.0 - lam) * images[permutation]
    with autocast(images.device, amp):
        if model.bn_freeze:  # eval-mode BatchNorm is per-sample: one forward of both halves is exact
            mu, sigma = model(torch.cat([images, mixed]))
            (mu, mu_mixed), (sigma, sigma_mixed) = mu.chunk(2), sigma.chunk(2)
        else:
            (mu, sigma), (mu_mixed, sigma_mixed) = model(images), model(mixed)
    return (criterion(mu, sigma, labels)
            + lam * criterion(mu_mixed, sigma_mixed, labels)
            + (1.0 - lam) * criterion(mu_mixed, sigma_mixed, labels[permutation]))


@dataclass
class RunState:
    """What a run has done so far; saved in every checkpoint."""
    epoch: int = 0  # epochs completed
    best: Optional[dict] = None  # {"epoch": e, "metrics": {...}}
    history: List[dict] = field(default_factory=list)  # one entry per evaluation
    wandb_run_id: Optional[str] = None


class Trainer:
    def __init__(self, args):
        self.args = args
        self.device = resolve_device(args.device, args.gpu)
        self.image_size = args.image_size or default_image_size(args.dataset)
        seed_everything(args.seed)
        self.train_set = build_dataset(args.dataset, args.data_root, train=True, image_size=self.image_size)
        test_set = build_dataset(args.dataset, args.data_root, train=False, image_size=self.image_size)
        self.num_classes = max(self.train_set.labels) + 1
        if args.IPC:
            self.sampler = BalancedBatchSampler(self.train_set.labels, args.batch_size, args.IPC, args.seed)
        else:
            self.sampler = RandomBatchSampler(self.train_set.labels, args.batch_size, args.seed)
        self.train_loader = DataLoader(self.train_set, batch_sampler=self.sampler,
                                       **loader_options(args.workers, self.device))
        self.test_loader = eval_loader(test_set, args.batch_size, args.workers, self.device)

        self.model = build_model(args, args.pretrained).to(self.device)
        self.criterion = build_criterion(args, self.num_classes).to(self.device)
        self.optimizer = build_optimizer(args, self.model, self.criterion)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, args.lr_decay_step, args.lr_decay_gamma)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.mixup_generator = torch.Generator().manual_seed(args.seed)
        self.state = RunState()
        self.run_dir = run_folder(args)
        if args.resume:
            self._resume(args.resume)
        os.makedirs(self.run_dir, exist_ok=True)
        self.wandb = tracking.open_run(args.wandb, f"{args.dataset}_ProxyAnchor", self.run_dir, vars(args),
                                       self.state.wandb_run_id)
        if self.wandb is not None:
            self.state.wandb_run_id = self.wandb.id

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> RunState:
        args = self.args
        print(f"training IDML on {args.dataset} ({len(self.train_set)} images, {self.num_classes} classes) "
              f"on {self.device}; run folder {self.run_dir}")
        if self.state.epoch == 0:
            self._record(0, None, self._evaluate("before training"))
        for epoch in range(self.state.epoch, args.epochs):
            loss = self.train_epoch(epoch)
            self.scheduler.step()
            self.state.epoch = epoch + 1
            self._record(epoch + 1, loss, self._evaluate(f"epoch {epoch + 1}/{args.epochs}"))
        plots.uncertainty_plot(self.run_dir, self.model, self.test_loader, self.device, args.amp)
        self._summary()
        if self.wandb is not None:
            self.wandb.finish()
        return self.state

    def train_epoch(self, epoch: int) -> float:
        args = self.args
        self.model.train()
        self.model.set_warmup(epoch < args.warm)
        self.sampler.set_epoch(epoch)
        steps = min(len(self.train_loader), args.max_steps or len(self.train_loader))
        loss_sum = torch.zeros((), device=self.device)
        progress = tqdm(self.train_loader, total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for step, (images, labels) in enumerate(progress):
            if step >= steps:
                break
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            lam, permutation = mixup_draw(images.shape[0], self.mixup_generator)
            loss = idml_loss(self.model, self.criterion, images, labels, lam, permutation.to(self.device), args.amp)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_value_(list(self.model.parameters()) + list(self.criterion.parameters()),
                                            GRADIENT_CLIP)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += loss.detach()
            if step % 10 == 0:
                progress.set_postfix(loss=f"{float(loss.detach()):.4f}")
        progress.close()
        return float(loss_sum) / max(steps, 1)

    def _evaluate(self, when: str) -> dict:
        metrics = evaluate(self.model, self.test_loader, self.device, self.args.dataset, self.args.amp,
                           clustering=bool(self.args.eval_clustering))
        print(f"[{when}] unseen classes: {format_metrics(metrics)}", flush=True)
        return metrics

    # --- outputs ------------------------------------------------------------------------

    def _record(self, epoch: int, loss: Optional[float], metrics: dict) -> None:
        entry = {"epoch": epoch, "loss": loss, **metrics}
        self.state.history.append(entry)
        atomic_write_text(os.path.join(self.run_dir, "metrics.jsonl"),
                          "".join(json.dumps(e) + "\n" for e in self.state.history))
        plots.history_plot(self.run_dir, self.state.history)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in entry.items() if v is not None}, step=epoch)
        if epoch > 0 and (self.state.best is None or metrics["R@1"] > self.state.best["metrics"]["R@1"]):
            self.state.best = {"epoch": epoch, "metrics": metrics}
            prefix = os.path.join(self.run_dir, f"{self.args.dataset}_{self.args.model}_best")
            save_checkpoint(prefix + ".pth", self._checkpoint())
            atomic_write_text(prefix + "_results.txt", best_results_text(epoch, metrics))
        if epoch > 0:
            save_checkpoint(os.path.join(self.run_dir, "checkpoint_last.pt"), self._checkpoint())

    def _checkpoint(self) -> dict:
        return {
            "args": vars(self.args),
            "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch,
            "best": self.state.best,
            "history": self.state.history,
            "rng": rng_state(self.mixup_generator),
            "wandb_run_id": self.state.wandb_run_id,
        }

    def _resume(self, path: str) -> None:
        checkpoint = load_checkpoint(path)
        saved = checkpoint["args"]
        for name in ("model", "embedding_size", "dataset", "uncertainty", "l2_norm", "loss"):
            if saved[name] != getattr(self.args, name):
                raise UsageError(f"--resume {path} was trained with --{name.replace('_', '-')} {saved[name]}, "
                                 f"this run asks for {getattr(self.args, name)}")
        self.model.load_state_dict(checkpoint["model"])
        self.criterion.load_state_dict(checkpoint["criterion"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"], self.mixup_generator)
        self.state = RunState(epoch=checkpoint["epoch"], best=checkpoint["best"], history=checkpoint["history"],
                              wandb_run_id=checkpoint["wandb_run_id"])
        self.run_dir = os.path.dirname(os.path.abspath(path))
        print(f"resumed from {path} after epoch {self.state.epoch}")

    def _summary(self) -> None:
        first, last = self.state.history[0], self.state.history[-1]
        print("unseen-class metrics before training -> after training:")
        for name in first:
            if name not in ("epoch", "loss"):
                print(f"  {name:6s} {first[name] * 100:6.2f} -> {last[name] * 100:6.2f}")
        if self.state.best is not None:
            print(f"best R@1 {self.state.best['metrics']['R@1'] * 100:.2f} at epoch {self.state.best['epoch']}; "
                  f"outputs in {self.run_dir}")


def best_results_text(epoch: int, metrics: dict) -> str:
    """<dataset>_<model>_best_results.txt, in the published format (percentages)."""
    lines = [f"Best Epoch: {epoch}"]
    for name, value in metrics.items():
        label = f"Recall@{name[2:]}" if name.startswith("R@") else name
        lines.append(f"Best {label}: {value * 100:.4f}")
    return "\n".join(lines) + "\n"


def train(args) -> RunState:
    return Trainer(args).run()
