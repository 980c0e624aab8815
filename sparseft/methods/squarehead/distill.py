"""Distillation from the dense teacher: the SquareHead loss on block outputs and the logit KL term.

SquareHead (Kurtic et al., 2023) for block l with student output s_l and teacher output t_l, both (B, T, H), over
the non-padding tokens: mean((s_l - t_l)^2) / mean(t_l^2). Dividing by the teacher's own scale puts every block on
the same footing whatever its activation magnitude; the terms are summed over blocks.

The teacher runs first under no_grad; each of its block outputs is dropped as soon as the student's matching block
has produced its output and the term is computed, so at most the not-yet-matched teacher states are held.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparseft.data.packing import forward_inputs
from sparseft.methods.squarehead.config import Loss
from sparseft.models.arch import arch_of
from sparseft.train.loss import causal_lm_loss


def squared_error(student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """sum((s - t)^2) over the tokens where `tokens` (B, T) is true; s, t: (B, T, H). In fp32."""
    m = tokens.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    return ((student.float() - teacher.float()).pow(2) * m).sum()


def teacher_energy(teacher: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """sum(t^2) over the tokens where `tokens` is true: the SquareHead term's normaliser (no gradient needed)."""
    m = tokens.to(torch.float32).unsqueeze(-1)
    return (teacher.float().pow(2) * m).sum().clamp_min(torch.finfo(torch.float32).tiny)


def squarehead_term(student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """mean((s - t)^2) / mean(t^2) over the tokens where `tokens` (B, T) is true; s, t: (B, T, H). In fp32."""
    return squared_error(student, teacher, tokens) / teacher_energy(teacher, tokens)


def across_ranks(energies: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float, int]:
    """Make the term the global micro-batch's ratio under data parallelism: (energies summed over ranks, the factor
    that undoes the trainer's token-share weighting of this rank's loss, the number of ranks).

    sparseft/train/distributed.py weights each rank's loss by n_r / N (its share of the loss tokens), which turns
    token means into the global token mean. This term is a ratio of sums instead, so each rank contributes
    sum_r((s - t)^2) / sum_all(t^2) * N / n_r, and the weighted average is exactly the one-process value."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return energies, 1.0, 1
    n = (batch["labels"][:, 1:] != -100).sum().to(torch.float64).view(1)
    packed = torch.cat([energies.double(), n])
    dist.all_reduce(packed)
    return packed[:-1].to(energies.dtype), float(packed[-1]) / max(float(n), 1.0), dist.get_world_size()


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened next-token distributions, mean over tokens, times T^2."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, T)
    m = tokens.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0) * temperature ** 2


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@contextmanager
def on_block_outputs(model: nn.Module, fn: Callable[[int, torch.Tensor], None]):
    """Call fn(layer, output) for each transformer block's output during the forward passes inside the block.
    Outside it the hooks are gone (gradient checkpointing's recomputation in backward does not call fn)."""
    blocks = arch_of(model).blocks(model)
    handles = [b.register_forward_hook(lambda _m, _a, out, i=i: fn(i, _output(out))) for i, b in enumerate(blocks)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model under a DeepSpeed engine (which keeps it as `.module`)."""
    return getattr(model, "module", model)


class Distiller:
    """compute_loss for SquareHead: w_ce * CE + w_sq * SquareHead + w_kd * KD, each term returned for the log."""

    def __init__(self, weights: Loss, teacher: Callable[[torch.device], nn.Module]):
        self.w = weights
        self.teacher = teacher  # device -> the frozen teacher on that device (loaded or moved on first use)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, inputs = batch["input_ids"], forward_inputs(batch)
        tokens = batch["attention_mask"].bool()  # (B, T)
        want_sq, want_kd = self.w.squarehead > 0, self.w.kd > 0
        states: list[torch.Tensor | None] = []
        energies: list[torch.Tensor] = []
        t_logits = None
        if want_sq or want_kd:
            teacher = self.teacher(ids.device)
            with torch.no_grad():
                if want_sq:
                    def keep(i: int, out: torch.Tensor) -> None:
                        states.append(out)
                        energies.append(teacher_energy(out, tokens))

                    with on_block_outputs(teacher, keep):
                        t_logits = self._teacher_forward(teacher, inputs, want_kd)
                else:
                    t_logits = self._teacher_forward(teacher, inputs, True)
        if want_sq:
            energy, rank_factor, world = across_ranks(torch.stack(energies), batch)

        terms: list[torch.Tensor] = []

        def match(i: int, out: torch.Tensor) -> None:
            terms.append(squared_error(out, states[i], tokens) / energy[i])
            states[i] = None  # this teacher state is no longer needed

        with on_block_outputs(_inner(model), match) if want_sq else nullcontext():
            if want_kd:  # the KL term needs the student's full logits anyway
                out = model(**inputs, labels=batch["labels"])
                ce, s_logits = out.loss, out.logits
            else:
                ce = causal_lm_loss(model, batch)
        del states

        loss = self.w.ce * ce if self.w.ce > 0 else ce.new_zeros(())
        logs = {"ce": float(ce.detach())}
        if want_sq:
            sq = torch.stack(terms).sum()  # this rank's share of the global batch's term (all of it on one process)
            loss = loss + self.w.squarehead * sq * rank_factor
            logs["squarehead"] = float(sq.detach()) * world  # the trainer logs the mean over ranks: the global term
        if want_kd:
            kd = kd_term(s_logits, t_logits, tokens, self.w.temperature)
            loss = loss + self.w.kd * kd
            logs["kd"] = float(kd.detach())
        return loss, logs

    @staticmethod
    def _teacher_forward(teacher: nn.Module, inputs: dict, logits: bool) -> torch.Tensor | None:
        if logits:
            return teacher(**inputs).logits
        # Block outputs only: the decoder without the LM head (no (B, T, vocab) logits to compute).
        teacher.get_decoder()(**inputs)
        return None
