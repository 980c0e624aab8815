"""Resuming a run: the same recipe, and the same global batch on any number of ranks.

A checkpoint records how its global batch was split (`micro_batch_size` x `grad_accum_steps` x `ranks` in state.json).
Resumed on another number of ranks, the run keeps that global batch (the data stream and the optimizer see the same
steps): grad_accum_steps adapts when it divides, else the resume is refused with the override that fixes it. The
recipe's micro_batch_size and grad_accum_steps may be overridden on resume for that, and a run directory may be moved;
every other key must match.
"""

from __future__ import annotations

import yaml

from sparseft.errors import UserError
from sparseft.recipe import Recipe

BATCH_SPLIT = ("micro_batch_size", "grad_accum_steps")


def same_recipe(saved_yaml: str, recipe_yaml: str) -> bool:
    """The recipes agree but for how the global batch is split (checked against the checkpoint instead) and where the
    run directory is (it may have been moved)."""

    def comparable(text: str):
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for key in (*BATCH_SPLIT, "output_dir"):
            data.get("train", {}).pop(key, None)
        return data

    return comparable(saved_yaml) == comparable(recipe_yaml)


def resume_batch(recipe: Recipe, meta: dict, world: int) -> Recipe:
    """`recipe` with the checkpoint's global batch on `world` ranks (grad_accum_steps adapted), or a UserError."""
    t = recipe.train
    ranks = int(meta.get("ranks", 1))
    micro, accum = int(meta.get("micro_batch_size", t.micro_batch_size)), int(meta.get("grad_accum_steps",
                                                                                        t.grad_accum_steps))
    total = micro * accum * ranks
    if t.micro_batch_size * t.grad_accum_steps * world == total:
        return recipe
    per_rank, rest = divmod(total, t.micro_batch_size * world)
    if rest == 0:
        return recipe.model_copy(update={"train": t.model_copy(update={"grad_accum_steps": per_rank})})
    where = (f"the checkpoint's global batch is {total} examples (micro_batch_size {micro} x grad_accum_steps {accum} "
             f"x {ranks} rank(s))")
    if total % world:
        raise UserError(f"train.output_dir={t.output_dir}: {where}, which {world} ranks cannot share evenly; resume "
                        f"on a number of ranks that divides {total} (it was written on {ranks})")
    fits = max(m for m in range(1, min(t.micro_batch_size, total // world) + 1) if (total // world) % m == 0)
    raise UserError(f"train.output_dir={t.output_dir}: {where}; on {world} rank(s) each takes {total // world}, "
                    f"which train.micro_batch_size={t.micro_batch_size} does not divide; resume with the override "
                    f"train.micro_batch_size={fits} (grad_accum_steps then adapts) or on {ranks} rank(s)")


def batch_meta(recipe: Recipe, world: int) -> dict:
    """What state.json records of the global batch's split."""
    return {"ranks": world, "micro_batch_size": recipe.train.micro_batch_size,
            "grad_accum_steps": recipe.train.grad_accum_steps}
