"""The published baseline losses (Proxy-Anchor-CVPR2020's, through pytorch-metric-learning):
each trains one short epoch end to end; Proxy_NCA's proxies train at 100 x lr; a clear
message when pytorch-metric-learning is missing."""

import math
import sys

import pytest
import torch
from tiny_runs import TINY_DIGITS_RUN

from idml.choices import BASELINE_LOSSES
from idml.cli import run_guarded, train_config, train_main
from idml.errors import UsageError
from idml.losses import baseline_loss
from idml.train import PROXY_LR_FACTOR, Trainer

pytestmark = pytest.mark.slow  # trains tiny runs


@pytest.mark.parametrize("loss", BASELINE_LOSSES)
def test_baseline_trains_one_short_epoch(tmp_path, loss):
    pytest.importorskip("pytorch_metric_learning")
    args = train_config(TINY_DIGITS_RUN + ["--loss", loss, "--IPC", "8", "--LOG_DIR", str(tmp_path)])
    trainer = Trainer(args)
    assert trainer.parts.criterion.name == loss
    if loss == "Proxy_NCA":
        proxies = trainer.parts.criterion.loss_func.proxies
        assert proxies.shape == (trainer.parts.num_classes, 16)
        group = next(g for g in trainer.parts.optimizer.param_groups if any(p is proxies for p in g["params"]))
        assert group["lr"] == pytest.approx(args.optim.lr * PROXY_LR_FACTOR)
        before = proxies.detach().clone()
    state = trainer.run()
    losses = [entry["loss"] for entry in state.history if entry["loss"] is not None]
    assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] >= 0
    assert loss in trainer.recorder.run_dir  # the published run-folder name carries the loss
    if loss == "Proxy_NCA":
        assert not torch.equal(before, trainer.parts.criterion.loss_func.proxies.detach())


def test_published_hyperparameters():
    pytest.importorskip("pytorch_metric_learning")
    assert baseline_loss("Proxy_NCA", 3, 8).loss_func.softmax_scale == 32
    ms = baseline_loss("MS", 3, 8)
    assert (ms.loss_func.alpha, ms.loss_func.beta, ms.loss_func.base, ms.miner.epsilon) == (2, 50, 0.5, 0.1)
    contrastive = baseline_loss("Contrastive", 3, 8)
    assert (contrastive.loss_func.pos_margin, contrastive.loss_func.neg_margin, contrastive.miner) == (0, 0.5, None)
    triplet = baseline_loss("Triplet", 3, 8)
    assert triplet.loss_func.margin == 0.1
    assert (triplet.miner.margin, triplet.miner.type_of_triplets) == (0.1, "semihard")
    assert baseline_loss("NPair", 3, 8).miner is None


def test_missing_pytorch_metric_learning_is_one_clear_sentence(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning", None)  # import now raises ImportError
    with pytest.raises(UsageError, match="pip install pytorch-metric-learning"):
        baseline_loss("MS", 3, 8)
    code = run_guarded(train_main, TINY_DIGITS_RUN + ["--loss", "Triplet", "--LOG_DIR", str(tmp_path)])
    assert code == 2
    assert "pip install pytorch-metric-learning" in capsys.readouterr().err


def test_baselines_ignore_sigma():
    pytest.importorskip("pytorch_metric_learning")
    torch.manual_seed(0)
    criterion = baseline_loss("MS", 3, 8)
    mu, labels = torch.nn.functional.normalize(torch.randn(12, 8), dim=1), torch.arange(12) % 3
    assert torch.equal(criterion(mu, torch.randn(12, 8), labels), criterion(mu, torch.zeros(12, 8), labels))
