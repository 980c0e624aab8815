"""Partial backprop for a linear whose trainable part is a leading slice of its weight (S2FT).

`weight` (d_out, d_in) is frozen. `trainable` replaces either its first k rows (kind="rows": q/k/v/up/gate, the
trainable part is on the output side) or its first k columns (kind="cols": o/down, the trainable part is on the input
side). The effective weight is W' = weight with that slice replaced by `trainable`.

Forward: the slice values are written into the frozen weight's slice region (in place, no grad), then one full matmul.
Measured on 2 CPU cores, x (1024, d_in), 768x3072 weights, k = 5%: the write + one matmul costs the same as a dense
F.linear, while splitting the matmul in two (or computing the full product and overwriting k outputs) was up to ~6%
slower in fp32 and bf16, and its backward would need two matmuls plus a cat/add for the input gradient as well.

Backward: the input gradient goes through the full live weight; the weight gradient is computed for the slice only.
Only what that needs is saved: x for rows (grad = g[..., :k]^T x) and a compact copy of x[..., :k] for cols
(grad = g^T x[..., :k]); a saved view would keep the whole x alive.

With `index` (a 1-D long tensor) the trainable part is those rows / columns instead of the leading k, in index order:
S2FT's per-q-head unit trains o's columns of single q heads, which cannot be permuted to the front without breaking
grouped-query attention's q->kv pairing.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Kind = Literal["rows", "cols"]
KINDS: tuple[str, ...] = ("rows", "cols")


def leading_slice(weight: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """View of the first k rows (kind="rows") or first k columns (kind="cols") of a (d_out, d_in) weight."""
    if kind == "rows":
        return weight[:k]  # (k, d_in)
    if kind == "cols":
        return weight[:, :k]  # (d_out, k)
    raise ValueError(f"kind={kind!r}: must be one of {KINDS}")


@torch.no_grad()
def exact_delta(trained: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """trained - base, such that `plus_delta(base, delta)` gives `trained` back bit for bit.

    In fp32 as a rule (fp32 or bf16 masters over fp32, bf16 or fp16 weights). fp32 subtraction is exact when the two are
    within a factor of two of each other (Sterbenz), which small updates almost always are; where it is not exact for
    some element (a weight near zero that changed sign, say), the whole delta is float64, in which the difference of
    two fp32 numbers is exact. So an exported delta never moves a merged weight by a rounding step.
    """
    delta = trained.float() - base.float()
    if not torch.equal(plus_delta(base, delta), trained.float()):
        delta = trained.double() - base.double()
    return delta


def plus_delta(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """base + delta, computed in fp32 (float64 for a float64 delta) before any rounding; the caller casts the result
    to the weight's storage dtype once."""
    dtype = torch.promote_types(delta.dtype, torch.float32)
    return base.to(dtype) + delta.to(base.device, dtype)


