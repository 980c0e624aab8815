"""Row / column delta adapters (S2FT's format) on a loaded base model: fuse, unfuse, apply, and mixed-adapter batches.

An adapter holds, for each adapted linear at module path P (the base model's own path), `P.delta` and either `P.rows`
(int64 output-row indices; delta is (k, d_in)) or `P.cols` (int64 input-column indices; delta is (d_out, k)), indices
in the base model's coordinates and in the order of the delta's rows / columns. Fused: W[rows] += delta, or
W[:, cols] += delta.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from sparseft.errors import UserError
from sparseft.export.adapter_files import WEIGHTS_NAME, read_adapter
from sparseft.export.fingerprint import check_base
from sparseft.kernels.partial_linear import plus_delta

KINDS = ("rows", "cols")


@dataclass(frozen=True)
class SparseDelta:
    kind: str  # "rows" | "cols"
    indices: torch.Tensor  # (k,) int64, base coordinates
    delta: torch.Tensor  # (k, d_in) for rows, (d_out, k) for cols


@dataclass
class SparseAdapter:
    """One adapter directory: its config and a SparseDelta per adapted module path."""

    path: str
    config: dict
    modules: dict[str, SparseDelta]

    @property
    def num_parameters(self) -> int:
        return sum(d.delta.numel() for d in self.modules.values())

    def check(self, model: nn.Module) -> None:
        """Every module path exists on `model` as a linear, and every index and shape fits it."""
        where = Path(self.path) / WEIGHTS_NAME
        for name, d in self.modules.items():
            try:
                weight = getattr(model.get_submodule(name), "weight", None)
            except AttributeError:
                weight = None
            if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
                raise UserError(f"adapter {where}: tensor {name}.delta: the model has no linear layer {name!r}")
            d_out, d_in = weight.shape
            n_idx = d_out if d.kind == "rows" else d_in
            want = (len(d.indices), d_in) if d.kind == "rows" else (d_out, len(d.indices))
            if tuple(d.delta.shape) != want:
                raise UserError(f"adapter {where}: tensor {name}.delta has shape {tuple(d.delta.shape)}, the model's "
                                f"{name} ({d_out}x{d_in}) needs {want}")
            if len(d.indices) and int(d.indices.max()) >= n_idx:
                raise UserError(f"adapter {where}: tensor {name}.{d.kind}: index {int(d.indices.max())} is out of "
                                f"range for {n_idx} {d.kind} of {name}")


def load_sparse_adapter(path: str | Path, model: nn.Module | None = None, method: str = "s2ft",
                        force: bool = False) -> SparseAdapter:
    """Read and check an adapter directory; with `model`, also check that it fits that model and that `model` is the
    base it was made for (its recorded fingerprint; `force` skips that check). Call it before fusing anything else
    into `model`: the fingerprint is of the untouched base weights."""
    cfg, tensors = read_adapter(path, method=method)
    where = Path(path) / WEIGHTS_NAME
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, suffix = key.rpartition(".")
        if suffix not in ("delta",) + KINDS or not module:
            raise UserError(f"adapter {where}: unexpected tensor {key!r} (expected <module>.delta with <module>.rows "
                            f"or <module>.cols)")
        groups.setdefault(module, {})[suffix] = t
    modules: dict[str, SparseDelta] = {}
    for module, parts in sorted(groups.items()):
        kinds = [k for k in KINDS if k in parts]
        if "delta" not in parts:
            raise UserError(f"adapter {where}: tensor {module}.delta is missing (found {module}.{kinds[0]})")
        if len(kinds) != 1:
            raise UserError(f"adapter {where}: tensor {module}.delta needs exactly one of {module}.rows or "
                            f"{module}.cols (found {kinds or 'neither'})")
        kind = kinds[0]
        idx, delta = parts[kind], parts["delta"]
        name = f"{module}.{kind}"
        if idx.ndim != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise UserError(f"adapter {where}: tensor {name} must be a 1-D integer tensor "
                            f"(got {idx.dtype}, shape {tuple(idx.shape)})")
        idx = idx.to(torch.long)
        if len(idx) and int(idx.min()) < 0:
            raise UserError(f"adapter {where}: tensor {name}: negative index {int(idx.min())}")
        if len(torch.unique(idx)) != len(idx):
            raise UserError(f"adapter {where}: tensor {name}: indices repeat")
        if delta.ndim != 2 or not delta.dtype.is_floating_point:
            raise UserError(f"adapter {where}: tensor {module}.delta must be a 2-D floating tensor "
                            f"(got {delta.dtype}, shape {tuple(delta.shape)})")
        if delta.shape[0 if kind == "rows" else 1] != len(idx):
            raise UserError(f"adapter {where}: tensor {module}.delta has shape {tuple(delta.shape)} but {name} "
                            f"holds {len(idx)} indices")
        modules[module] = SparseDelta(kind, idx, delta)
    adapter = SparseAdapter(str(path), cfg, modules)
    if model is not None:
        adapter.check(model)
        check_base(model, cfg, str(path), force)
    return adapter


def _as_adapter(adapter: SparseAdapter | str | Path, model: nn.Module) -> SparseAdapter:
    """A loaded adapter checked against `model`. One given by path is also checked against its base fingerprint while
    no switchable adapter is fused (afterwards the weights are no longer the untouched base's)."""
    if isinstance(adapter, SparseAdapter):
        adapter.check(model)
        return adapter
    fused = getattr(model, _ATTR, None)
    if fused is None or not fused.active:
        return load_sparse_adapter(adapter, model)
    a = load_sparse_adapter(adapter)
    a.check(model)
    return a


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight


def _add(weight: torch.Tensor, d: SparseDelta) -> None:
    """weight[rows] += delta (or weight[:, cols] += delta), summed in fp32 and rounded once to the weight's dtype: the
    same arithmetic as a merge (`plus_delta`)."""
    idx = d.indices.to(weight.device)
    if d.kind == "rows":
        weight[idx] = plus_delta(weight[idx], d.delta).to(weight.dtype)
    else:
        weight[:, idx] = plus_delta(weight[:, idx], d.delta).to(weight.dtype)


@dataclass
class _Backup:
    rows: torch.Tensor  # (r,) indices and their original rows (r, d_in)
    row_values: torch.Tensor
    cols: torch.Tensor  # (c,) indices and their original columns (d_out, c)
    col_values: torch.Tensor


class AdapterSet:
    """Adapters fused into one loaded base, switchable without reloading it.

    Touched rows / columns of the original weights are backed up; every change recomputes a touched module as
    backup + the active deltas in fusing order, never by subtraction, so unfusing everything restores the base bit
    for bit and the same active adapters always give the same weights.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.active: list[SparseAdapter] = []
        self._backup: dict[str, _Backup] = {}

    def fuse(self, adapter: SparseAdapter | str | Path) -> SparseAdapter:
        a = _as_adapter(adapter, self.model)
        if any(a is b for b in self.active):
            raise UserError(f"adapter {a.path}: already fused into this model")
        self.active.append(a)
        self._refresh(a.modules)
        return a

    def unfuse(self, adapter: SparseAdapter) -> None:
        kept = [b for b in self.active if b is not adapter]
        if len(kept) == len(self.active):
            raise UserError(f"adapter {adapter.path}: not fused into this model")
        self.active = kept
        self._refresh(adapter.modules)

    def unfuse_all(self) -> None:
        names = {n for a in self.active for n in a.modules}
        self.active = []
        self._refresh(names)

    @torch.no_grad()
    def _refresh(self, names) -> None:
        for name in names:
            w = _weight(self.model, name)
            old = self._backup.pop(name, None)
            if old is not None:  # both backups hold original values, so their overlap agrees
                w[old.rows] = old.row_values
                w[:, old.cols] = old.col_values
            deltas = [a.modules[name] for a in self.active if name in a.modules]
            if not deltas:
                continue
            rows = [d.indices for d in deltas if d.kind == "rows"]
            cols = [d.indices for d in deltas if d.kind == "cols"]
            r = torch.unique(torch.cat(rows)) if rows else torch.zeros(0, dtype=torch.long)
            c = torch.unique(torch.cat(cols)) if cols else torch.zeros(0, dtype=torch.long)
            r, c = r.to(w.device), c.to(w.device)
            self._backup[name] = _Backup(r, w[r].clone(), c, w[:, c].clone())
            for d in deltas:
                _add(w, d)


_ATTR = "_sparseft_adapter_set"


def adapter_set(model: nn.Module) -> AdapterSet:
    """The model's AdapterSet, created on first use."""
    s = getattr(model, _ATTR, None)
    if s is None:
        s = AdapterSet(model)
        setattr(model, _ATTR, s)
    return s


def fuse(model: nn.Module, adapter: SparseAdapter | str | Path) -> SparseAdapter:
    """Fuse an adapter into the base weights (adding to any already fused); returns the loaded adapter."""
    return adapter_set(model).fuse(adapter)


def unfuse(model: nn.Module, adapter: SparseAdapter) -> None:
    """Take one fused adapter out; once none is left the base weights are exactly the original ones."""
    s = adapter_set(model)
    s.unfuse(adapter)
    if not s.active:
        delattr(model, _ATTR)


def apply_adapters(model: nn.Module, adapters: list) -> nn.Module:
    """Fuse adapters for good (no backup is kept), in list order."""
    if getattr(model, _ATTR, None) is not None:
        raise UserError("apply_adapters: this model has switchable adapters fused; unfuse them first")
    loaded = [_as_adapter(a, model) for a in adapters]
    with torch.no_grad():
        for a in loaded:
            for name, d in a.modules.items():
                _add(_weight(model, name), d)
    return model


@dataclass
class _Stacked:
    """One kind of delta (rows or cols) of one linear, for every batch row: the row's adapter's indices and delta,
    padded to the longest with zero deltas (index 0), so a pad adds nothing."""

    kind: str
    index: torch.Tensor  # (B, K) long
    delta: torch.Tensor  # (B, K, d_in) for rows | (B, K, d_out) for cols (delta^T): x @ it gives the update


def _stack(kind: str, per_row: list[SparseDelta | None], weight: torch.Tensor) -> _Stacked:
    """Stack the deltas each batch row uses (None: the row's adapter does not touch this linear) once per batch."""
    K = max(len(d.indices) for d in per_row if d is not None)
    width = weight.shape[1] if kind == "rows" else weight.shape[0]  # d_in for rows, d_out for cols
    index = torch.zeros(len(per_row), K, dtype=torch.long)
    delta = torch.zeros(len(per_row), K, width, dtype=weight.dtype)
    for b, d in enumerate(per_row):
        if d is not None:
            k = len(d.indices)
            index[b, :k] = d.indices
            delta[b, :k] = d.delta.to(weight.dtype) if kind == "rows" else d.delta.T.to(weight.dtype)
    return _Stacked(kind, index.to(weight.device), delta.to(weight.device))


def _mixed_update(out: torch.Tensor, x: torch.Tensor, s: _Stacked) -> torch.Tensor:
    """Add every row's own delta applied to its x to `out`, in place: one gather and one batched matmul-add (cols),
    or one batched matmul and one scatter-add (rows).

    x (B, T, d_in), out (B, T, d_out). cols: out += x[..., idx_b] @ delta_b^T; rows: out[..., idx_b] += x @ delta_b^T.
    """
    B, T = x.shape[0], x.shape[1]
    K = s.index.shape[1]
    if s.kind == "cols":
        xs = x.gather(-1, s.index[:, None, :].expand(B, T, K))  # (B, T, K)
        return out.baddbmm_(xs, s.delta.to(out.dtype)) if xs.dtype == out.dtype else \
            out.add_(torch.bmm(xs, s.delta.to(xs.dtype)).to(out.dtype))  # (B, T, K) @ (B, K, d_out)
    upd = torch.bmm(x, s.delta.to(x.dtype).transpose(1, 2))  # (B, T, d_in) @ (B, d_in, K) -> (B, T, K)
    return out.scatter_add_(-1, s.index[:, None, :].expand(B, T, K), upd.to(out.dtype))


@contextmanager
def mixed_adapters(model: nn.Module, adapters: list, row_adapter):
    """One forward pass where batch row b uses adapters[row_adapter[b]] (-1: the base), without merging any.

    Forward hooks on the adapted linears add each row's own delta to its outputs: the deltas the batch's rows use are
    stacked once (per linear and kind, padded to the longest), so a linear costs one gather, one batched matmul and
    one scatter however many adapters the batch mixes.
    """
    loaded = [_as_adapter(a, model) for a in adapters]
    ra = torch.as_tensor(row_adapter, dtype=torch.long).flatten()
    if len(ra) and (int(ra.min()) < -1 or int(ra.max()) >= len(loaded)):
        raise UserError(f"mixed_adapters: row_adapter values must be -1 or in [0, {len(loaded)})")
    used = sorted({int(i) for i in ra if i >= 0})
    stacks: dict[str, list[_Stacked]] = {}
    for name in sorted({n for i in used for n in loaded[i].modules}):
        weight = _weight(model, name)
        for kind in KINDS:
            per_row = [None if i < 0 else loaded[i].modules.get(name) for i in ra.tolist()]
            per_row = [d if d is not None and d.kind == kind else None for d in per_row]
            if any(d is not None for d in per_row):
                stacks.setdefault(name, []).append(_stack(kind, per_row, weight))

    def make_hook(entries: list[_Stacked]):
        def hook(_module, args, out):
            x = args[0]  # (B, ..., d_in)
            if x.shape[0] != len(ra):
                raise ValueError(f"mixed_adapters: batch has {x.shape[0]} rows, row_adapter {len(ra)}")
            shape = out.shape
            x3, out3 = x.reshape(x.shape[0], -1, x.shape[-1]), out.reshape(shape[0], -1, shape[-1])
            for s in entries:
                out3 = _mixed_update(out3, x3, s)
            return out3.reshape(shape)
        return hook

    handles = [model.get_submodule(name).register_forward_hook(make_hook(entries))
               for name, entries in stacks.items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
