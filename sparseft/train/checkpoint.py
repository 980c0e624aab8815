"""Run directories and checkpoints.

A checkpoint is written into a hidden temporary directory, synced to disk and renamed into place, so a killed run (or a
lost machine) never leaves a half checkpoint as the newest. Only trainable parameters are saved: the frozen base is
reloaded from model.path. Nothing in a checkpoint is a pickle: tensors are safetensors, the rest JSON
(sparseft/train/state_io.py), so resuming a run directory somebody else wrote runs no code from it.

A checkpoint directory: trainable.safetensors, state.json (step, examples seen, ranks, batch split), method.json +
method.safetensors (the method's state), engine.json + engine.safetensors (optimizer, schedule, random generators).
The final state has all but the engine files.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from sparseft.errors import RunFailure, UserError
from sparseft.files import atomic_dir, remove_stale_temps
from sparseft.train.state_io import load_tree, save_tree

_STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAINABLE = "trainable.safetensors"


@dataclass
class RunDir:
    path: Path

    def __post_init__(self):
        self.path = Path(self.path)

    recipe = property(lambda self: self.path / "recipe.yaml")
    selection = property(lambda self: self.path / "selection.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    final = property(lambda self: self.path / "final")
    checkpoints = property(lambda self: self.path / "checkpoints")

    def has_run(self) -> bool:
        return self.metrics.exists() or self.final.exists() or self.checkpoints.exists()

    def checkpoint_dirs(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        found = [d for d in self.checkpoints.iterdir() if _STEP_DIR.match(d.name)]
        return sorted(found, key=lambda d: int(_STEP_DIR.match(d.name).group(1)))

    def latest_checkpoint(self) -> Path | None:
        dirs = self.checkpoint_dirs()
        return dirs[-1] if dirs else None

    def remove_stale_temps(self) -> list[Path]:
        """Temporary directories a killed run left beside its checkpoints and final state (only one run writes a run
        directory, so at its start none of them is being written)."""
        return remove_stale_temps(self.path) + remove_stale_temps(self.checkpoints)

    def write_json(self, path: Path, obj) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        tmp.replace(path)


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy saved trainable tensors into the prepared model; every saved name must exist with its shape."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [n for n in saved if n not in params]
    if missing:
        raise UserError(f"{path}: tensors {missing[:3]} do not match the prepared model (was the recipe changed?)")
    with torch.no_grad():
        for name, tensor in saved.items():
            if params[name].shape != tensor.shape:
                raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one ByteTensor a visible GPU (dropout on the GPU draws here)
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        for i, gen in enumerate(list(state["cuda"])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gen, i)


def save_state(out: Path, tensors: dict[str, torch.Tensor], meta: dict, method_state: dict,
               engine_state: dict | None = None) -> None:
    """Write a checkpoint (engine_state given) or a final state, atomically. `tensors`: the trainable parameters by
    name, full and on CPU (`Engine.gather`). Non-finite weights are never written: that is a RunFailure."""
    from safetensors.torch import save_file

    bad = next((n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise RunFailure(f"step {meta['step']}: {bad} holds non-finite values; {out.name} was not written")
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / TRAINABLE))
        save_tree(tmp, "method", method_state)
        if engine_state is not None:
            save_tree(tmp, "engine", {"engine": engine_state, "rng": rng_state()})
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_engine_state(ckpt: Path) -> tuple[dict, dict]:
    """(engine state, random-generator state) of a checkpoint."""
    state = load_tree(ckpt, "engine")
    return state["engine"], state["rng"]


def load_method_state(path: Path) -> dict:
    """The method's state of a checkpoint or a final state."""
    return load_tree(path, "method")


def read_meta(ckpt: Path) -> dict:
    """A checkpoint's state.json; one written before checkpoints held no pickles is refused with a message."""
    if (ckpt / "engine.pt").exists() and not (ckpt / "engine.json").exists():
        raise UserError(f"{ckpt}: written by an older sparseft (pickled engine.pt, which is never loaded: it could "
                        "run code); start over with --overwrite")
    try:
        meta = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt / 'state.json'}: unreadable ({e}); remove {ckpt} to resume from the one before") \
            from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise UserError(f"{ckpt / 'state.json'}: has no step; remove {ckpt} to resume from the one before")
    return meta


def prune_checkpoints(run: RunDir, keep: int) -> None:
    for old in run.checkpoint_dirs()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
