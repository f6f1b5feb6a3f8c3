"""The fused introspective Proxy Anchor loss (torch.ops.idml.pa_ism_loss, its forward and
backward operators pa_ism_forward/backward, and idml.ops.pa_ism_loss) against
idml/reference.py, an independent float64 evaluation of docs/method.md, sections 2-3
written here, and pytorch-metric-learning's ProxyAnchorLoss.
"""

import os
import subprocess
import sys

import pytest
import torch

from idml import ops, reference
from idml.errors import UsageError

HYPER = dict(margin=0.1, alpha=32.0, ism=True, ism_offset=4.0, ism_scale=5.0)


def make_inputs(B, C, D, dtype=torch.float64, device="cpu", sigma_kind="general", labels=None, requires_grad=True):
    """Raw head outputs as the loss sees them: mu of varying norm, sigma general (any sign)
    or relu-like (non-negative, many zeros), both with row norms spread over [0.1, 3]."""
    mu = torch.randn(B, D, dtype=torch.float64) * torch.empty(B, 1, dtype=torch.float64).uniform_(0.1, 3)
    sigma = torch.randn(B, D, dtype=torch.float64) * torch.empty(B, 1, dtype=torch.float64).uniform_(0.1, 3)
    if sigma_kind == "relu":
        sigma = sigma.relu()
    proxies = torch.randn(C, D, dtype=torch.float64) * 0.5
    if labels is None:
        labels = torch.randint(0, C, (B,))
    tensors = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (mu, sigma, proxies)]
    return tensors[0], tensors[1], labels.to(device), tensors[2]


def loss_and_grads(fn, mu, sigma, labels, proxies, **hyper):
    loss = fn(mu, sigma, labels, proxies, **hyper)
    grads = torch.autograd.grad(loss, (mu, sigma, proxies), allow_unused=True)
    # The reference does not use sigma when ism is off: its gradient is zero.
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (mu, sigma, proxies))]
    return loss, grads


def assert_close_rel(actual, expected, rtol):
    """|actual - expected| <= rtol * max|expected| elementwise (relative to the tensor's scale)."""
    scale = expected.detach().abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=rtol, atol=rtol * scale.item())


def assert_matches_reference(mu, sigma, labels, proxies, rtol, **hyper):
    hyper = {**HYPER, **hyper}
    loss, grads = loss_and_grads(ops.pa_ism_loss, mu, sigma, labels, proxies, **hyper)
    ref_loss, ref_grads = loss_and_grads(reference.pa_ism_loss, mu, sigma, labels, proxies, **hyper)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert loss.dtype == ref_loss.dtype
    assert_close_rel(loss, ref_loss, rtol)
    for grad, ref_grad, x in zip(grads, ref_grads, (mu, sigma, proxies)):
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert_close_rel(grad, ref_grad, rtol)


def independent_loss(mu, sigma, labels, proxies, margin, alpha, ism, ism_offset, ism_scale):
    """docs/method.md, sections 2-3, element by element, in float64, without reference.py:
    the distance is |mu_i - p_c|^2 of the difference itself (not from the dot product) and
    the log-sum-exp is the plain log(1 + sum exp), safe at these sizes in float64."""
    B, C = mu.shape[0], proxies.shape[0]
    positive_terms, negative_terms = [], []
    for c in range(C):
        p = proxies[c]
        positive_exps, negative_exps = [], []
        for i in range(B):
            m = mu[i]
            s = (m * p).sum() / (torch.sqrt((m * m).sum() + 1e-12) * torch.sqrt((p * p).sum() + 1e-12))
            if ism:
                d = torch.clamp(((m - p) ** 2).sum(), min=1e-8)
                u = (sigma[i] ** 2).sum()
                s = 1 - (1 - s) * torch.exp(-(u + ism_offset) / (ism_scale * d))
            if int(labels[i]) == c:
                positive_exps.append(torch.exp(-alpha * (s - margin)))
            else:
                negative_exps.append(torch.exp(alpha * (s + margin)))
        if positive_exps:
            positive_terms.append(torch.log(1 + sum(positive_exps)))
        negative_terms.append(torch.log(1 + sum(negative_exps)) if negative_exps else mu.new_zeros(()))
    return sum(positive_terms) / len(positive_terms) + sum(negative_terms) / C


