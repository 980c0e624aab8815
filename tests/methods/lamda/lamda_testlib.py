"""Helpers for the LaMDA tests: a recipe, a prepared model, a few training steps with the real Engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseft.methods import Method, MethodContext, build_method
from sparseft.recipe import validate_recipe_data
from sparseft.train.optim import Engine


def recipe(max_steps: int = 10, train: dict | None = None, **method):
    return validate_recipe_data({
        "model": {"path": "unused"},
        "data": {"train": {"path": "train.jsonl"}},
        "train": {"max_steps": max_steps, "lr": 1e-2, "seed": 0, **(train or {})},
        "method": {"name": "lamda", **method},
    })


def batch(vocab: int, seed: int = 0, rows: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@dataclass
class Prepared:
    method: Method
    recipe: object
    model: torch.nn.Module
    selection: dict


def prepared(model, logs: list | None = None, max_steps: int = 10, train: dict | None = None, **method) -> Prepared:
    """Select and prepare `model` for a lamda method section (`logs` collects what the method logs)."""
    rec = recipe(max_steps, train, **method)
    m = build_method(rec.method)
    ctx = MethodContext(recipe=rec, log=(logs.append if logs is not None else lambda s: None))
    selection = m.select(model, ctx)
    return Prepared(m, rec, m.prepare(model, selection, ctx), selection)


def train_steps(method, rec, model, steps: int, weight_decay: float, on_step=None, before_step=None) -> list[dict]:
    """Run `steps` optimizer steps on fixed batches; returns what on_step_end logged. `on_step(step, engine)` is
    called after each step's on_step_end, `before_step(step, engine)` between backward and the optimizer step."""
    model.train()
    engine = Engine(model, method.optimizer_param_groups(model, weight_decay), rec.train)
    logged = []
    for step in range(steps):
        method.on_step_start(step, model, engine.optimizer)
        loss, _ = method.compute_loss(model, batch(model.config.vocab_size, seed=step % 3))
        engine.backward(loss)
        if before_step is not None:
            before_step(step, engine)
        engine.step()
        logged.append(method.on_step_end(step, model, engine.optimizer))
        if on_step is not None:
            on_step(step, engine)
    return logged


def lamda_layers(model):
    from sparseft.methods.lamda.layers import LamdaLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, LamdaLinear)}


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits
