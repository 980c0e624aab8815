"""Optimizers, learning-rate schedules and the Engine: the one place where backward and the optimizer step happen.

A distributed engine (DeepSpeed) offers the same four calls, so the loop does not change when it runs on several ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from sparseft.recipe import TrainSection


def lr_factor(step: int, t: TrainSection) -> float:
    """Multiplier of train.lr for optimizer step `step` (0-based). Warmup reaches 1 at step warmup_steps - 1;
    linear and cosine decay reach min_lr_ratio at the last step (max_steps - 1)."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    span = max(1, t.max_steps - 1 - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    shape = 1.0 - progress if t.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape


def build_optimizer(param_groups: list[dict], t: TrainSection) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=t.lr, momentum=t.momentum)
    # foreach=False keeps the step's temporary memory per tensor instead of per parameter list.
    return torch.optim.AdamW(param_groups, lr=t.lr, betas=t.betas, foreach=False)


class Engine:
    """Single-process training engine: backward, clip, optimizer and scheduler step, state for checkpoints."""

    def __init__(self, model: nn.Module, param_groups: list[dict], t: TrainSection):
        self.model = model
        self.t = t
        self.params = [p for g in param_groups for p in g["params"]]
        if not self.params:
            raise RuntimeError("the method left no parameter to train")
        self.optimizer = build_optimizer(param_groups, t)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, t))

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> dict[str, float]:
        """Clip, step, advance the schedule, clear gradients. Returns the step's lr and gradient norm."""
        lr = self.optimizer.param_groups[0]["lr"]
        max_norm = self.t.max_grad_norm if self.t.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": float(norm)}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
