"""slice_linear against a dense autograd reference: values, gradients, accumulation, saved memory, checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparseft.kernels import leading_slice, slice_linear
from sparseft.kernels.partial_linear import exact_delta, plus_delta, read_slice, write_slice

# (kind, d_out, d_in, k, leading dims of x)
CASES = [
    ("rows", 24, 16, 5, (7,)),
    ("rows", 48, 32, 48, (3, 4)),  # the whole weight trains
    ("rows", 40, 24, 1, (2, 3, 2)),
    ("cols", 24, 16, 3, (2, 5)),
    ("cols", 8, 40, 1, (2, 3)),
    ("cols", 16, 32, 32, (6,)),
]
TOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_case(kind, d_out, d_in, k, lead, dtype=torch.float32, bias=None, seed=0):
    """(x, frozen weight, trainable slice, bias) for slice_linear; (x, full weight, bias) copies for the dense one."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g).to(dtype)
    initial = leading_slice(w, kind, k)  # the trained slice differs from the frozen values it replaces
    t = torch.nn.Parameter((initial + 0.5 * torch.randn(initial.shape, generator=g)).to(dtype))
    x = torch.randn(*lead, d_in, generator=g).to(dtype).requires_grad_()
    b = None if bias is None else torch.randn(d_out, generator=g).to(dtype).requires_grad_(bias == "trainable")
    w_ref = w.clone()
    leading_slice(w_ref, kind, k).copy_(t.detach())
    w_ref.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    b_ref = None if b is None else b.detach().clone().requires_grad_(b.requires_grad)
    return (x, w, t, b), (x_ref, w_ref, b_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [None, "frozen", "trainable"])
@pytest.mark.parametrize("case", CASES)
def test_matches_dense_reference(case, bias, dtype):
    kind, d_out, d_in, k, lead = case
    (x, w, t, b), (x_ref, w_ref, b_ref) = make_case(kind, d_out, d_in, k, lead, dtype, bias)
    y = slice_linear(x, w, t, b, kind)
    y_ref = F.linear(x_ref, w_ref, b_ref)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)

    tol = TOL[dtype]
    assert y.shape == y_ref.shape == (*lead, d_out)
    assert rel_err(y, y_ref) < tol
    assert rel_err(x.grad, x_ref.grad) < tol
    assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
    assert rel_err(t.grad, leading_slice(w_ref.grad, kind, k)) < tol
    assert w.grad is None and not w.requires_grad
    if bias == "trainable":
        assert rel_err(b.grad, b_ref.grad) < tol
    elif bias == "frozen":
        assert b.grad is None


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_gradient_accumulation(case):
    """Two backward calls add up, including two forwards before one backward (the weight is rewritten in between)."""
    kind, d_out, d_in, k, lead = case
    (x, w, t, b), (x_ref, w_ref, _) = make_case(kind, d_out, d_in, k, lead)
    x2 = torch.randn_like(x)
    for xi in (x, x2):
        slice_linear(xi, w, t, None, kind).square().sum().backward()
        F.linear(xi.detach(), w_ref).square().sum().backward()
    assert rel_err(t.grad, leading_slice(w_ref.grad, kind, k)) < 1e-6

    t.grad = None
    w_ref.grad = None
    loss = sum(slice_linear(xi, w, t, None, kind).square().sum() for xi in (x, x2))
    loss_ref = sum(F.linear(xi.detach(), w_ref).square().sum() for xi in (x, x2))
    loss.backward()
    loss_ref.backward()
    assert rel_err(t.grad, leading_slice(w_ref.grad, kind, k)) < 1e-6


