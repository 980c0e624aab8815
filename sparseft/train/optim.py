"""Optimizers, learning-rate schedules and the Engine: the one place where backward and the optimizer step happen.

A distributed engine (DeepSpeed) offers the same four calls, so the loop does not change when it runs on several ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from sparseft.recipe import TrainSection
from sparseft.train.precision import Precision


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


def skip_inactive_groups(optimizer: torch.optim.Optimizer) -> None:
    """Make a param group whose `active` is False take no step: its parameters keep their values and optimizer state.

    torch optimizers already skip a parameter whose `.grad` is None, which is how a method that freezes part of the
    model between steps (HiFT) keeps it out of a step in one process. DeepSpeed's ZeRO hands the optimizer one flat
    partition a param group, with a gradient (zeros for what did not train) on each; a method marks such a group
    inactive instead. Its gradients are taken away for the optimizer's step and handed back afterwards (DeepSpeed's
    CPU offload keeps them as buffers it reuses).
    """
    held: list[tuple[torch.Tensor, torch.Tensor]] = []

    def take(opt, args, kwargs):
        for group in opt.param_groups:
            if group.get("active", True) is False:
                for p in group["params"]:
                    if p.grad is not None:
                        held.append((p, p.grad))
                        p.grad = None

    def give_back(opt, args, kwargs):
        for p, grad in held:
            p.grad = grad
        held.clear()

    optimizer.register_step_pre_hook(take)
    optimizer.register_step_post_hook(give_back)


def build_optimizer(param_groups: list[dict], t: TrainSection) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups, lr=t.lr, momentum=t.momentum)
    else:
        # foreach=False keeps the step's temporary memory per tensor instead of per parameter list.
        optimizer = torch.optim.AdamW(param_groups, lr=t.lr, betas=t.betas, foreach=False)
    skip_inactive_groups(optimizer)
    return optimizer


class Engine:
    """Single-process training engine: backward, clip, optimizer and scheduler step, state for checkpoints.

    `DeepSpeedEngine` (sparseft/train/distributed.py) has the same calls and attributes, so the loop runs unchanged
    on several ranks: `loss(compute_loss, batch)` runs a method's loss, `model` is what a forward pass calls
    (validation), `is_main` whether this process writes the run directory.
    """

    is_main = True

    def __init__(self, model: nn.Module, param_groups: list[dict], t: TrainSection, precision: Precision | None = None):
        self.model = model
        self.t = t
        self.params = [p for g in param_groups for p in g["params"]]
        if not self.params:
            raise RuntimeError("the method left no parameter to train")
        self.optimizer = build_optimizer(param_groups, t)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, t))
        self.device = next(model.parameters()).device
        self.precision = precision or Precision("fp32", None, None)
        # fp16's narrow range needs the loss scaled up before backward (and the gradients unscaled before clipping);
        # bf16 has fp32's range, so it needs no scaler.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.scaled else None
        self._loss, self._tokens = 0.0, 0

    def loss(self, compute_loss, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """A method's `compute_loss(model, batch)`: (loss, values to log), under the precision's autocast."""
        with self.precision.autocast(self.device):
            return compute_loss(self.model, batch)

    def backward(self, loss: torch.Tensor, batch: dict[str, torch.Tensor] | None = None) -> None:
        """Backpropagate a micro-batch's loss, already divided by grad_accum_steps; tally it (and the batch's tokens)
        for the step's report."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self._loss += float(loss.detach())
        self._tokens += int(batch["attention_mask"].sum()) if batch is not None else 0

    def step(self) -> dict[str, float]:
        """Clip, step, advance the schedule, clear gradients. Returns the step's loss (the sum of what backward got),
        tokens, lr and gradient norm (before clipping)."""
        lr = self.optimizer.param_groups[0]["lr"]
        max_norm = self.t.max_grad_norm if self.t.max_grad_norm is not None else float("inf")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip (and report) the true gradients
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = {"loss": self._loss, "tokens": self._tokens, "lr": lr, "grad_norm": float(norm)}
        self._loss, self._tokens = 0.0, 0
        return stats

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Means over ranks of per-rank values; one process has only its own."""
        return values

    def gather(self, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """CPU copies of `params`, for checkpoints and the final state."""
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in params.items()}

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
