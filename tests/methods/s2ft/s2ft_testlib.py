"""Helpers for the S2FT tests: a recipe context, random batches, logits. (Fixtures live in conftest.py.)"""

from __future__ import annotations

import torch

from sparseft.methods import MethodContext, build_method
from sparseft.recipe import validate_recipe_data
from tests.helpers import random_batches


def recipe(model_path: str = "unused", **method):
    return validate_recipe_data({
        "model": {"path": model_path},
        "data": {"train": {"path": "train.jsonl"}},
        "train": {"max_steps": 1, "lr": 1e-3, "seed": 0},
        "method": {"name": "s2ft", **method},
    })


def context(model, logs: list | None = None, **method) -> MethodContext:
    vocab = model.config.vocab_size
    return MethodContext(recipe=recipe(**method), calibration_batches=lambda n: iter(random_batches(vocab, n)),
                         log=(logs.append if logs is not None else lambda s: None))


def s2ft(**method):
    """An S2FT method object built from a recipe with this method section."""
    return build_method(recipe(**method).method)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits
