"""The S2FT layer: a frozen linear whose leading row or column slice trains as its own parameter."""

from __future__ import annotations

import torch
import torch.nn as nn

from sparseft.kernels.partial_linear import (KINDS, Kind, exact_delta, plus_delta, read_slice, slice_linear,
                                             write_slice)


class SliceLinear(nn.Module):
    """Wraps a (co-permuted) `nn.Linear`; its first k output rows (kind="rows") or input columns (kind="cols") train,
    or with `index` those rows / columns (S2FT's q_head unit: o's columns of single q heads, in place).

    `trainable` holds the slice values themselves (not a delta), as an ordinary parameter that DeepSpeed and any
    optimizer can own; it never shares storage with the frozen weight. `base_slice` keeps the initial slice so deltas
    can be exported and merged exactly. Note: forward writes the trainable values into the frozen weight's slice
    region, so `base_layer.weight` holds the live weight after a forward; use `merged_weight()` / `delta()` to read
    results, never that region.
    """

    def __init__(self, base_layer: nn.Linear, kind: Kind, k: int, index: torch.Tensor | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: must be one of {KINDS}")
        size = base_layer.out_features if kind == "rows" else base_layer.in_features
        if not 0 < k <= size:
            raise ValueError(f"k={k}: must be in [1, {size}] for kind={kind!r} of {base_layer}")
        if index is not None and (len(index) != k or int(index.max()) >= size):
            raise ValueError(f"index: {k} distinct {kind} of {base_layer} expected")
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.kind, self.k = kind, k
        idx = None if index is None else torch.as_tensor(index, dtype=torch.long, device=base_layer.weight.device)
        self.register_buffer("index", idx, persistent=False)  # None: the leading k
        initial = read_slice(base_layer.weight, kind, k, idx).detach()  # (k, d_in) rows | (d_out, k) cols
        self.trainable = nn.Parameter(initial.clone())
        # Not persistent: it equals the base model's slice, which the base checkpoint already holds.
        self.register_buffer("base_slice", initial.clone(), persistent=False)

    # Read-only views of the base layer, for code that inspects a linear's attributes (as PEFT layers offer).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return slice_linear(x, self.base_layer.weight, self.trainable, self.base_layer.bias, self.kind, self.index)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """What training changed in the slice: trainable - base_slice, in fp32 (float64 where fp32 cannot hold it
        exactly; see `exact_delta`), detached, the slice's shape."""
        return exact_delta(self.trainable.detach(), self.base_slice)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A new full weight in the base weight's dtype: the base weight with its slice set to base_slice + delta().

        Computed exactly this way (not by copying `trainable`) so it is bit-identical to applying an exported delta
        to the base weights; `exact_delta` makes it equal the trained slice rounded once to the storage dtype, which is
        what the forward computes with.
        """
        w = self.base_layer.weight.detach().clone()  # (d_out, d_in); its slice region is overwritten below
        write_slice(w, plus_delta(self.base_slice, self.delta()), self.kind, self.k, self.index)
        return w

    @torch.no_grad()
    def base_weight(self) -> torch.Tensor:
        """A new full weight as the base had it (in this layer's coordinates): the start slice back in place."""
        w = self.base_layer.weight.detach().clone()
        write_slice(w, self.base_slice, self.kind, self.k, self.index)
        return w

    @torch.no_grad()
    def unwrap(self) -> nn.Linear:
        """The base layer with the merged slice written into its weight (in place); it stays frozen."""
        write_slice(self.base_layer.weight, plus_delta(self.base_slice, self.delta()), self.kind, self.k, self.index)
        return self.base_layer

    def extra_repr(self) -> str:
        shapes = f"{tuple(self.trainable.shape)} of {tuple(self.base_layer.weight.shape)}"
        return f"kind={self.kind}, k={self.k}, trainable={shapes}"
