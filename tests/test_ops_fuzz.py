"""Bad input to the compiled operators (torch.ops.idml.*) and their Python face (idml.ops)
raises an exception with a message; it never crashes and never returns a wrong number.

The fuzzing runs in a child process (this file run as a script), so that a segfault fails
the tests instead of killing pytest: seeded random inputs, valid ones given one or two
mutations (wrong shapes, int/half/bool dtypes, the meta device, strided and expanded
views, empty tensors, non-finite values, labels out of range, bad hyperparameters). Each
call must either raise RuntimeError/ValueError with a message (the Python face: a
UsageError, but for a label out of range, which only the kernel sees) or succeed with
what idml/reference.py (or, for the metrics, a loop written here) gives for the same
values. Then targeted tests for the cases an adversarial user found.
"""

import math
import os
import random
import subprocess
import sys
import traceback

import pytest
import torch

from idml import ops, reference
from idml.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 21
CASES_PER_OP = 250
OPS = [
    "pa_ism_forward",
    "pa_ism_backward",
    "pa_ism_loss",
    "retrieval_ranks",
    "face.pa_ism_loss",
    "face.retrieval_ranks",
    "face.retrieval_metrics",
    "face.metrics_from_ranks",
]


# --- mutations ----------------------------------------------------------------------------


def mutate_tensor(rng: random.Random, t: torch.Tensor, values: bool, label_classes: "int | None" = None):
    """(t with one random change, the change's name). values=False: only changes that keep the
    values (views) or that the operators must refuse (shape, dtype, device)."""
    kinds = ["strided", "shape", "dtype", "meta", "empty"]
    if values:
        kinds += ["expanded", "nonfinite" if label_classes is None else "label_range"]
    kind = rng.choice(kinds)
    if kind == "strided":  # the same values, not contiguous
        if t.dim() == 2:
            return (t.t().contiguous().t() if rng.random() < 0.5 else torch.stack([t, t], 2)[:, :, 0]), kind
        return (torch.stack([t, t], -1)[..., 0] if t.dim() else t), kind
    if kind == "shape":
        options = [
            lambda: t.unsqueeze(0),
            lambda: t.reshape(-1),
            lambda: t[:-1] if t.dim() else t.reshape(1),
            lambda: torch.cat([t, t[:1]]) if t.dim() and t.shape[0] else t.reshape(1, 1, -1),
            lambda: t.reshape(()) if t.numel() == 1 else t.unsqueeze(-1),
        ]
        return rng.choice(options)(), kind
    if kind == "dtype":
        dtype = rng.choice([torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.bool, torch.float64])
        return t.to(dtype), f"dtype {dtype}"
    if kind == "meta":
        return t.to("meta"), kind
    if kind == "empty":  # no rows, or (matrices) no columns
        return (t[:, :0] if t.dim() == 2 and rng.random() < 0.5 else t[:0] if t.dim() else t.reshape(1)[:0]), kind
    if kind == "expanded":  # stride 0: every row a copy of the first
        return (t[:1].expand(t.shape[0], *t.shape[1:]) if t.dim() and t.shape[0] else t), kind
    if kind == "label_range":
        return set_one(rng, t, rng.choice([-1, label_classes])), kind
    return set_one(rng, t, rng.choice([math.nan, math.inf, -math.inf])) if t.is_floating_point() else t, kind


def set_one(rng: random.Random, t: torch.Tensor, value) -> torch.Tensor:
    """A copy of t with one random element set to `value`."""
    t = t.clone(memory_format=torch.contiguous_format)
    if t.numel() and t.device.type != "meta":
        t.view(-1)[rng.randrange(t.numel())] = value
    return t


def mutate(rng: random.Random, tensors: dict, values: bool, classes: "dict[str, int] | None" = None) -> list:
    """Applies one or two mutations to random entries of `tensors` (in place); their names.
    classes: the number of classes of each labels tensor (an out-of-range label is C)."""
    done = []
    for name in rng.sample(sorted(tensors), rng.choice([1, 1, 2])):
        tensors[name], kind = mutate_tensor(rng, tensors[name], values, (classes or {}).get(name))
        done.append(f"{name}: {kind}")
    return done


