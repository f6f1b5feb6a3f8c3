"""The embedding network (docs/method.md, section 1) and how the loss reaches its heads."""

import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from idml import reference
from idml.errors import UsageError
from idml.losses import ProxyAnchorISM
from idml.models import IDMLNet, _conv2d, load_backbone


def small_net(**kwargs):
    options = dict(arch="resnet18", embedding_size=16, pretrained="none", bn_freeze=False)
    options.update(kwargs)
    return IDMLNet(**options)


def test_features_are_average_plus_max_pooled_layer4():
    net = small_net().eval()
    images = torch.randn(2, 3, 64, 64)
    b = net.backbone
    x = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(images))))))))
    expected = x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))
    torch.testing.assert_close(net.features(images), expected)
    assert net.features(images).shape == (2, 512)


def with_random_batch_norm_statistics(net):
    """Non-trivial running statistics and affine parameters (fresh ones fold to nearly 1, 0)."""
    with torch.no_grad():
        for bn in net.batch_norms():
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    return net


def outputs_and_gradients(net, images, fold):
    net.fold_batch_norm = fold
    net.zero_grad()
    mu, sigma = net(images)
    (mu.sum() + sigma.square().sum()).backward()
    grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    return [mu.detach(), sigma.detach(), *grads]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])  # BasicBlock and Bottleneck
@pytest.mark.parametrize("bn_freeze, mode", [(True, "train"), (False, "eval")])
@pytest.mark.parametrize("image_size", [64, 32])  # 32: layer4 at one pixel (convolutions as products)
def test_eval_batch_norm_folded_into_the_convolutions_is_the_same_function(arch, bn_freeze, mode, image_size):
    """Folded (the default whenever every BatchNorm is in eval mode) and layer by layer
    (torchvision's forward) agree to float64 rounding, outputs and every gradient."""
    torch.manual_seed(0)
    # softplus: the normalised head would get rounding noise as its gradient
    net = small_net(arch=arch, bn_freeze=bn_freeze, uncertainty="softplus")
    net = with_random_batch_norm_statistics(net.double())
    net.train(mode == "train")
    images = torch.randn(3, 3, image_size, image_size, dtype=torch.float64)
    folded, layered = outputs_and_gradients(net, images, True), outputs_and_gradients(net, images, False)
    assert len(folded) == len(layered) > 2
    for got, expected in zip(folded, layered):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


# (kernel, stride, padding, input height, input width): one output pixel, then more
ONE_PIXEL = [
    (3, 1, 1, 1, 1),
    (3, 2, 1, 2, 2),
    (1, 2, 0, 2, 2),
    (1, 1, 0, 1, 1),
    (7, 2, 3, 2, 2),
    ((3, 1), (2, 1), (1, 0), 2, 1),
    (5, 4, 0, 5, 8),
]
MORE_PIXELS = [(3, 1, 1, 2, 2), (3, 2, 1, 3, 3), (1, 1, 0, 1, 2)]


