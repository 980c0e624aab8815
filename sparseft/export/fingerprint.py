"""The base model an adapter was made for: its config's shape keys and a hash of the weights the adapter changes.

An adapter records `base_fingerprint` when it is exported; applying it checks the base it is given against it and
refuses another base (`--force` overrides). The hash covers the untouched base weights of the modules the adapter
changes, in the base model's layout, as bfloat16 values: a base loaded in float32 or bfloat16 from the same checkpoint
gives the same hash, a base whose weights differ does not.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn as nn

from sparseft.errors import UserError

FIELD = "base_fingerprint"
CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "vocab_size")


def _config_keys(config: Any) -> dict:
    out = {}
    for key in CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (int, str)):
            out[key] = value
    return out


@torch.no_grad()
def weights_hash(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over (module path, shape, bfloat16 bytes) of each weight, in path order."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name].detach().to("cpu", torch.bfloat16).contiguous()
        h.update(f"{name}:{tuple(w.shape)}:".encode())
        h.update(w.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def base_fingerprint(config: Any, weights: dict[str, torch.Tensor]) -> dict:
    """The `base_fingerprint` field of an adapter: config keys, the changed modules, the hash of their base weights."""
    return {"config": _config_keys(config), "modules": sorted(weights), "weights_sha256": weights_hash(weights)}


def check_base(model: nn.Module, adapter_config: dict, where: str, force: bool = False) -> None:
    """A UserError when `model` is not the base the adapter was made for (nothing is checked for an adapter that
    records no fingerprint, or with force=True)."""
    fp = adapter_config.get(FIELD)
    if force or not isinstance(fp, dict):
        return
    problems = []
    mine = _config_keys(getattr(model, "config", None))
    for key, value in (fp.get("config") or {}).items():
        if key in mine and mine[key] != value:
            problems.append(f"{key} is {mine[key]}, the adapter's base has {value}")
    if not problems:
        weights = {}
        for path in fp.get("modules", []):
            try:
                weights[path] = model.get_submodule(path).weight
            except AttributeError:
                problems.append(f"the model has no module {path}")
                break
        if not problems and weights_hash(weights) != fp.get("weights_sha256"):
            problems.append(f"the base weights of the {len(weights)} modules it changes differ from those it was "
                            "trained on")
    if problems:
        raise UserError(f"adapter {where}: made for another base model ({'; '.join(problems)}); give the base it was "
                        "trained on, or pass --force to apply it anyway")
