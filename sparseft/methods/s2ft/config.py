"""The `method:` section of an S2FT recipe."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparseft.errors import UserError
from sparseft.methods.base import MethodConfig
from sparseft.models.arch import check_roles


class Budget(BaseModel):
    """How many units train: a ratio of the units available or an absolute count (exactly one of the two)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float | None = Field(None, gt=0, le=1, description="Fraction of the units, in (0, 1]; rounded down.")
    count: int | None = Field(None, ge=0, description="Number of units (0 trains none of this kind).")

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.ratio is None) == (self.count is None):
            raise ValueError("give exactly one of ratio or count, e.g. {ratio: 0.25} or {count: 2}")
        return self

    def units(self, available: int, key: str, what: str) -> int:
        """Units this budget asks for out of `available`; a UserError naming `key` when it cannot be met."""
        if self.count is not None:
            if self.count > available:
                raise UserError(f"{key}.count={self.count}: the model has {available} {what}")
            return self.count
        # The epsilon keeps ratios like 0.29 * 100 from rounding down to 28 through float error.
        n = math.floor(self.ratio * available + 1e-9)
        if n == 0:
            raise UserError(f"{key}.ratio={self.ratio}: selects no unit of the {available} {what}; "
                            f"raise the ratio to at least {1 / available:.3g} or give a count")
        return n

    def __str__(self) -> str:
        return f"ratio={self.ratio}" if self.count is None else f"count={self.count}"


class HeadBudget(Budget):
    """The attention budget, with the unit it counts."""

    unit: Literal["kv_group", "q_head"] = Field(
        "kv_group",
        description="kv_group: a kv head with the q heads that read it (rows of q, k, v and columns of o, permuted to "
                    "the front); q_head: one q head's columns of o (the S2FT paper's o-side unit), trained in place, "
                    "with q, k and v untouched, so budgets come in steps of 1 / num_attention_heads.",
    )


class S2FTConfig(MethodConfig):
    """Structured sparse fine-tuning: per block, a few attention units and FFN channels train as dense slices.

    The attention unit is by default a **kv group**: one kv head together with the q heads that read it (1 q head
    without GQA). A kv group owns the kv head's rows of k and v, the rows of q and the columns of o of its q heads.
    Selecting whole groups keeps grouped-query attention's q->kv pairing intact when the chosen units are permuted to
    the front, and it works whatever head_dim is (Qwen3's differs from hidden/heads). With `heads.unit: q_head` the
    unit is one q head's head_dim columns of o (q, k and v must then not be listed): finer budgets on GQA models,
    trained where they are, without permutation. An FFN unit is one channel: a row of up and gate and a column of
    down. The heads budget counts the head unit; it is ignored when no attention projection is listed, and the
    channels budget is ignored when no FFN projection is listed.
    """

    name: Literal["s2ft"] = "s2ft"
    projections: list[str] = Field(
        default_factory=lambda: ["o", "down"],
        description="Projections whose slices train: any of q, k, v, o (attention) and up, gate, down (FFN).",
    )
    heads: HeadBudget = Field(
        default_factory=lambda: HeadBudget(ratio=0.25),
        description="Attention budget in heads.unit (kv_group: a kv head with its q heads; q_head: one q head's "
                    "columns of o): {ratio: r} or {count: n}, and optionally unit.",
    )
    channels: Budget = Field(
        default_factory=lambda: Budget(ratio=0.05),
        description="FFN budget in intermediate channels: {ratio: r} or {count: n}.",
    )
    scope: Literal["per_layer", "global"] = Field(
        "per_layer",
        description="per_layer: the budget applies to every block; global: one budget over all blocks, units "
                    "ranked together.",
    )
    strategy: Literal["random", "weight", "activation", "gradient"] = Field(
        "random",
        description="Unit scores: random (seeded), weight (L2 norm of the unit's weights in the listed projections), "
                    "activation (L2 norm of the unit's inputs to o / down on calibration batches), gradient (norm of "
                    "the loss gradient of the unit's weights: root of the sum over calibration batches of its "
                    "squared norm, accumulated in hooks without keeping any weight gradient).",
    )
    normalize: Literal["zscore", "rank", "none"] = Field(
        "zscore",
        description="scope global: how scores are made comparable across layers before they are ranked together. "
                    "zscore: (score - layer mean) / layer std, so a layer wins units where its scores stand out of "
                    "its own spread; rank: each unit's rank within its layer, scaled to [0, 1] (layers then share the "
                    "budget almost evenly); none: raw scores (one layer with larger weights or activations can take "
                    "the whole budget).",
    )
    order: Literal["largest", "smallest"] = Field("largest", description="Pick the highest or the lowest scores.")
    calibration_batches: int = Field(4, gt=0, description="Batches used by the activation and gradient strategies.")
    seed: int | None = Field(None, description="Seed of the random strategy; null uses train.seed.")

    @field_validator("projections")
    @classmethod
    def _known_roles(cls, v: list[str]) -> list[str]:
        return check_roles(v)

    @model_validator(mode="after")
    def _q_head_is_o_only(self):
        if self.heads.unit == "q_head":
            qkv = [r for r in self.projections if r in ("q", "k", "v")]
            if qkv:
                raise ValueError(f"heads.unit q_head trains o's columns of single q heads; projections {qkv} cannot "
                                 "train with it (drop them, or use heads.unit: kv_group)")
        return self