def test_kernels_are_built_for_cpu():
    for op in ("pa_ism_forward", "pa_ism_backward"):
        assert ops.has_kernel(op, torch.device("cpu")), f"idml._C has no CPU kernel for {op}"


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix with transposed strides (not contiguous)."""
    return t.t().contiguous().t()


LAYOUTS = dict(argvalues=[lambda t: t, column_major], ids=["contiguous", "column_major"])


@pytest.mark.parametrize("layout", **LAYOUTS)
@pytest.mark.parametrize("ism", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck_loss_and_forward(dtype, ism, layout):
    """The differentiable loss operator (its C++ autograd included) and the bare forward."""
    mu, sigma, labels, proxies = make_inputs(7, 11, 5, dtype=dtype)
    mu, sigma, proxies = layout(mu), layout(sigma), layout(proxies)
    args = (mu, sigma, labels, proxies, 0.1, 32.0, ism, 4.0, 5.0)
    torch.library.opcheck(torch.ops.idml.pa_ism_loss.default, args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.idml.pa_ism_forward.default, detached)


def test_bare_forward_is_not_differentiable():
    """Gradients come from pa_ism_loss; backpropagating through the bare forward operator
    raises instead of silently giving none."""
    mu, sigma, labels, proxies = make_inputs(5, 6, 4)
    loss = torch.ops.idml.pa_ism_forward(mu, sigma, labels, proxies)[0]
    with pytest.raises(RuntimeError, match="not implemented"):
        loss.backward()


@pytest.mark.parametrize("layout", **LAYOUTS)
@pytest.mark.parametrize("ism", [True, False])
def test_opcheck_backward(ism, layout):
    """Gradients come back contiguous whatever the inputs' strides, in the kernels and their
    fake (meta) versions alike."""
    mu, sigma, labels, proxies = make_inputs(7, 11, 5, requires_grad=False)
    mu, sigma, proxies = layout(mu), layout(sigma), layout(proxies)
    _, *saved = torch.ops.idml.pa_ism_forward(mu, sigma, labels, proxies, 0.1, 32.0, ism, 4.0, 5.0)
    grad_loss = torch.tensor(0.7, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.idml.pa_ism_backward.default,
        (grad_loss, mu, sigma, labels, proxies, *saved, 0.1, 32.0, ism, 4.0, 5.0),
    )


@pytest.mark.parametrize("sigma_kind", ["general", "relu"])
@pytest.mark.parametrize("ism", [True, False])
def test_gradcheck_float64(ism, sigma_kind):
    mu, sigma, labels, proxies = make_inputs(6, 9, 4, sigma_kind=sigma_kind)
    labels[:3] = 2  # a proxy with several positives
    assert torch.autograd.gradcheck(
        lambda m, s, p: ops.pa_ism_loss(m, s, labels, p, 0.1, 8.0, ism, 4.0, 5.0), (mu, sigma, proxies)
    )


@pytest.mark.parametrize("sigma_kind", ["general", "relu"])
@pytest.mark.parametrize("ism", [True, False])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_matches_reference_random(dtype, rtol, ism, sigma_kind):
    for B, C, D in [(32, 100, 64), (120, 300, 512), (5, 1000, 16)]:
        mu, sigma, labels, proxies = make_inputs(B, C, D, dtype=dtype, sigma_kind=sigma_kind)
        assert_matches_reference(mu, sigma, labels, proxies, rtol, ism=ism)


@pytest.mark.parametrize("ism", [True, False])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("case", ["no_positive_classes", "B1", "C1", "one_class", "alpha64", "huge_C"])
def test_matches_reference_edge_cases(case, dtype, rtol, ism):
    hyper = {}
    if case == "no_positive_classes":  # 40 proxies, only 3 of them have positives
        mu, sigma, labels, proxies = make_inputs(16, 40, 8, dtype, labels=torch.tensor([0, 7, 39] * 5 + [7]))
    elif case == "B1":
        mu, sigma, labels, proxies = make_inputs(1, 13, 8, dtype)
    elif case == "C1":
        mu, sigma, labels, proxies = make_inputs(9, 1, 8, dtype, labels=torch.zeros(9, dtype=torch.long))
    elif case == "one_class":
        mu, sigma, labels, proxies = make_inputs(12, 30, 8, dtype, labels=torch.full((12,), 4))
    elif case == "alpha64":
        mu, sigma, labels, proxies = make_inputs(20, 50, 16, dtype)
        hyper["alpha"] = 64.0
    else:  # huge C, small D
        mu, sigma, labels, proxies = make_inputs(24, 20000, 4, dtype)
    assert_matches_reference(mu, sigma, labels, proxies, rtol, ism=ism, **hyper)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mu_exactly_on_a_proxy_gives_the_limit(dtype):
    """d = 0: the clamp makes sI -> 1 (exp(-(u + a) / (b d)) -> 0), finite and as the reference."""
    mu, sigma, labels, proxies = make_inputs(6, 10, 8, dtype, requires_grad=False)
    mu[2] = proxies[5]
    mu[4] = proxies[labels[4]]
    mu, sigma, proxies = (x.clone().requires_grad_() for x in (mu, sigma, proxies))
    _, _, _, col_stats, _ = torch.ops.idml.pa_ism_forward(mu, sigma, labels, proxies, 0.1, 32.0, True, 4.0, 5.0)
    similarity = reference.introspective_similarity(mu, sigma, proxies)
    assert similarity[2, 5].item() == 1.0 and similarity[4, labels[4]].item() == 1.0
    assert torch.isfinite(col_stats).all()
    assert_matches_reference(mu, sigma, labels, proxies, 1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("ism", [True, False])
@pytest.mark.parametrize("sigma_kind", ["general", "relu"])
def test_independent_formula(ism, sigma_kind):
    mu, sigma, labels, proxies = make_inputs(
        7, 6, 5, sigma_kind=sigma_kind, labels=torch.tensor([0, 0, 3, 1, 3, 3, 0])
    )  # proxies 2, 4, 5: none
    hyper = {**HYPER, "ism": ism}
    expected, expected_grads = loss_and_grads(independent_loss, mu, sigma, labels, proxies, **hyper)
    for fn in (reference.pa_ism_loss, ops.pa_ism_loss):
        loss, grads = loss_and_grads(fn, mu, sigma, labels, proxies, **hyper)
        assert_close_rel(loss, expected, 1e-6)
        for grad, expected_grad in zip(grads, expected_grads):
            assert_close_rel(grad, expected_grad, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_proxy_anchor_equals_pytorch_metric_learning(dtype):
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    B, C, D = 48, 30, 16
    mu, sigma, labels, proxies = make_inputs(B, C, D, dtype)
    pml = pml_losses.ProxyAnchorLoss(num_classes=C, embedding_size=D).to(dtype)
    pml.proxies.data = proxies.detach().clone()
    expected = pml(mu, labels)
    expected.backward()
    mu_grad = mu.grad.clone()
    mu.grad = None
    loss = ops.pa_ism_loss(mu, sigma, labels, proxies, margin=0.1, alpha=32.0, ism=False)
    loss.backward()
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close_rel(loss, expected, rtol)
    assert_close_rel(mu.grad, mu_grad, rtol)
    assert_close_rel(proxies.grad, pml.proxies.grad, rtol)


def test_uncertainty_gradient_vanishes_only_for_normalized_sigma():
    """docs/method.md, section 2: unit-length sigma (u == 1) gets no gradient through the
    normalisation; a relu-like sigma does."""
    mu, raw_sigma, labels, proxies = make_inputs(10, 12, 8, sigma_kind="relu")
    ops.pa_ism_loss(mu, raw_sigma, labels, proxies).backward()
    relu_grad = raw_sigma.grad.abs().max()
    assert relu_grad > 1e-6
    raw_sigma.grad = None
    ops.pa_ism_loss(mu, reference.l2_normalize(raw_sigma), labels, proxies).backward()
    assert raw_sigma.grad.abs().max() < 1e-9 * relu_grad  # rounding only


def test_saved_statistics():
    """The forward saves dots = mu P^T, [|mu|^2; |sigma|^2], [|p|^2; positive and negative
    log-sum-exp] and |P+|; the loss is their combination."""
    mu, sigma, labels, proxies = make_inputs(
        8, 10, 6, requires_grad=False, labels=torch.tensor([1, 1, 2, 9, 9, 9, 1, 2])
    )
    loss, dots, row_stats, col_stats, num_positive = torch.ops.idml.pa_ism_forward(mu, sigma, labels, proxies)
    torch.testing.assert_close(dots, mu @ proxies.t())
    torch.testing.assert_close(row_stats, torch.stack([(mu * mu).sum(1), (sigma * sigma).sum(1)]))
    torch.testing.assert_close(col_stats[0], (proxies * proxies).sum(1))
    assert num_positive.item() == 3
    assert (col_stats[1][[0, 3, 4, 5, 6, 7, 8]] == 0).all() and (col_stats[1][[1, 2, 9]] > 0).all()
    torch.testing.assert_close(loss, col_stats[1].sum() / 3 + col_stats[2].sum() / 10)


def loss_via_op(*inputs):
    """The loss operator called directly, as TorchScript and C++ code call it."""
    return torch.ops.idml.pa_ism_loss(*inputs, **HYPER)


def test_backward_makes_no_gradient_for_the_statistics():
    """Only the loss is differentiable: the backward allocates no zero gradients for the
    saved statistics (one of them B x C), which are not outputs of the loss operator."""
    from torch.profiler import profile

    mu, sigma, labels, proxies = make_inputs(12, 40, 8, torch.float32)
    for loss_fn in (loss_via_op, ops.pa_ism_loss):
        loss, grad_loss = loss_fn(mu, sigma, labels, proxies), torch.ones(())
        with profile() as prof:
            grads = torch.autograd.grad(loss, (mu, sigma, proxies), grad_loss)
        calls = [event.name for event in prof.events()]
        assert calls.count("idml::pa_ism_backward") == 1
        assert "aten::zeros" not in calls, calls  # what autograd fills unused output gradients with
        assert all(torch.isfinite(g).all() for g in grads)


def test_second_derivatives_are_refused():
    """The backward kernel has no derivative of its own: differentiating the gradients
    again raises, by name (it used to give wrong second derivatives with only a warning)."""
    mu, sigma, labels, proxies = make_inputs(6, 5, 4)
    for loss_fn in (loss_via_op, ops.pa_ism_loss):
        (grad_mu,) = torch.autograd.grad(loss_fn(mu, sigma, labels, proxies), mu, create_graph=True)
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(grad_mu.sum(), mu)


def test_mixed_dtypes_are_promoted():
    """bf16 embeddings (autocast) with float32 proxies: computed in float32, gradients in
    each input's dtype."""
    mu, sigma, labels, proxies = make_inputs(16, 20, 8, torch.float32, requires_grad=False)
    mu, sigma = mu.bfloat16().requires_grad_(), sigma.bfloat16().requires_grad_()
    proxies.requires_grad_()
    loss = ops.pa_ism_loss(mu, sigma, labels, proxies)
    assert loss.dtype == torch.float32
    loss.backward()
    assert mu.grad.dtype == torch.bfloat16 and proxies.grad.dtype == torch.float32
    expected = reference.pa_ism_loss(mu.float(), sigma.float(), labels, proxies)
    assert_close_rel(loss, expected, 1e-5)