def saved_tensors(fn, exclude=()):
    """Tensors autograd saves while running fn(), minus those sharing storage with `exclude` (the weights)."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("kind", ["rows", "cols"])
def test_saves_only_what_the_slice_needs(kind):
    d_out, d_in, k, lead = 32, 64, 4, (3, 5)
    (x, w, t, _), (x_ref, w_ref, _) = make_case(kind, d_out, d_in, k, lead)
    ours = saved_tensors(lambda: slice_linear(x, w, t, None, kind), exclude=(w, t))
    dense = saved_tensors(lambda: F.linear(x_ref, w_ref), exclude=(w_ref,))
    nbytes = lambda ts: sum(s.numel() * s.element_size() for s in ts)  # noqa: E731
    x_bytes = x.numel() * x.element_size()
    assert nbytes(dense) == x_bytes
    # rows: the slice gradient g[..., :k]^T x needs all of x; cols: only x[..., :k], i.e. k/d_in of it.
    assert nbytes(ours) == (x_bytes if kind == "rows" else x_bytes * k // d_in)
    for s in ours:  # nothing saved keeps a larger tensor alive through a view
        assert s.untyped_storage().nbytes() == s.numel() * s.element_size()


@pytest.mark.parametrize("case", [CASES[1], CASES[3]])
def test_under_activation_checkpointing(case):
    kind, d_out, d_in, k, lead = case
    (x, w, t, _), _ = make_case(kind, d_out, d_in, k, lead)

    def block(inp):  # a nonlinearity after the linear, so backward needs recomputed values
        return torch.tanh(slice_linear(inp, w, t, None, kind)).square()

    block(x).sum().backward()
    gx, gt = x.grad.clone(), t.grad.clone()
    x.grad = t.grad = None
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert torch.allclose(x.grad, gx, rtol=1e-6, atol=0) and torch.allclose(t.grad, gt, rtol=1e-6, atol=0)


def test_autocast_bf16_with_fp32_parameters():
    """Mixed precision: computes like F.linear under autocast; gradients come back in the inputs' dtypes."""
    (x, w, t, _), (x_ref, w_ref, _) = make_case("cols", 24, 16, 3, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = slice_linear(x, w, t, None, "cols")
        y_ref = F.linear(x_ref, w_ref)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert t.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert rel_err(t.grad, leading_slice(w_ref.grad, "cols", 3)) < 2e-2
    assert rel_err(x.grad, x_ref.grad) < 2e-2


def test_step_between_forward_and_backward_is_caught():
    (x, w, t, _), _ = make_case("rows", 24, 16, 5, (7,))
    y = slice_linear(x, w, t, None, "rows")
    with torch.no_grad():
        t.add_(1.0)  # e.g. an optimizer step: the saved slice no longer matches the forward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_rejects_bad_arguments():
    w, x = torch.randn(8, 6), torch.randn(2, 6)
    with pytest.raises(ValueError, match="freeze it"):
        slice_linear(x, w.clone().requires_grad_(), torch.randn(2, 6), None, "rows")
    with pytest.raises(ValueError, match="not a leading cols slice"):
        slice_linear(x, w, torch.randn(2, 6), None, "cols")
    with pytest.raises(ValueError, match="kind="):
        slice_linear(x, w, torch.randn(2, 6), None, "heads")
    with pytest.raises(ValueError, match="k=0"):
        slice_linear(x, w, torch.randn(0, 6), None, "rows")
    # Every way a slice can fail to fit (w is (8, 6)); and the largest ones that do.
    for t, kind, index in [
        (torch.randn(9, 6), "rows", None),  # more rows than the weight
        (torch.randn(2, 5), "rows", None),  # not every input column
        (torch.randn(2, 6, 1), "rows", None),
        (torch.randn(8, 7), "cols", None),  # more columns than the weight
        (torch.randn(8), "cols", None),
        (torch.randn(2, 6), "rows", torch.tensor([0, 1, 2])),  # index longer than the slice
        (torch.randn(8, 2), "cols", torch.tensor([[0, 1]])),  # a 2-D index
    ]:
        with pytest.raises(ValueError, match="trainable is not a"):
            slice_linear(x, w, t, None, kind, index)
    with pytest.raises(ValueError, match=r"^trainable \(2, 5\), weight \(8, 6\): trainable is not a leading rows"):
        slice_linear(x, w, torch.randn(2, 5), None, "rows")  # the message names both shapes
    assert slice_linear(x, w, torch.randn(8, 6), None, "rows").shape == (2, 8)
    assert slice_linear(x, w, torch.randn(8, 6), None, "cols").shape == (2, 8)
    assert slice_linear(x, w, torch.randn(8, 2), None, "cols", torch.tensor([5, 0])).shape == (2, 8)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_backward_uses_the_trained_slice_whatever_the_weight_holds(case):
    """Under ZeRO-3 the frozen weight is released after forward and re-gathered for backward from its partition,
    which holds the base values, not the trained slice; after a resume the two differ from the first step. The input
    gradient must still be that of the live weight (the dense reference), so backward writes the slice again."""
    kind, d_out, d_in, k, lead = case
    (x, w, t, _), (x_ref, w_ref, _) = make_case(kind, d_out, d_in, k, lead)
    base = w.clone()  # the base values: make_case's trainable slice differs from them
    y = slice_linear(x, w, t, None, kind)
    with torch.no_grad():
        w.copy_(base)  # what a re-gather from the partition gives back
    gy = torch.randn_like(y)
    y.backward(gy)
    F.linear(x_ref, w_ref).backward(gy)
    assert rel_err(x.grad, x_ref.grad) < 1e-6
    assert rel_err(t.grad, leading_slice(w_ref.grad, kind, k)) < 1e-6


@pytest.mark.parametrize("kind", ["rows", "cols"])
def test_indexed_slice_matches_dense_reference(kind):
    """With `index` the trainable part is those rows / columns, in index order (S2FT's per-q-head unit): the dense
    reference places trainable[i] at index[i] by hand. Non-square, so rows and columns cannot be confused."""
    d_out, d_in, lead = 12, 7, (2, 3)
    index = torch.tensor([4, 0, 5])  # unsorted
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d_out, d_in, generator=g)
    t = torch.nn.Parameter(torch.randn((3, d_in) if kind == "rows" else (d_out, 3), generator=g))
    x = torch.randn(*lead, d_in, generator=g).requires_grad_()
    w_ref = w.clone()
    for i, j in enumerate(index.tolist()):
        if kind == "rows":
            w_ref[j] = t.detach()[i]
        else:
            w_ref[:, j] = t.detach()[:, i]
    w_ref.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()

    y = slice_linear(x, w, t, None, kind, index)
    assert torch.equal(w, w_ref.detach())  # the frozen weight now holds the live values
    y_ref = F.linear(x_ref, w_ref)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    y_ref.backward(gy)
    assert rel_err(y, y_ref) < 1e-6 and rel_err(x.grad, x_ref.grad) < 1e-6
    ref_t = w_ref.grad[index] if kind == "rows" else w_ref.grad[:, index]
    assert rel_err(t.grad, ref_t) < 1e-6

    # read_slice / write_slice on their own: the indexed values, written back cast to the weight's dtype.
    assert torch.equal(read_slice(w, kind, 3, index), t.detach())
    half = w.to(torch.bfloat16)
    write_slice(half, torch.zeros_like(t), kind, 3, index)
    expect = w_ref.detach().to(torch.bfloat16)
    if kind == "rows":
        expect[index] = 0
    else:
        expect[:, index] = 0
    assert torch.equal(half, expect)


