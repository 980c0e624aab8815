"""Load MODEL for evaluation or generation, whatever its form: a base model, a run directory or a merged model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparseft.export.run import is_run_dir, load_run
from sparseft.models import load_model, load_tokenizer
from sparseft.train.precision import resolve_device


@dataclass
class LoadedModel:
    path: str
    model: Any
    tokenizer: Any
    form: str  # the data form prompts default to: a run's data.format, else "text"
    is_run: bool


def load_for_inference(path: str, dtype: str = "float32", key: str = "MODEL", device: str = "auto") -> LoadedModel:
    """The model in eval mode with its tokenizer, on `device` (auto, cpu, cuda, cuda:N). A run directory gives its
    trained model (base + trained weights)."""
    if is_run_dir(path):
        trained = load_run(path, device=device)
        loaded = LoadedModel(path, trained.model, trained.tokenizer, trained.recipe.data.format, True)
    else:
        tokenizer = load_tokenizer(path, key=key)
        where = resolve_device(device, key="--device")
        loaded = LoadedModel(path, load_model(path, dtype, key=key, device=where), tokenizer, "text", False)
    loaded.model.eval()
    return loaded
