"""Run directories and checkpoints.

A checkpoint is written into a hidden temporary directory and renamed into place, so a killed run never leaves a half
checkpoint as the newest. Only trainable parameters are saved: the frozen base is reloaded from model.path.
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

from sparseft.errors import UserError
from sparseft.files import atomic_dir

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
    name, full and on CPU (`Engine.gather`)."""
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / TRAINABLE))
        torch.save(method_state, tmp / "method.pt")
        if engine_state is not None:
            torch.save({"engine": engine_state, "rng": rng_state()}, tmp / "engine.pt")
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def prune_checkpoints(run: RunDir, keep: int) -> None:
    for old in run.checkpoint_dirs()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