def test_exact_delta_round_trips_bit_for_bit():
    """exact_delta stays fp32 where fp32 subtraction is exact (small updates), so exports are not doubled in size,
    and falls back to float64 where it is not (a weight that crossed zero far from its base); either way
    plus_delta(base, delta) gives the trained values back exactly."""
    base = torch.tensor([1.0, 0.5, -2.0, 3.0])
    near = torch.tensor([1.001, 0.49, -2.01, 2.9])  # within a factor of two of base: Sterbenz, exact in fp32
    d = exact_delta(near, base)
    assert d.dtype == torch.float32
    assert torch.equal(d, near - base)
    assert torch.equal(plus_delta(base, d), near)
    far = torch.tensor([1.0, 0.5, -2.0, -1.2345678e-3])  # 3.0 -> -0.0012345678: 3.0 + fp32(t - 3.0) != t
    assert not torch.equal(base + (far - base), far)
    d = exact_delta(far, base)
    assert d.dtype == torch.float64
    assert torch.equal(plus_delta(base, d).float(), far)
    assert torch.equal(d, far.double() - base.double())
    bf = base.to(torch.bfloat16)  # a bf16 weight under fp32 masters
    d = exact_delta(near, bf)
    assert d.dtype == torch.float32 and torch.equal(plus_delta(bf, d), near)


def test_plus_delta_computes_in_fp32_on_the_base_device():
    """base + delta is summed in fp32 whatever the two are stored in (a bf16 sum would round twice) and lands on the
    base's device: an adapter's deltas are read on the CPU and applied to a model elsewhere (meta stands in here)."""
    base = torch.tensor([1.0, 256.0, -3.0]).to(torch.bfloat16)
    delta = torch.tensor([2.0 ** -9, 1.0, 2.0 ** -7]).to(torch.bfloat16)  # each one below base's bf16 rounding step
    out = plus_delta(base, delta)
    assert out.dtype == torch.float32
    assert torch.equal(out, base.float() + delta.float())
    assert not torch.equal(out.to(torch.bfloat16).float(), out)  # the fp32 sum is not a bf16 number
    assert plus_delta(base.float().double(), delta.double()).dtype == torch.float64
    meta = plus_delta(torch.empty(3, device="meta"), torch.ones(3))
    assert meta.device.type == "meta" and meta.dtype == torch.float32