def read_slice(weight: torch.Tensor, kind: str, k: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """The slice's values: a view of the leading k rows / columns, or a copy of the indexed ones."""
    if index is None:
        return leading_slice(weight, kind, k)
    return weight.index_select(0 if kind == "rows" else 1, index)


@torch.no_grad()
def write_slice(weight: torch.Tensor, values: torch.Tensor, kind: str, k: int,
                index: torch.Tensor | None = None) -> None:
    """weight's slice (leading k, or the indexed rows / columns) = values, cast to weight's dtype."""
    if index is None:
        leading_slice(weight, kind, k).copy_(values)
    else:
        weight.index_copy_(0 if kind == "rows" else 1, index, values.to(weight.dtype))


def _slice_size(weight: torch.Tensor, trainable: torch.Tensor, kind: str, index: torch.Tensor | None = None) -> int:
    """k, after checking that `trainable` is a leading (or the indexed) slice of `weight` for this kind."""
    d_out, d_in = weight.shape
    if kind == "rows":
        k, ok = trainable.shape[0], trainable.ndim == 2 and trainable.shape[1] == d_in and trainable.shape[0] <= d_out
    elif kind == "cols":
        k, ok = trainable.shape[-1], trainable.ndim == 2 and trainable.shape[0] == d_out and trainable.shape[1] <= d_in
    else:
        raise ValueError(f"kind={kind!r}: must be one of {KINDS}")
    if index is not None and (index.ndim != 1 or len(index) != k):
        ok = False
    if not ok:
        shapes = f"trainable {tuple(trainable.shape)}, weight {tuple(weight.shape)}"
        raise ValueError(f"{shapes}: trainable is not a {'leading' if index is None else 'indexed'} {kind} slice of "
                         "weight")
    if k == 0:
        raise ValueError("k=0: nothing trains; leave the linear unwrapped instead")
    return k


@torch.no_grad()
def _write_slice(weight: torch.Tensor, trainable: torch.Tensor, kind: str, k: int,
                 index: torch.Tensor | None = None) -> None:
    """Make the weight live: copy the trainable values into its slice region (casting if dtypes differ)."""
    if index is not None:
        write_slice(weight, trainable, kind, k, index)
        return
    region = leading_slice(weight, kind, k)
    if region.data_ptr() != trainable.data_ptr():  # already the same memory: nothing to do
        region.copy_(trainable)


class _SliceLinearFn(torch.autograd.Function):
    """y = x W'^T + b, with gradients for x, the slice and (if it trains) the bias; never for the frozen weight."""

    @staticmethod
    def forward(ctx, x, weight, trainable, bias, kind, index):
        k = _slice_size(weight, trainable, kind, index)
        _write_slice(weight, trainable, kind, k, index)
        y = F.linear(x, weight, bias)  # (..., d_out); under autocast this casts like a plain F.linear

        ctx.kind, ctx.k, ctx.index = kind, k, index
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        # The frozen weight is kept as a plain reference, not through save_for_backward: every forward (the next
        # micro-batch, a checkpoint recomputation) writes into it and bumps its version counter, which would make a
        # saved copy fail autograd's check. It is only read in backward after re-writing the slice from `trainable`,
        # which *is* saved, so an optimizer step between forward and backward is still caught by the version check.
        ctx.weight = weight
        if kind == "rows":
            saved_x = x  # (..., d_in): the row-slice gradient needs all input features
        elif index is None:
            saved_x = x[..., :k].contiguous()  # (..., k): a compact copy, so the rest of x can be freed
        else:
            saved_x = x.index_select(-1, index)  # (..., k), compact likewise
        ctx.save_for_backward(saved_x, trainable)
        return y

    @staticmethod
    def backward(ctx, g):
        saved_x, trainable = ctx.saved_tensors
        weight, kind, k, index = ctx.weight, ctx.kind, ctx.k, ctx.index
        needs_x, _, needs_t, needs_b, _, _ = ctx.needs_input_grad
        grad_x = grad_t = grad_b = None
        dt = g.dtype  # the dtype forward computed in (differs from the parameters' only under autocast)

        if needs_x:
            # Re-write the slice: the weight may have been re-gathered (ZeRO-3) or touched since forward.
            _write_slice(weight, trainable, kind, k, index)
            grad_x = (g @ weight.to(dt)).to(ctx.x_dtype)  # (..., d_out) @ (d_out, d_in) -> (..., d_in)
        if needs_t:
            g2 = g.reshape(-1, g.shape[-1])  # (N, d_out)
            x2 = saved_x.reshape(-1, saved_x.shape[-1]).to(dt)  # (N, d_in) rows | (N, k) cols
            # The matmul runs in the activations' dtype like a dense linear's backward; in bf16 the BLAS kernels
            # accumulate the N-long sums in fp32. The result takes the parameter's dtype (fp32 master copies too).
            if kind == "rows":
                gk = g2[:, :k] if index is None else g2.index_select(1, index)  # (N, k)
                grad_t = gk.t() @ x2  # (k, N) @ (N, d_in) -> (k, d_in)
            else:
                grad_t = g2.t() @ x2  # (d_out, N) @ (N, k) -> (d_out, k)
            grad_t = grad_t.to(trainable.dtype)
        if needs_b:  # normally False: biases of wrapped linears stay frozen
            grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)  # (N, d_out) -> (d_out,)
        return grad_x, None, grad_t, grad_b, None, None


def slice_linear(
    x: torch.Tensor, weight: torch.Tensor, trainable: torch.Tensor, bias: torch.Tensor | None, kind: Kind,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear(x, W', bias), W' = `weight` (d_out, d_in) with its leading slice replaced by `trainable`.

    `trainable` is (k, d_in) for kind="rows" or (d_out, k) for kind="cols"; x is (..., d_in). `weight` must be frozen:
    its slice region is overwritten with the trainable values (so it holds the live weight after a call). Gradients
    flow to x, `trainable` and `bias` (if it requires grad); for cols only x[..., :k] is kept for backward. With
    `index` (k,) the slice is those rows / columns instead of the leading k.
    """
    if weight.requires_grad:
        raise ValueError("slice_linear: weight.requires_grad=True: freeze it; only `trainable` gets a gradient")
    return _SliceLinearFn.apply(x, weight, trainable, bias, kind, index)