def pa_ism_inputs(rng: random.Random) -> "tuple[dict, dict]":
    B, C, D = rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 5)
    dtype = rng.choice([torch.float32, torch.float64])
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    tensors = dict(
        mu=torch.randn(B, D, generator=g, dtype=dtype) * 2,
        sigma=torch.randn(B, rng.choice([D, rng.randint(0, 4)]), generator=g, dtype=dtype),
        labels=torch.randint(0, C, (B,), generator=g),
        proxies=torch.randn(C, D, generator=g, dtype=dtype),
    )
    hyper = dict(margin=0.1, alpha=rng.choice([32.0, 8.0]), ism=rng.random() < 0.7, ism_offset=4.0, ism_scale=5.0)
    return tensors, hyper


def mutate_hyper(rng: random.Random, hyper: dict) -> list:
    """Sometimes one hyperparameter out of its range (alpha and ism_scale must be positive)."""
    if rng.random() < 0.8:
        return []
    name = rng.choice(["margin", "alpha", "ism_offset", "ism_scale"])
    hyper[name] = rng.choice([math.nan, math.inf, -math.inf] + ([0.0, -1.0] if name in ("alpha", "ism_scale") else []))
    return [f"{name}={hyper[name]}"]


def grid_rows(g: torch.Generator, n: int, d: int) -> torch.Tensor:
    """Multiples of 1/2 in [-1, 1]: every dot product exact, many exact ties."""
    return torch.randint(-2, 3, (n, d), generator=g).float() / 2


def retrieval_inputs(rng: random.Random) -> "tuple[dict, dict]":
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    n, d = rng.randint(0, 12), rng.randint(1, 4)
    tensors = dict(emb=grid_rows(g, n, d), labels=torch.randint(0, 4, (n,), generator=g))
    if rng.random() < 0.5:
        m = rng.randint(0, 10)
        tensors.update(reference=grid_rows(g, m, d), reference_labels=torch.randint(0, 4, (m,), generator=g))
    args = dict(
        max_r=rng.choice([1, 3, 1023]), max_k=rng.choice([1, 4, 100]), precision=rng.choice(["fp32", "tf32", "bf16"])
    )
    return tensors, args


def mutate_retrieval_args(rng: random.Random, tensors: dict, args: dict) -> list:
    r = rng.random()
    if r < 0.1:
        name = rng.choice(["max_r", "max_k"])
        args[name] = rng.choice([0, -1])
        return [f"{name}={args[name]}"]
    if r < 0.15:
        args["precision"] = rng.choice(["fp16", ""])
        return [f"precision={args['precision']!r}"]
    if r < 0.2 and "reference" in tensors:
        del tensors["reference_labels"]
        return ["reference_labels: dropped"]
    return []


# --- oracles --------------------------------------------------------------------------------