@pytest.mark.parametrize("geometry", ONE_PIXEL + MORE_PIXELS)
@pytest.mark.parametrize("bias", [True, False])
def test_one_pixel_convolutions_are_matrix_products_with_the_same_values_and_gradients(geometry, bias, monkeypatch):
    kernel, stride, padding, height, width = geometry
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 4, kernel, stride, padding, bias=bias).double()
    x = torch.randn(3, 5, height, width, dtype=torch.float64, requires_grad=True)
    expected = conv(x)
    expected_grads = torch.autograd.grad(expected.sin().sum(), [x, *conv.parameters()])
    convolutions = []
    real_conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: convolutions.append(1) or real_conv2d(*a, **k))
    got = _conv2d(x, conv.weight, conv.bias, conv)
    assert len(convolutions) == (geometry in MORE_PIXELS)
    got_grads = torch.autograd.grad(got.sin().sum(), [x, *conv.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_batch_norm_is_folded_only_while_every_one_is_in_eval_mode(monkeypatch):
    calls = []
    real_batch_norm = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *a, **k: calls.append(1) or real_batch_norm(*a, **k))
    images = torch.randn(2, 3, 32, 32)
    frozen = small_net(bn_freeze=True).train()  # frozen BatchNorm stays in eval mode: folded
    frozen(images)
    assert calls == []
    training = small_net(bn_freeze=False).train()  # batch statistics: never folded
    before = training.backbone.bn1.running_mean.clone()
    training(images)
    assert len(calls) == len(training.batch_norms())
    assert not torch.equal(training.backbone.bn1.running_mean, before)
    calls.clear()
    training.eval()(images)
    assert calls == []
    synced = small_net(bn_freeze=False).eval()
    synced.backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(synced.backbone).eval()
    synced(images)  # SyncBatchNorm (--bn-freeze 0 under DDP) is left as it is
    assert len(calls) == len(training.batch_norms())


@pytest.mark.parametrize("l2_norm", [True, False])
def test_outputs_and_normalisation(l2_norm):
    net = small_net(l2_norm=l2_norm).eval()
    mu, sigma = net(torch.randn(3, 3, 32, 32))
    assert mu.shape == sigma.shape == (3, 16)
    norms = torch.cat([mu, sigma]).norm(dim=1)
    assert torch.allclose(norms, torch.ones(6), atol=1e-5) == l2_norm


@pytest.mark.parametrize("mode, activation", [("relu", F.relu), ("softplus", F.softplus)])
def test_learned_uncertainty_is_that_map_of_the_head_not_normalised(mode, activation):
    net = small_net(uncertainty=mode).eval()
    images = torch.randn(3, 3, 32, 32)
    _, sigma = net(images)
    torch.testing.assert_close(sigma, activation(net.uncertainty_head(net.features(images))))


def test_semantic_head_init_is_kaiming_fan_out_with_zero_bias():
    net = IDMLNet("resnet18", 256, "none")
    assert torch.count_nonzero(net.semantic.bias) == 0
    # kaiming normal, fan_out = 256 outputs: std sqrt(2 / 256)
    assert abs(net.semantic.weight.std().item() - (2 / 256) ** 0.5) < 0.005


def published_initial_model(seed: int, arch: str, embedding_size: int, device: str = "cpu"):
    """The published code's initialisation order (its ResNet classes, the one with the uncertainty
    head): seed, torchvision's ResNet, the semantic Linear, the uncertainty Linear, then Kaiming-normal
    (fan_out) on the semantic weight and a zero bias; the proxies come after (randn on the CPU, moved
    to the device, then Kaiming there)."""
    torch.manual_seed(seed)
    backbone = getattr(torchvision.models, arch)()
    semantic = torch.nn.Linear(backbone.fc.in_features, embedding_size)
    uncertainty = torch.nn.Linear(backbone.fc.in_features, embedding_size)
    torch.nn.init.kaiming_normal_(semantic.weight, mode="fan_out")
    torch.nn.init.constant_(semantic.bias, 0)
    proxies = torch.randn(7, embedding_size).to(device)
    torch.nn.init.kaiming_normal_(proxies, mode="fan_out")
    return backbone, semantic, uncertainty, proxies


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_seed_gives_the_published_initial_model_heads_included(device):
    backbone, semantic, uncertainty, proxies = published_initial_model(5, "resnet18", 16, device)
    torch.manual_seed(5)
    net = small_net(bn_freeze=True)
    criterion = ProxyAnchorISM(7, 16, device=device)
    for name, value in net.backbone.state_dict().items():
        assert torch.equal(value, backbone.state_dict()[name]), name
    for mine, published in [(net.semantic, semantic), (net.uncertainty_head, uncertainty)]:
        assert torch.equal(mine.weight, published.weight) and torch.equal(mine.bias, published.bias)
    assert torch.equal(criterion.proxies, proxies)


def uncertainty_gradient(mode: str) -> float:
    torch.manual_seed(0)
    net = small_net(uncertainty=mode)
    proxies = torch.randn(5, 16)
    mu, sigma = net(torch.randn(8, 3, 32, 32))
    loss = reference.pa_ism_loss(mu, sigma, torch.arange(8) % 5, proxies)
    loss.backward()
    return net.uncertainty_head.weight.grad.abs().max().item()


def test_uncertainty_head_learns_nothing_in_normalized_mode():
    # |sigma| = 1 for every image, so u is constant: the gradient vanishes up to rounding.
    assert uncertainty_gradient("normalized") < 1e-6


@pytest.mark.parametrize("mode", ["relu", "softplus"])
def test_uncertainty_head_learns_in_relu_and_softplus_modes(mode):
    assert uncertainty_gradient(mode) > 1e-4


def test_bn_freeze_keeps_batchnorm_in_eval_mode_with_frozen_affine():
    net = small_net(bn_freeze=True).train()
    norms = net.batch_norms()
    assert norms and all(not m.training for m in norms)
    assert all(not p.requires_grad for m in norms for p in m.parameters())
    net.set_warmup(True)
    net.set_warmup(False)  # leaving warm-up must not unfreeze them
    assert all(not p.requires_grad for m in norms for p in m.parameters())
    assert net.backbone.conv1.weight.requires_grad


def test_warmup_trains_only_the_semantic_head():
    net = small_net()
    net.set_warmup(True)
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"semantic.weight", "semantic.bias"}
    net.set_warmup(False)
    assert all(p.requires_grad for p in net.parameters())


def test_pretrained_path_loads_a_torchvision_state_dict(tmp_path):
    source = torchvision.models.resnet18()
    path = str(tmp_path / "weights.pth")
    torch.save(source.state_dict(), path)
    backbone = load_backbone("resnet18", path)
    torch.testing.assert_close(backbone.conv1.weight, source.conv1.weight)


def test_pretrained_path_of_another_architecture_is_refused(tmp_path):
    path = str(tmp_path / "weights.pth")
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(UsageError, match="not a torchvision resnet18 state dict"):
        load_backbone("resnet18", path)


def test_pretrained_path_that_is_no_file_is_named(tmp_path):
    for path, why in [(tmp_path, "is a folder"), (tmp_path / "missing.pth", "does not exist")]:
        with pytest.raises(UsageError, match=f"--pretrained expects 'imagenet', 'none' or a weights file; .* {why}"):
            load_backbone("resnet18", str(path))


def test_offline_imagenet_weights_name_the_file_and_the_alternatives(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.__class__, "get_state_dict", no_network)
    with pytest.raises(UsageError, match=r"resnet50-0676ba61\.pth.*--pretrained PATH.*--pretrained none"):
        load_backbone("resnet50", "imagenet")


def test_unknown_architecture_is_refused():
    with pytest.raises(UsageError, match="--model must be one of"):
        load_backbone("vgg16", "none")
