"""The `method:` section of a LaMDA / LaMDA++ recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparseft.methods.base import MethodConfig
from sparseft.models.arch import ROLES, check_roles


class FreezeB(BaseModel):
    """When B (PMB) stops training: its directions freeze one by one over [start, end) of training, then B wholly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: float = Field(0.1, ge=0, le=1, description="Fraction of train.max_steps during which B trains whole; its "
                                                       "directions start freezing at this step.")
    end: float = Field(0.5, ge=0, le=1, description="Fraction of train.max_steps from which B is wholly frozen (no "
                                                     "gradient, optimizer state freed); 1 never freezes it wholly.")
    order: Literal["largest", "smallest"] = Field(
        "largest", description="Which directions (B's columns, one per singular value) freeze first.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.end < self.start:
            raise ValueError(f"end={self.end} is before start={self.start}; give start <= end")
        return self


class LamdaConfig(MethodConfig):
    """LaMDA: y = W x + scale * B S A x on the listed projections, A and B from the SVD of W.

    A (r x d_in, the top right singular vectors) never trains; S (r x r) trains throughout; B (d_out x r, the top left
    singular vectors) trains early and freezes direction by direction (`freeze_b`). LaMDA++ is
    `rank_allocation: spectrum`: each linear's rank follows the effective rank of its pretrained spectrum.
    """

    name: Literal["lamda"] = "lamda"
    projections: list[str] = Field(
        default_factory=lambda: list(ROLES),
        description="Projections that get an adapter: any of q, k, v, o (attention) and up, gate, down (FFN).",
    )
    r: int = Field(16, gt=0, description="Rank of every adapted linear; with rank_allocation: spectrum, the mean rank "
                                         "(the budget is r x the number of adapted linears unless rank_budget is set).")
    rank_allocation: Literal["uniform", "spectrum"] = Field(
        "uniform",
        description="uniform: every linear has rank r (LaMDA); spectrum: ranks proportional to each pretrained "
                    "weight's effective rank exp(entropy of sigma^2 / sum sigma^2), summing to the budget (LaMDA++).",
    )
    rank_budget: int | None = Field(None, gt=0, description="Total rank over all adapted linears for "
                                                            "rank_allocation: spectrum; null means r x their number.")
    init: Literal["zero", "spectrum"] = Field(
        "zero",
        description="zero: S = 0, the adapter starts as no change; spectrum: S = diag(top sigma) / scale and the start "
                    "B0 S0 is subtracted in the adapter path, so the model still starts exactly as the base.",
    )
    scale: float = Field(1.0, gt=0, description="Multiplier of the adapter path: y = W x + scale * B S A x.")
    svd: Literal["full", "lowrank"] = Field(
        "full",
        description="How the start is computed. full: one exact SVD a linear (LaMDA++ reads its spectrum from the "
                    "same one); lowrank: torch.svd_lowrank's randomised top-r vectors (seeded), far cheaper for large "
                    "weights (LaMDA++ then computes the singular values alone first).",
    )
    freeze_b: FreezeB = Field(default_factory=FreezeB,
                              description="Schedule that freezes B: {start, end, order}, fractions of train.max_steps.")

    @field_validator("projections")
    @classmethod
    def _known_roles(cls, v: list[str]) -> list[str]:
        return check_roles(v)

    @model_validator(mode="after")
    def _budget_needs_spectrum(self):
        if self.rank_budget is not None and self.rank_allocation != "spectrum":
            raise ValueError("rank_budget applies to rank_allocation: spectrum only; set that or drop rank_budget")
        return self