def as_float64(*tensors):
    return [t.detach().to("cpu", torch.float64).requires_grad_() for t in tensors]


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: "tuple[float, float]", what: str) -> None:
    """Within (rtol, atol) of the float64 value, NaN where it is NaN. The fuzzing looks for
    garbage (unread memory, wrong strides, other elements), not for the last bits: the
    kernels' accuracy is tests/test_pa_ism_op.py's."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} instead of {tuple(expected.shape)}"
    actual = actual.detach().to("cpu", torch.float64)
    torch.testing.assert_close(
        actual, expected.detach(), rtol=tol[0], atol=tol[1], equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def tolerance(*tensors) -> "tuple[float, float]":
    """(rtol, atol) for results computed from these inputs (the loss and gradients are O(1)
    to O(alpha); float32 sums of such terms cancel down to 1e-7 absolute)."""
    dtypes = {t.dtype for t in tensors}
    if dtypes == {torch.float64}:
        return 1e-9, 1e-11
    return (1e-2, 1e-3) if dtypes & {torch.float16, torch.bfloat16} else (1e-3, 1e-5)


def expected_loss_and_grads(mu, sigma, labels, proxies, hyper, grad_loss=1.0):
    mu64, sigma64, proxies64 = as_float64(mu, sigma, proxies)
    loss = reference.pa_ism_loss(mu64, sigma64, labels.to("cpu"), proxies64, **hyper)
    grads = torch.autograd.grad(loss * grad_loss, (mu64, sigma64, proxies64), allow_unused=True)
    return loss, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (mu64, sigma64, proxies64))]


def check_loss(loss, mu, sigma, labels, proxies, hyper) -> None:
    expected, expected_grads = expected_loss_and_grads(mu, sigma, labels, proxies, hyper)
    tol = tolerance(mu, sigma, proxies)
    assert loss.dim() == 0, f"loss of shape {tuple(loss.shape)}"
    assert_close_scaled(loss, expected, tol, "loss")
    pairs = [(x, expected_grad) for x, expected_grad in zip((mu, sigma, proxies), expected_grads) if x.requires_grad]
    if pairs:
        grads = torch.autograd.grad(loss, [x for x, _ in pairs], allow_unused=True)
        for grad, (x, expected_grad) in zip(grads, pairs):
            grad = torch.zeros_like(x) if grad is None else grad
            assert grad.dtype == x.dtype, f"gradient of dtype {grad.dtype} for an input of {x.dtype}"
            assert_close_scaled(grad, expected_grad, max(tol, tolerance(x)), "gradient")


def check_forward(out, mu, sigma, labels, proxies, hyper) -> None:
    loss, dots, row_stats, col_stats, num_positive = out
    expected, _ = expected_loss_and_grads(mu, sigma, labels, proxies, hyper)
    tol = tolerance(mu, sigma, proxies)
    assert_close_scaled(loss, expected, tol, "loss")
    mu64, sigma64, proxies64 = (x.detach().double() for x in as_float64(mu, sigma, proxies))
    assert_close_scaled(dots, mu64 @ proxies64.t(), tol, "dots")
    assert_close_scaled(row_stats, torch.stack([(mu64 * mu64).sum(1), (sigma64 * sigma64).sum(1)]), tol, "row_stats")
    assert_close_scaled(col_stats[0], (proxies64 * proxies64).sum(1), tol, "col_stats")
    assert num_positive.item() == labels.unique().numel(), "num_positive"


def check_backward(out, grad_loss, mu, sigma, labels, proxies, hyper) -> None:
    _, expected_grads = expected_loss_and_grads(mu, sigma, labels, proxies, hyper, grad_loss.item())
    tol = tolerance(mu, sigma, proxies)
    for grad, x, expected_grad in zip(out, (mu, sigma, proxies), expected_grads):
        assert grad.dtype == x.dtype and grad.device == x.device, "gradient dtype or device"
        assert_close_scaled(grad, expected_grad, tol, "gradient")


def check_ranks(out, tensors, args) -> None:
    ranks, num_relevant = out
    cpu = {name: t.to("cpu") for name, t in tensors.items()}
    expected_ranks, expected_num_relevant = reference.retrieval_ranks(
        cpu["emb"],
        cpu["labels"],
        args["max_r"],
        args["precision"],
        cpu.get("reference"),
        cpu.get("reference_labels"),
        args["max_k"],
    )
    assert torch.equal(num_relevant.cpu(), expected_num_relevant), "num_relevant differs from the reference"
    assert torch.equal(ranks.cpu(), expected_ranks), "ranks differ from the reference"


def metrics_by_loop(ranks: torch.Tensor, num_relevant: torch.Tensor, ks) -> dict:
    """R@K, RP and MAP@R as metrics_from_ranks documents them, one query at a time."""
    ranks, num_relevant = ranks.tolist(), num_relevant.tolist()
    n = len(num_relevant)
    result = {f"R@{k}": sum(1 for row in ranks if row and 0 < row[0] <= k) / n for k in ks}
    with_relevant = [q for q in range(n) if num_relevant[q] > 0]
    rp = ap = 0.0
    for q in with_relevant:
        R = num_relevant[q]
        counted = [(t + 1, rank) for t, rank in enumerate(ranks[q]) if 0 < rank <= R]
        rp += len(counted) / R
        ap += sum(t / rank for t, rank in counted) / R
    result["RP"] = rp / max(1, len(with_relevant))
    result["MAP@R"] = ap / max(1, len(with_relevant))
    return result


def check_metrics(result: dict, expected: dict) -> None:
    assert list(result) == list(expected), f"keys {list(result)}"
    for key, value in expected.items():
        assert type(result[key]) is float and math.isfinite(result[key]), f"{key} = {result[key]!r}"
        assert abs(result[key] - value) <= 1e-12, f"{key} = {result[key]} instead of {value}"


# --- the cases ------------------------------------------------------------------------------


def case(op: str, rng: random.Random):
    """(notes on its mutations, call, check(result), whether it is the Python face): a random
    case of `op`."""
    raw = torch.ops.idml
    if op in ("pa_ism_forward", "pa_ism_loss", "face.pa_ism_loss"):
        tensors, hyper = pa_ism_inputs(rng)
        notes = mutate(rng, tensors, values=True, classes={"labels": tensors["proxies"].shape[0]})
        notes += mutate_hyper(rng, hyper)
        if op != "pa_ism_forward":  # differentiable where floating
            for name in ("mu", "sigma", "proxies"):
                if tensors[name].is_floating_point() and rng.random() < 0.7:
                    tensors[name] = tensors[name].detach().requires_grad_()
        if op == "face.pa_ism_loss" and rng.random() < 0.1:
            name = rng.choice(["mu", "labels", "margin"])
            (tensors if name != "margin" else hyper)[name] = rng.choice([[1.0, 2.0], "0.1", None])
            notes.append(f"{name}: not a tensor/number")
        t, h = tensors, hyper
        args = (t["mu"], t["sigma"], t["labels"], t["proxies"])
        hyper_args = (h["margin"], h["alpha"], h["ism"], h["ism_offset"], h["ism_scale"])
        if op == "pa_ism_forward":
            return (
                notes,
                lambda: raw.pa_ism_forward(*args, *hyper_args),
                lambda out: check_forward(out, *args, h),
                False,
            )
        call = (
            (lambda: raw.pa_ism_loss(*args, *hyper_args))
            if op == "pa_ism_loss"
            else (lambda: ops.pa_ism_loss(*args, **h))
        )
        return notes, call, lambda out: check_loss(out, *args, h), op.startswith("face.")
    if op == "pa_ism_backward":
        tensors, hyper = pa_ism_inputs(rng)
        hyper_args = tuple(hyper.values())
        saved = raw.pa_ism_forward(tensors["mu"], tensors["sigma"], tensors["labels"], tensors["proxies"], *hyper_args)
        names = ["grad_loss", "mu", "sigma", "labels", "proxies", "dots", "row_stats", "col_stats", "num_positive"]
        grad_loss = torch.tensor(rng.choice([1.0, 0.7, -2.0]), dtype=saved[0].dtype)
        args = dict(
            zip(names, [grad_loss, tensors["mu"], tensors["sigma"], tensors["labels"], tensors["proxies"], *saved[1:]])
        )
        notes = mutate(rng, args, values=False) + mutate_hyper(rng, hyper)
        hyper_args = tuple(hyper.values())
        a = list(args.values())
        return (
            notes,
            lambda: raw.pa_ism_backward(*a, *hyper_args),
            lambda out: check_backward(out, args["grad_loss"], *a[1:5], hyper),
            False,
        )
    if op in ("retrieval_ranks", "face.retrieval_ranks", "face.retrieval_metrics"):
        tensors, args = retrieval_inputs(rng)
        notes = mutate(rng, tensors, values=True) + mutate_retrieval_args(rng, tensors, args)
        t = tensors
        if op == "retrieval_ranks":

            def call():
                return raw.retrieval_ranks(
                    t["emb"],
                    t["labels"],
                    t.get("reference"),
                    t.get("reference_labels"),
                    args["max_r"],
                    args["max_k"],
                    args["precision"],
                )

            return notes, call, lambda out: check_ranks(out, t, args), False
        if op == "face.retrieval_ranks":

            def call():
                return ops.retrieval_ranks(
                    t["emb"],
                    t["labels"],
                    args["max_r"],
                    args["precision"],
                    t.get("reference"),
                    t.get("reference_labels"),
                    args["max_k"],
                )

            return notes, call, lambda out: check_ranks(out, t, args), True
        ks = rng.choice([(1, 2, 4), (1,), (3, 1)])
        if rng.random() < 0.15:
            ks = rng.choice([(), (0, 1), (-1,), (1.5,), 4, None])
            notes.append(f"ks={ks!r}")

        def call():
            return ops.retrieval_metrics(
                t["emb"],
                t["labels"],
                ks,
                args["max_r"],
                args["precision"],
                t.get("reference"),
                t.get("reference_labels"),
            )

        def check(result):
            ranks = reference.retrieval_ranks(
                t["emb"].cpu(),
                t["labels"].cpu(),
                args["max_r"],
                args["precision"],
                *(x.cpu() if x is not None else None for x in (t.get("reference"), t.get("reference_labels"))),
                max(ks),
            )
            check_metrics(result, metrics_by_loop(*ranks, ks))

        return notes, call, check, True
    if op == "face.metrics_from_ranks":
        tensors, args = retrieval_inputs(rng)
        ranks, num_relevant = reference.retrieval_ranks(tensors["emb"], tensors["labels"], args["max_r"])
        t = dict(ranks=ranks, num_relevant=num_relevant)
        notes = mutate(rng, t, values=True)
        if rng.random() < 0.2:
            name = rng.choice(["ranks", "num_relevant"])
            if not t[name].is_floating_point():
                t[name] = set_one(rng, t[name], -1)
                notes.append(f"{name}: a negative value")
        ks = rng.choice([(1, 2, 4), (1,), (2, 8)]) if rng.random() < 0.85 else rng.choice([(), (0,), [1, -3], 2.0])
        return (
            notes + [f"ks={ks!r}"],
            lambda: ops.metrics_from_ranks(t["ranks"], t["num_relevant"], ks),
            lambda result: check_metrics(result, metrics_by_loop(t["ranks"], t["num_relevant"], ks)),
            True,
        )
    raise ValueError(op)


def run_cases(ops_to_run, seed: int, count: int) -> int:
    """Runs the cases, printing each before its call (the last line names a crashing case)."""
    bad = 0
    for op in ops_to_run:
        rng = random.Random(f"{seed}-{op}")
        outcomes = {"ok": 0, "raised": 0}
        for i in range(count):
            notes, call, check, face = case(op, rng)
            print(f"CASE {op} {i} {'; '.join(notes) or 'valid'}", flush=True)
            try:
                out = call()
            except (RuntimeError, ValueError) as error:
                message = str(error).strip()
                allowed = (isinstance(error, UsageError) or "outside [0," in message) if face else True
                if not message or not allowed:
                    bad += 1
                    print(f"BAD {op} {i}: {type(error).__name__} ({message[:300]!r})", flush=True)
                outcomes["raised"] += 1
                continue
            except Exception as error:  # noqa: BLE001 (any other type is what the test reports)
                bad += 1
                print(f"BAD {op} {i}: {type(error).__name__}: {str(error)[:300]}", flush=True)
                continue
            try:
                check(out)
                outcomes["ok"] += 1
            except Exception as error:  # noqa: BLE001
                bad += 1
                print(
                    f"BAD {op} {i}: succeeded with a wrong result: {type(error).__name__}: {str(error)[:500]}",
                    flush=True,
                )
                traceback.print_exc(limit=3, file=sys.stdout)
        print(f"DONE {op} {outcomes['ok']} {outcomes['raised']}", flush=True)
    return bad


# --- the tests ----------------------------------------------------------------------------------

needs_ops = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason="idml._C is not built")


def run_child(args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def fuzz_output():
    """One child runs every op's cases (one interpreter start-up, on CI's two cores)."""
    selected = OPS if ops.EXTENSION_ERROR is None else [op for op in OPS if op.startswith("face.")]
    result = run_child([os.path.abspath(__file__), str(SEED), str(CASES_PER_OP), *selected])
    return result, selected


@pytest.mark.parametrize("op", OPS)
def test_fuzz(fuzz_output, op):
    result, selected = fuzz_output
    if op not in selected:
        pytest.skip("idml._C is not built")
    lines = result.stdout.splitlines()
    cases = [line for line in lines if line.startswith(f"CASE {op} ")]
    bad = [line for line in lines if line.startswith(f"BAD {op} ")]
    done = [line for line in lines if line.startswith(f"DONE {op} ")]
    where = cases[-1] if cases else "before its first case"
    assert done, (
        f"the child died (exit code {result.returncode}) at {where}:\n{(result.stdout + result.stderr)[-3000:]}"
    )
    assert not bad, "\n".join(bad[:20])
    ok, raised = map(int, done[0].split()[2:])
    assert ok + raised == CASES_PER_OP
    assert ok >= 5 and raised >= 10, f"{op}: {ok} succeeded, {raised} raised: the fuzzing lost its variety"


def run_in_child(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter, after `import torch` and `from idml import ops`."""
    return run_child(["-c", "import torch\nfrom idml import ops\n" + code], timeout=120)


