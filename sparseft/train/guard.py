"""The non-finite guard: a step whose loss or gradients are not finite never reaches the weights or a checkpoint.

`train.on_nonfinite: stop` (the default) ends the run with a RunFailure (exit 1) naming the step and the value, before
anything of that step is saved, so the newest checkpoint on disk stays the newest finite one. `skip` drops the step's
update (the optimizer takes no step: weights and optimizer state stay as they were), records it in metrics.jsonl,
and stops only after `train.max_skipped_steps` such steps in a row.

The guard watches the optimizer itself: a step pre-hook looks at the gradient norm about to be applied and, when it is
not finite, takes the gradients away for that step (torch optimizers skip a parameter without one). On several ranks
the norm it reads is the one ZeRO reduced over all ranks (DeepSpeed also skips such a step on its own), and the loss
is the sum over ranks, so every rank makes the same decision without another collective.
"""

from __future__ import annotations

import math

import torch

from sparseft.errors import RunFailure


class NonFiniteGuard:
    def __init__(self, engine, mode: str = "stop", max_skipped: int = 10, newest_checkpoint=lambda: None):
        self.mode, self.max_skipped, self.newest_checkpoint = mode, max_skipped, newest_checkpoint
        # A loss scaler (fp16) skips overflowing steps itself and lowers its scale: that is its normal work.
        self.scaled = getattr(engine, "scaler", None) is not None
        self._global_norm = getattr(engine, "global_grad_norm", lambda: None)
        self._norm: float | None = None  # the pre-step norm of this step, once the optimizer was called
        self._held: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.skipped = self.in_a_row = 0
        self.failure: str | None = None
        engine.optimizer.register_step_pre_hook(self._before_step)
        engine.optimizer.register_step_post_hook(self._after_step)

    def _before_step(self, optimizer, args, kwargs) -> None:
        # DeepSpeed may call the optimizer once per parameter group or ZeRO sub-group: decide once per step.
        if self._norm is None:
            norm = self._global_norm()
            if norm is None:
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads) if grads else 0.0
            self._norm = float(norm)
        if not math.isfinite(self._norm):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._held.append((p, p.grad))
                        p.grad = None

    def _after_step(self, optimizer, args, kwargs) -> None:
        for p, grad in self._held:  # the engine clears (or reuses) them as after any step
            p.grad = grad
        self._held.clear()

    def check(self, step: int, stats: dict) -> dict:
        """After optimizer step `step` (1-based): fields for its metrics record; sets `failure` when the run must
        stop (`raise_failure` after logging the record)."""
        norm = self._norm if self._norm is not None else stats["grad_norm"]
        # No optimizer call at all: the engine skipped the step itself (loss scaler, DeepSpeed's overflow check).
        scaler_skip = self._norm is None and self.scaled
        self._norm = None
        loss = stats["loss"]
        if math.isfinite(loss) and (math.isfinite(norm) or scaler_skip):
            self.in_a_row = 0
            return {}
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
        if self.mode == "skip":
            self.skipped += 1
            self.in_a_row += 1
            if self.in_a_row <= self.max_skipped:
                return {"skipped": True, "skipped_steps": self.skipped}
            self.failure = (f"step {step}: {what}; {self.in_a_row} steps in a row were not finite "
                            f"(train.max_skipped_steps={self.max_skipped})")
        else:
            self.failure = f"step {step}: {what} (train.on_nonfinite=stop)"
        newest = self.newest_checkpoint()
        self.failure += (f"; stopped without saving it. Newest finite checkpoint: {newest if newest else 'none'}. "
                         "Lower train.lr (or raise train.warmup_steps), or set train.on_nonfinite=skip")
        return {"skipped": False, "nonfinite": True} if self.mode == "skip" else {"nonfinite": True}

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise RunFailure(self.failure)
