"""The `method:` section of a SquareHead recipe: what is pruned and how, and the distillation loss."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparseft.methods.base import MethodConfig
from sparseft.models.arch import ROLES, check_roles

_NM = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """`"2:4"` -> (2, 4): at most N non-zeros in every M consecutive weights of a row; `"unstructured"` -> None."""
    if pattern == "unstructured":
        return None
    n, m = map(int, _NM.match(pattern).groups())
    return n, m


class Loss(BaseModel):
    """loss = ce * CE + squarehead * SquareHead + kd * KL(teacher logits || student logits) at `temperature`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ce: float = Field(1.0, ge=0, description="Weight of the task's causal-LM cross-entropy.")
    squarehead: float = Field(
        1.0, ge=0,
        description="Weight of SquareHead: per block output, mean((student - teacher)^2) / mean(teacher^2) over "
                    "non-padding tokens, summed over blocks.")
    kd: float = Field(0.0, ge=0, description="Weight of the logit KL term (teacher || student), scaled by T^2.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature T of the KL term.")

    @model_validator(mode="after")
    def _something(self):
        if self.ce == self.squarehead == self.kd == 0:
            raise ValueError("every loss weight is 0; give ce, squarehead or kd a positive weight")
        return self


class Gradual(BaseModel):
    """Cubic schedule (Zhu & Gupta): s(t) = s_f + (s_i - s_f) * (1 - (t - start) / (end - start))^3, magnitude
    pruning at `start_step`, every `every` steps after it, and at `end_step`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="Sparsity of the one-shot prune before step 0 "
                                                                 "(0: start dense).")
    start_step: int = Field(0, ge=0, description="First optimizer step that prunes (0-based).")
    end_step: int = Field(gt=0, description="Step at which the final sparsity (method.sparsity) is reached.")
    every: int = Field(10, gt=0, description="Steps between pruning events.")

    @model_validator(mode="after")
    def _order(self):
        if self.end_step <= self.start_step:
            raise ValueError(f"end_step={self.end_step} must be after start_step={self.start_step}")
        return self


class SquareHeadConfig(MethodConfig):
    """Sparse fine-tuning with SquareHead distillation: prune the block linears (one-shot, or gradually), keep the
    masks fixed while every weight trains, and distil from the dense teacher's block outputs."""

    name: Literal["squarehead"] = "squarehead"
    sparsity: float = Field(
        0.5, gt=0, lt=1,
        description="Fraction of each pruned linear's weights set to zero (unstructured). N:M patterns fix it at "
                    "1 - N/M; give it only if it agrees.")
    pattern: str = Field(
        "unstructured",
        description="unstructured, or N:M (e.g. 2:4): at most N non-zeros in every M consecutive weights of a row "
                    "(along the input dimension, the layout sparse tensor cores use).")
    pruner: Literal["sparsegpt", "magnitude"] = Field(
        "sparsegpt",
        description="sparsegpt: second-order one-shot pruning with weight updates, block by block on calibration "
                    "batches; magnitude: drop the smallest |w| of each linear (no data needed).")
    roles: list[str] = Field(
        default_factory=lambda: list(ROLES),
        description="Block projections that are pruned: any of q, k, v, o, up, gate, down. Embeddings and the LM "
                    "head are never pruned.")
    layers: list[int] | None = Field(None, description="Blocks to prune (0-based); null prunes every block.")
    calibration_batches: int = Field(8, gt=0, description="Training batches SparseGPT gathers its Hessians from.")
    dampening: float = Field(0.01, gt=0, description="SparseGPT: added to the Hessian's diagonal, as a fraction of "
                                                     "its mean.")
    block_size: int = Field(128, gt=0, description="SparseGPT: columns pruned together before one lazy update of "
                                                   "the rest (a multiple of M for N:M).")
    gradual: Gradual | None = Field(None, description="Prune gradually while training (unstructured, by magnitude) "
                                                      "instead of all at once: {end_step: 100, every: 10, ...}.")
    teacher: str | None = Field(None, description="Dense teacher model directory; null: the starting model before "
                                                  "pruning (a frozen copy kept in memory).")
    loss: Loss = Field(default_factory=Loss, description="Loss weights: {ce: 1, squarehead: 1, kd: 0, "
                                                         "temperature: 1} (the SquareHead paper's default).")

    @field_validator("pattern", mode="before")
    @classmethod
    def _sexagesimal(cls, v):
        # YAML 1.1 (OmegaConf's loader, and key=value overrides) reads an unquoted 2:4 as the base-60 number 124.
        # No pattern is a number, so an int can only be that: turn it back.
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return f"{v // 60}:{v % 60}"
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        m = _NM.match(v)
        if v != "unstructured" and not (m and 0 < int(m.group(1)) < int(m.group(2))):
            raise ValueError(f"{v!r} is not unstructured or N:M with 0 < N < M, e.g. 2:4")
        return v

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: list[str]) -> list[str]:
        return check_roles(v)

    @model_validator(mode="after")
    def _consistent(self):
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if "sparsity" in self.model_fields_set and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"sparsity={self.sparsity} contradicts pattern {self.pattern} (which fixes "
                                 f"{implied:g}); drop sparsity")
            if self.gradual is not None:
                raise ValueError("gradual pruning is unstructured only; drop gradual or use pattern: unstructured")
            if self.block_size % nm[1]:
                raise ValueError(f"block_size={self.block_size} must be a multiple of M={nm[1]}")
        if self.gradual is not None and self.gradual.initial_sparsity >= self.sparsity:
            raise ValueError(f"gradual.initial_sparsity={self.gradual.initial_sparsity} must be below "
                             f"sparsity={self.sparsity}")
        return self

    @property
    def target_sparsity(self) -> float:
        """The final fraction of zeros in each pruned linear."""
        nm = parse_pattern(self.pattern)
        return self.sparsity if nm is None else 1 - nm[0] / nm[1]