@needs_ops
def test_backward_refuses_saved_tensors_of_the_wrong_shape():
    """The backward operator used to trust its saved tensors: a small `dots` for a large
    batch read far out of bounds (a segfault). In a child, so that a crash fails the test."""
    code = """
B, C, D = 1024, 1024, 4
mu, sigma, proxies = torch.randn(B, D), torch.randn(B, D), torch.randn(C, D)
labels = torch.randint(0, C, (B,))
saved = list(torch.ops.idml.pa_ism_forward(mu, sigma, labels, proxies))
wrong = {1: torch.zeros(1, 1), 2: torch.zeros(2, 1), 3: torch.zeros(3, 1), 4: torch.zeros(2)}
names = {1: "dots", 2: "row_stats", 3: "col_stats", 4: "num_positive"}
for index, tensor in wrong.items():
    args = saved[1:]
    args[index - 1] = tensor
    try:
        torch.ops.idml.pa_ism_backward(torch.tensor(1.0), mu, sigma, labels, proxies, *args)
    except RuntimeError as error:
        assert names[index] in str(error) and "shape" in str(error), str(error)
        print("refused", names[index])
    else:
        print("accepted", names[index])
"""
    result = run_in_child(code)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.split("\n")[:4] == [
        f"refused {name}" for name in ("dots", "row_stats", "col_stats", "num_positive")
    ], result.stdout


