"""Checkpoint state without pickles: nested Python state as JSON, its tensors in a safetensors file beside it.

Optimizer, schedule, method and random-generator states are trees of dicts, lists and tuples holding numbers, strings,
tensors and numpy arrays. `save_tree(dir, name, tree)` writes `name.json` (the tree, each tensor replaced by a
reference) and `name.safetensors` (the tensors); `load_tree` reads them back. Reading runs no code from the files
(nothing is unpickled), so resuming a run directory somebody else wrote is safe.

JSON cannot say everything a state holds, so a few shapes are tagged: {"$tensor": key}, {"$tuple": [...]},
{"$ndarray": [...], "dtype": ...} and {"$items": [[key, value], ...]} for a dict whose keys are not all strings
(torch optimizers key their state by parameter index).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparseft.errors import UserError

FORMAT = 1


def save_tree(directory: Path, name: str, tree: Any) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def enc(x, at: str):
        if isinstance(x, torch.Tensor):
            key = at.lstrip(".") or "."  # its path in the tree, e.g. engine.optimizer.state.0.exp_avg
            while key in tensors:  # keys with dots could spell the same path twice
                key += "'"
            t = x.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
            if ptr is not None and ptr in seen:  # safetensors refuses tensors that share memory
                t = t.clone()
            elif ptr is not None:
                seen.add(ptr)
            tensors[key] = t
            return {"$tensor": key}
        if isinstance(x, np.ndarray):
            return {"$ndarray": x.tolist(), "dtype": str(x.dtype)}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, tuple):
            return {"$tuple": [enc(v, f"{at}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{at}.{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in x):
                return {k: enc(v, f"{at}.{k}") for k, v in x.items()}
            return {"$items": [[enc(k, f"{at}.{k}#key"), enc(v, f"{at}.{k}")] for k, v in x.items()]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"checkpoint state: cannot store a {type(x).__name__} (tensors, arrays, numbers, strings, "
                        "lists, tuples and dicts only)")

    doc = {"format": FORMAT, "tree": enc(tree, "")}
    (directory / f"{name}.json").write_text(json.dumps(doc) + "\n")
    save_file(tensors, str(directory / f"{name}.safetensors"))


def load_tree(directory: Path, name: str) -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / f"{name}.json"
    try:
        doc = json.loads(path.read_text())
        tensors = load_file(str(directory / f"{name}.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"{path}: unreadable checkpoint state ({e}); resume from an older checkpoint or start over "
                        "with --overwrite") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path}: not a checkpoint state of format {FORMAT}")

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "$tensor" in x:
            return tensors[x["$tensor"]]
        if "$tuple" in x:
            return tuple(dec(v) for v in x["$tuple"])
        if "$ndarray" in x:
            return np.asarray(x["$ndarray"], dtype=x["dtype"])
        if "$items" in x:
            return {_hashable(dec(k)): dec(v) for k, v in x["$items"]}
        return {k: dec(v) for k, v in x.items()}

    return dec(doc["tree"])


def _hashable(k):
    return tuple(k) if isinstance(k, list) else k