def test_rejects_labels_out_of_range():
    mu, sigma, labels, proxies = make_inputs(4, 5, 3, requires_grad=False, labels=torch.tensor([0, 1, 5, 2]))
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.idml.pa_ism_forward(mu, sigma, labels, proxies)


@pytest.mark.cuda
def test_cuda_label_out_of_range_is_a_device_side_assert():
    """Where the CPU kernel raises, the CUDA kernel asserts on the device (a host check would
    synchronise). In a child process: the assert leaves its CUDA context unusable."""
    code = (
        "import torch; from idml import ops; mu = torch.randn(4, 8, device='cuda'); "
        "labels = torch.tensor([0, 1, 5, 2], device='cuda'); "
        "ops.pa_ism_loss(mu, mu.abs(), labels, torch.randn(3, 8, device='cuda')); torch.cuda.synchronize()"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, cwd=root)
    assert result.returncode != 0 and "device-side assert" in result.stderr, result.stderr[-2000:]


def test_torchscript_calls_the_op():
    @torch.jit.script
    def scripted(mu: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
        return torch.ops.idml.pa_ism_loss(mu, sigma, labels, proxies, 0.1, 32.0, True, 4.0, 5.0)

    mu, sigma, labels, proxies = make_inputs(9, 14, 6)
    loss = scripted(mu, sigma, labels, proxies)
    assert "idml::pa_ism_loss" in str(scripted.graph)
    assert_close_rel(loss, reference.pa_ism_loss(mu, sigma, labels, proxies), 1e-12)
    loss.backward()  # the operator's C++ autograd works from TorchScript too
    assert proxies.grad is not None and torch.isfinite(proxies.grad).all()


def test_torch_compile_fullgraph():
    """aot_eager: traces through the fake kernels and the autograd formula like inductor
    does, without inductor's C++ compile (minutes on the 2-core CI machines)."""
    torch._dynamo.reset()
    compiled = torch.compile(ops.pa_ism_loss, fullgraph=True, backend="aot_eager")
    mu, sigma, labels, proxies = make_inputs(10, 17, 8, torch.float32)
    loss, grads = loss_and_grads(compiled, mu, sigma, labels, proxies, **HYPER)
    expected, expected_grads = loss_and_grads(reference.pa_ism_loss, mu, sigma, labels, proxies, **HYPER)
    assert_close_rel(loss, expected, 1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close_rel(grad, expected_grad, 1e-5)


# --- CUDA -------------------------------------------------------------------------------
# Half inputs: the product mu P^T is float32 (exact products, float32 accumulation), so the
# loss matches the float32 reference on the same values to 1e-4. Gradients pass through a
# coefficient matrix and GEMMs in the input dtype: normwise 2e-2 for bfloat16 (8-bit
# significand, 2^-9 = 2e-3 per rounding, sums of thousands of terms) and 5e-3 for float16
# (11-bit significand).
CUDA_CASES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-4, 2e-2), (torch.float16, 1e-4, 5e-3)]