def small_loss_inputs():
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(6, 4, generator=g),
        torch.randn(6, 4, generator=g),
        torch.tensor([0, 1, 2, 0, 1, 2]),
        torch.randn(5, 4, generator=g),
    )


@needs_ops
def test_meta_proxies_are_refused():
    """Proxies on the meta device used to dispatch to the fake kernel, which returned an
    uninitialised CPU scalar (5e31) as the loss."""
    mu, sigma, labels, proxies = small_loss_inputs()
    with pytest.raises(UsageError, match="proxies is on the meta device"):
        ops.pa_ism_loss(mu, sigma, labels, proxies.to("meta"))
    for op in (torch.ops.idml.pa_ism_loss, torch.ops.idml.pa_ism_forward):
        with pytest.raises(RuntimeError, match="meta device"):
            op(mu, sigma, labels, proxies.to("meta"))
    with pytest.raises(RuntimeError, match="meta device"):
        torch.ops.idml.pa_ism_loss(mu.to("meta"), sigma.to("meta"), labels.to("meta"), proxies.to("meta"))


def eight_rows():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 4, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


@pytest.mark.parametrize("rows", ["all", "one"])
def test_retrieval_refuses_nan_embeddings(rows):
    """NaN similarities compare false with everything: all-NaN embeddings gave 1.0 for every
    metric, one NaN row of 8 a wrong R@1."""
    emb, labels = eight_rows()
    if rows == "all":
        emb[:] = math.nan
    else:
        emb[3, 1] = math.nan
    count = 8 if rows == "all" else 1
    with pytest.raises(UsageError, match=f"{count} of 8 rows of emb hold NaN or infinite values"):
        ops.retrieval_metrics(emb, labels)
    gallery = eight_rows()[0]
    with pytest.raises(UsageError, match="rows of reference hold NaN"):
        ops.retrieval_ranks(gallery, labels, reference=emb, reference_labels=labels)
    if ops.EXTENSION_ERROR is None:
        with pytest.raises(RuntimeError, match="must be finite"):
            torch.ops.idml.retrieval_ranks(emb, labels, None, None, 1023, 8, "fp32")
        with pytest.raises(RuntimeError, match="must be finite"):
            torch.ops.idml.retrieval_ranks(gallery, labels, emb.double(), labels, 1023, 8, "fp32")


