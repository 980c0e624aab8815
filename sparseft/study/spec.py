"""Study files: a grid of recipes x learning rates x budgets, and the three tasks every point is scored on.

    # studies/smollm2.yaml
    output_dir: runs/study-smollm2
    overrides: [train.max_steps=48]             # applied to every point
    tasks:
      gain: recipes/smollm2/tasks/skill_em.yaml         # the trained skill, held-out prompts
      perplexity: recipes/smollm2/tasks/english_ppl.yaml  # retention 1: general English not trained on
      retention: recipes/smollm2/tasks/capitals_em.yaml   # retention 2: a task the base model already does well
    grid:
      - {method: lora, recipe: recipes/smollm2/lora.yaml, lrs: [1e-4, 3e-4, 1e-3],
         budgets: {r4: [method.r=4], r16: [method.r=16]}}
    quick: {model: demo/tiny-llama, overrides: [train.max_steps=3], limit: 4}

Read like a recipe: OmegaConf (interpolation, key=value overrides from the command line), then pydantic with unknown
keys forbidden, every problem reported at once naming its key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparseft.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Entry(_Strict):
    method: str = Field(description="Label of this row of the grid in tables and plots (e.g. lamda_pp).")
    recipe: str = Field(description="The recipe every point of this row starts from.")
    lrs: list[float] = Field(min_length=1, description="Learning rates, one point each (per budget).")
    budgets: dict[str, list[str]] = Field(default_factory=lambda: {"default": []},
                                          description="Named budgets: recipe overrides, e.g. {r8: [method.r=8]}.")


class Tasks(_Strict):
    gain: str = Field(description="Exact-match task of the trained skill on held-out prompts.")
    perplexity: str = Field(description="Perplexity task on general text that is not in the training data.")
    retention: str = Field(description="A task the base model already does well, scored before and after.")


class Quick(_Strict):
    model: str = Field(description="--quick: the small model every point uses instead of the recipes' model.")
    overrides: list[str] = Field(default_factory=list, description="--quick: more recipe overrides (fewer steps).")
    limit: int = Field(8, gt=0, description="--quick: rows scored per task.")


class Study(_Strict):
    output_dir: str = Field(description="Points, table and plot go here; finished points are reused on rerun.")
    overrides: list[str] = Field(default_factory=list, description="Recipe overrides applied to every point.")
    tasks: Tasks
    grid: list[Entry] = Field(min_length=1)
    quick: Quick | None = None


@dataclass(frozen=True)
class Point:
    method: str
    budget: str
    lr: float
    recipe: str
    overrides: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.method}.{self.budget}.lr{self.lr:g}"


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study {path}: no such file")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"override {bad[0]!r}: expected key=value, e.g. output_dir=runs/my-study")
    try:
        data = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides))),
                                      resolve=True)
    except (OmegaConfBaseException, ValueError) as e:
        raise UserError(f"study {path}: {str(e).splitlines()[0]}") from None
    try:
        study = Study.model_validate(data)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise UserError(f"study {path}: {len(problems)} problem(s)", problems) from None
    methods = [e.method for e in study.grid]
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise UserError(f"study {path}: grid: method {twice[0]!r} appears twice; give each row its own label")
    for i, e in enumerate(study.grid):
        if not Path(e.recipe).is_file():
            raise UserError(f"study {path}: grid.{i}.recipe={e.recipe}: no such file")
    for role in ("gain", "perplexity", "retention"):
        f = getattr(study.tasks, role)
        if not Path(f).is_file():
            raise UserError(f"study {path}: tasks.{role}={f}: no such file")
    return study


def grid_points(study: Study, quick: bool) -> list[Point]:
    """Every (method, budget, lr) of the grid, in rounds: each row's first budget at its middle learning rate, then
    its other budgets at that rate, then the other rates; so a study stopped early has every method. --quick keeps
    the first budget and the middle learning rate of each row and puts the quick model and overrides on top."""
    if quick and study.quick is None:
        raise UserError("--quick: the study file has no `quick` section (model, overrides, limit)")
    extra = [f"model.path={study.quick.model}", *study.quick.overrides] if quick else []
    points = []
    for e in study.grid:
        budgets = list(e.budgets.items())[:1] if quick else e.budgets.items()
        middle = len(e.lrs) // 2
        for b, (budget, budget_overrides) in enumerate(budgets):
            for i, lr in enumerate(e.lrs):
                if quick and i != middle:
                    continue
                overrides = (*study.overrides, *budget_overrides, *extra, f"train.lr={lr}")
                points.append((i != middle, b, len(points), Point(e.method, budget, lr, e.recipe, overrides)))
    return [p for *_, p in sorted(points, key=lambda t: t[:3])]


def point_key(point: Point, task_files: list[str]) -> str:
    """Changes when anything that decides a point's result changes: its recipe, overrides or tasks (and their data)."""
    from sparseft.eval.tasks import load_task

    h = hashlib.sha256()
    h.update(json.dumps([point.method, point.budget, point.lr, point.overrides]).encode())
    h.update(Path(point.recipe).read_bytes())
    for f in task_files:
        h.update(Path(f).read_bytes())
        h.update(Path(load_task(f).data).read_bytes())
    return h.hexdigest()[:16]
