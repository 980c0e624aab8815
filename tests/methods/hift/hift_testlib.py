"""Helpers for the HiFT tests: recipes, random batches, and a small driver that makes the calls the trainer makes."""

from __future__ import annotations

import torch

from sparseft.methods import MethodContext, build_method
from sparseft.recipe import validate_recipe_data
from sparseft.train.optim import Engine
from tests.helpers import random_batches


def recipe(method: dict | None = None, **train):
    return validate_recipe_data({
        "model": {"path": "unused"},
        "data": {"train": {"path": "train.jsonl"}},
        "train": {"max_steps": 100, "lr": 1e-2, "seed": 0, **train},
        "method": method or {"name": "hift"},
    })


def prepared(model, method: dict | None = None, **train):
    """(method, model, recipe) with the method selected and prepared as the trainer does it."""
    r = recipe(method, **train)
    m = build_method(r.method)
    ctx = MethodContext(recipe=r, log=lambda s: None)
    return m, m.prepare(model, m.select(model, ctx), ctx), r


class Driver:
    """The trainer's calls, step by step: on_step_start, micro-batches through the Engine, step, on_step_end."""

    def __init__(self, model, method: dict | None = None, **train):
        self.method, self.model, self.recipe = prepared(model, method, **train)
        self.model.train()
        t = self.recipe.train
        self.engine = Engine(self.model, self.method.optimizer_param_groups(self.model, t.weight_decay), t)
        self.batches = random_batches(self.model.config.vocab_size, 64, length=10)
        self.step = 0

    def run_step(self) -> dict:
        t, m = self.recipe.train, self.method
        m.on_step_start(self.step, self.model, self.engine.optimizer)
        for i in range(t.grad_accum_steps):
            batch = self.batches[(self.step * t.grad_accum_steps + i) % len(self.batches)]
            loss, _ = m.compute_loss(self.model, batch)
            self.engine.backward(loss / t.grad_accum_steps)
        stats = self.engine.step()
        stats.update(m.on_step_end(self.step, self.model, self.engine.optimizer))
        self.step += 1
        return stats

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def group_names(self, g: int) -> set[str]:
        return set(self.method.group_names(g))