def test_retrieval_refuses_zero_width_and_one_dimensional_embeddings():
    """N x 0 embeddings are all equal (they gave R@1 0.4); 1-D ones raised a raw exception."""
    emb, labels = eight_rows()
    with pytest.raises(UsageError, match="emb must have at least one column"):
        ops.retrieval_metrics(emb[:, :0], labels)
    with pytest.raises(UsageError, match="emb must have 2 dimensions"):
        ops.retrieval_metrics(emb[:, 0], labels)
    if ops.EXTENSION_ERROR is None:
        with pytest.raises(RuntimeError, match="at least one column"):
            torch.ops.idml.retrieval_ranks(emb[:, :0], labels, None, None, 1023, 8, "fp32")


def test_retrieval_refuses_bad_ks_and_mismatched_labels():
    emb, labels = eight_rows()
    for ks in [(), (0, 1), (1.5,), 3]:
        with pytest.raises(UsageError, match="ks must be one or more positive integers"):
            ops.retrieval_metrics(emb, labels, ks=ks)
    with pytest.raises(UsageError, match=r"labels must hold one label per row of emb \(8\), got 7"):
        ops.retrieval_metrics(emb, labels[:7])
    with pytest.raises(UsageError, match="reference_labels must hold one label per row of reference"):
        ops.retrieval_metrics(emb, labels, reference=emb, reference_labels=labels[:5])
    with pytest.raises(UsageError, match="give both reference and reference_labels"):
        ops.retrieval_ranks(emb, labels, reference=emb)
    ranks, num_relevant = ops.retrieval_ranks(emb, labels)
    with pytest.raises(UsageError, match="ranks must have one row per query"):
        ops.metrics_from_ranks(ranks[:5], num_relevant)
    with pytest.raises(UsageError, match="must not be negative"):
        ops.metrics_from_ranks(-ranks, num_relevant)