@pytest.mark.cuda
def test_cuda_kernels_are_built():
    for op in ("pa_ism_forward", "pa_ism_backward", "retrieval_ranks"):
        assert ops.has_kernel(op, torch.device("cuda")), f"idml._C has no CUDA kernel for {op}"


@pytest.mark.cuda
def test_cuda_float16_gradients_survive_a_loss_scale():
    """GradScaler multiplies the loss by 2^16 before the backward: the float16 gradients are
    then exactly 2^16 times the unscaled ones (a power of two), not inf. The kernels compute
    for grad_loss = 1 and scale at the end; scaled inside, the coefficients overflowed."""
    mu, sigma, labels, proxies = make_inputs(120, 1000, 128, torch.float16, device="cuda", sigma_kind="relu")
    labels[:30] = labels[0]
    loss = ops.pa_ism_loss(mu, sigma, labels, proxies, **HYPER)
    unscaled = torch.autograd.grad(loss, (mu, sigma, proxies), retain_graph=True)
    scaled = torch.autograd.grad(loss * 2.0**16, (mu, sigma, proxies))
    for name, plain, times_scale in zip(("mu", "sigma", "proxies"), unscaled, scaled):
        assert torch.isfinite(times_scale).all(), name
        assert torch.equal(times_scale.float() / 2**16, plain.float()), name


@pytest.mark.cuda
def test_cuda_inputs_on_two_devices_are_refused_by_name():
    mu, sigma, labels, proxies = make_inputs(8, 20, 4, torch.float32, device="cuda")
    with pytest.raises(UsageError, match="sigma must be on cpu like the other inputs"):
        ops.pa_ism_loss(mu.detach().cpu(), sigma, labels, proxies)
    with pytest.raises(RuntimeError, match="all inputs must be on the same device"):  # the CUDA kernel's check
        torch.ops.idml.pa_ism_loss(mu.detach().cpu(), sigma, labels, proxies)


@pytest.mark.cuda
@pytest.mark.parametrize("ism", [True, False])
@pytest.mark.parametrize("dtype, loss_rtol, grad_rtol", CUDA_CASES)
def test_cuda_matches_reference(dtype, loss_rtol, grad_rtol, ism):
    for B, C, D, alpha in [(120, 11318, 512, 32.0), (33, 70, 40, 64.0), (1, 1, 8, 32.0), (480, 1000, 128, 32.0)]:
        mu, sigma, labels, proxies = make_inputs(B, C, D, dtype=dtype, device="cuda", sigma_kind="relu")
        if B > 4:
            labels[: B // 4] = labels[0]  # a proxy with many positives
        hyper = {**HYPER, "ism": ism, "alpha": alpha}
        loss, grads = loss_and_grads(ops.pa_ism_loss, mu, sigma, labels, proxies, **hyper)
        ref_loss, ref_grads = loss_and_grads(reference.pa_ism_loss, mu, sigma, labels, proxies, **hyper)
        assert loss.dtype == torch.float32
        assert_close_rel(loss, ref_loss, loss_rtol)
        for grad, ref_grad in zip(grads, ref_grads):
            assert grad.dtype == dtype and torch.isfinite(grad).all()
            if dtype == torch.float32:
                assert_close_rel(grad, ref_grad, grad_rtol)
            else:
                error = (grad.float() - ref_grad.float()).norm() / ref_grad.float().norm().clamp_min(1e-30)
                assert error <= grad_rtol, (dtype, B, C, error.item())


@pytest.mark.cuda
def test_cuda_opcheck_and_stream():
    mu, sigma, labels, proxies = make_inputs(9, 40, 16, torch.float32, device="cuda")
    torch.library.opcheck(torch.ops.idml.pa_ism_loss.default, (mu, sigma, labels, proxies, 0.1, 32.0, True, 4.0, 5.0))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the kernels follow the current stream
        loss = ops.pa_ism_loss(mu, sigma, labels, proxies)
    stream.synchronize()
    assert_close_rel(loss, reference.pa_ism_loss(mu, sigma, labels, proxies), 1e-5)


@pytest.mark.cuda
def test_cuda_graphs_replay_the_loss_and_its_gradients():
    """Forward and backward hold no host synchronisation and no per-call host state: captured
    in CUDA graphs (torch.cuda.make_graphed_callables, as graph-captured training loops and
    torch.compile's reduce-overhead mode do), they replay on new input values with the eager
    results."""

    def loss_fn(mu, sigma, labels, proxies):
        return ops.pa_ism_loss(mu, sigma, labels, proxies, **HYPER)

    sample = make_inputs(64, 500, 32, torch.float32, device="cuda", sigma_kind="relu")
    graphed_loss = torch.cuda.make_graphed_callables(loss_fn, sample)
    for _ in range(2):
        inputs = make_inputs(64, 500, 32, torch.float32, device="cuda", sigma_kind="relu")
        loss, grads = loss_and_grads(graphed_loss, *inputs)
        expected, expected_grads = loss_and_grads(loss_fn, *inputs)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
        for replayed, eager in zip(grads, expected_grads):
            torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
def test_cuda_edge_cases():
    for case in ("on_proxy", "no_positive_classes", "huge_C"):
        if case == "huge_C":
            mu, sigma, labels, proxies = make_inputs(24, 20000, 4, torch.float32, device="cuda")
        else:
            mu, sigma, labels, proxies = make_inputs(
                16, 40, 8, torch.float32, device="cuda", requires_grad=False, labels=torch.tensor([0, 7, 39] * 5 + [7])
            )
            if case == "on_proxy":
                mu[3] = proxies[7]
            mu, sigma, proxies = (x.clone().requires_grad_() for x in (mu, sigma, proxies))
        assert_matches_reference(mu, sigma, labels, proxies, 1e-5)


@pytest.mark.cuda
def test_cuda_float64_non_contiguous_inputs():
    """float64 is dispatched on CUDA too, and transposed/strided inputs are made contiguous:
    the reference to 1e-10 (float64 rounding only), and opcheck of the backward on CUDA."""
    B, C, D = 20, 45, 12
    mu = torch.randn(D, B, dtype=torch.float64, device="cuda").t().requires_grad_()
    sigma = torch.randn(B, 2 * D, dtype=torch.float64, device="cuda").relu()[:, ::2].requires_grad_()
    proxies = (0.5 * torch.randn(D, C, dtype=torch.float64, device="cuda")).t().requires_grad_()
    labels = torch.randint(0, C, (2 * B,), device="cuda")[::2]
    assert not any(t.is_contiguous() for t in (mu, sigma, proxies, labels))
    assert_matches_reference(mu, sigma, labels, proxies, 1e-10)
    args = (mu.detach(), sigma.detach(), labels, proxies.detach())
    _, *saved = torch.ops.idml.pa_ism_forward(*args, 0.1, 32.0, True, 4.0, 5.0)
    grad_loss = torch.tensor(0.7, dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.idml.pa_ism_backward.default, (grad_loss, *args, *saved, 0.1, 32.0, True, 4.0, 5.0))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_inputs_on_a_second_gpu():
    """The kernels run on the inputs' device, whichever device is current."""
    mu, sigma, labels, proxies = make_inputs(16, 50, 8, torch.float32, device="cuda:1")
    assert_matches_reference(mu, sigma, labels, proxies, 1e-5)
