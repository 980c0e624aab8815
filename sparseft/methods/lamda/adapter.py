"""Apply a LaMDA adapter directory to a loaded base model (for `sparseft eval BASE --adapter DIR`)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from sparseft.errors import UserError
from sparseft.export.adapter_files import read_adapter
from sparseft.methods.lamda.layers import NAMES, LamdaLinear
from sparseft.models.arch import set_module


def read_lamda_adapter(path: str | Path) -> tuple[float, dict[str, dict[str, torch.Tensor]]]:
    """(scale, {module path: {lamda_A, lamda_S, lamda_B[, lamda_start]}}) of an adapter directory, checked."""
    cfg, tensors = read_adapter(path, method="lamda")
    ranks, scale = cfg.get("ranks"), cfg.get("scale")
    if not isinstance(ranks, dict) or not isinstance(scale, (int, float)):
        raise UserError(f"adapter {path}: adapter_config.json needs 'ranks' (module -> rank) and 'scale'")
    modules = {}
    for p, r in ranks.items():
        found = {n: tensors[f"{p}.{n}"] for n in NAMES if f"{p}.{n}" in tensors}
        missing = [n for n in NAMES[:3] if n not in found]
        if missing or found["lamda_S"].shape != (r, r):
            raise UserError(f"adapter {path}: {p} needs {', '.join(NAMES[:3])} with rank {r} "
                            f"({'missing ' + ', '.join(missing) if missing else 'S has the wrong shape'})")
        modules[p] = found
    return float(scale), modules


@contextmanager
def lamda_applied(model: nn.Module, path: str | Path):
    """The model with each adapted linear wrapped in a frozen LamdaLinear; the original modules come back on exit."""
    scale, modules = read_lamda_adapter(path)
    originals: dict[str, tuple[nn.Linear, list[bool]]] = {}

    try:
        for p, tensors in modules.items():
            try:
                base = model.get_submodule(p)
            except AttributeError:
                raise UserError(f"adapter {path}: the model has no module {p}") from None
            if not isinstance(base, nn.Linear):
                raise UserError(f"adapter {path}: {p} is not a linear layer of this model")
            flags = [q.requires_grad for q in base.parameters()]
            try:
                layer = LamdaLinear(base, scale=scale, **tensors)
            except ValueError as e:
                raise UserError(f"adapter {path}: {p}: {e}") from None
            originals[p] = (base, flags)
            set_module(model, p, layer.requires_grad_(False))
        yield model
    finally:
        for p, (base, flags) in originals.items():
            set_module(model, p, base)
            for q, flag in zip(base.parameters(), flags):
                q.requires_grad_(flag)