def test_loss_refuses_bad_shapes_and_hyperparameters_but_not_nan_values():
    mu, sigma, labels, proxies = small_loss_inputs()
    with pytest.raises(UsageError, match="mu, sigma and labels must have one row per sample"):
        ops.pa_ism_loss(mu, sigma, labels[:5], proxies)
    with pytest.raises(UsageError, match="proxies must hold at least one proxy of mu's width 4"):
        ops.pa_ism_loss(mu, sigma, labels, proxies[:, :3])
    with pytest.raises(UsageError, match="labels must hold integers"):
        ops.pa_ism_loss(mu, sigma, labels.float(), proxies)
    for name, value in [("alpha", 0.0), ("ism_scale", -5.0), ("margin", math.nan)]:
        with pytest.raises(UsageError, match=f"{name} must be a"):
            ops.pa_ism_loss(mu, sigma, labels, proxies, **{name: value})
        if ops.EXTENSION_ERROR is None:
            hyper = {**dict(margin=0.1, alpha=32.0, ism=True, ism_offset=4.0, ism_scale=5.0), name: value}
            with pytest.raises(RuntimeError, match=f"{name} must be"):
                torch.ops.idml.pa_ism_forward(mu, sigma, labels, proxies, *hyper.values())
    # A NaN embedding is how a diverging run shows: a NaN loss, not an exception.
    mu[2, 1] = math.nan
    assert torch.isnan(ops.pa_ism_loss(mu, sigma, labels, proxies))
    assert torch.isnan(reference.pa_ism_loss(mu, sigma, labels, proxies))


def test_loss_checks_add_no_host_synchronisation():
    """The loss runs every training step: its checks read metadata only (no value is read
    back, so on a GPU nothing waits)."""
    from torch.profiler import profile

    mu, sigma, labels, proxies = small_loss_inputs()
    with profile() as prof:
        ops.pa_ism_loss(mu, sigma, labels, proxies)
    calls = {event.name for event in prof.events()}
    assert not calls & {"aten::item", "aten::_local_scalar_dense", "aten::isfinite", "aten::is_nonzero"}, calls


if __name__ == "__main__":  # the child: python tests/test_ops_fuzz.py SEED COUNT OP...
    torch.set_num_threads(1)
    sys.exit(1 if run_cases(sys.argv[3:], int(sys.argv[1]), int(sys.argv[2])) else 0)
