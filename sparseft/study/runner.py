"""`sparseft study STUDY.yaml`: run every point of the grid (each in its own process), cache finished points, and
write the table, the Pareto plot and the reading of the claims after every point, so a killed study leaves a report of
what it finished and resumes where it stopped."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from sparseft.errors import UserError
from sparseft.study.point import in_child
from sparseft.study.report import write_report
from sparseft.study.spec import Point, Study, grid_points, point_key


def _model_path(points: list[Point]) -> str:
    """The one base model every point trains (checked before anything runs: a typo fails now, not in an hour)."""
    from sparseft.recipe import load_recipe

    paths = {load_recipe(p.recipe, list(p.overrides)).model.path for p in points}
    if len(paths) != 1:
        raise UserError(f"study: the recipes name several base models {sorted(paths)}; a study compares methods "
                        f"on one")
    return paths.pop()


def _cached(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    return res if res.get("key") == key and "error" not in res else None


def run_study(study: Study, quick: bool = False, log=print, keep_runs: bool = False) -> Path:
    out = Path(study.output_dir) / ("quick" if quick else "")
    points = grid_points(study, quick)
    model = _model_path(points)
    task_files = [study.tasks.gain, study.tasks.perplexity, study.tasks.retention]
    limit = study.quick.limit if quick else None
    began = time.perf_counter()

    # The base model's scores depend on the model and the tasks only (the gain task file stands in for a recipe).
    base_key = point_key(Point("base", "-", 0.0, task_files[0], (model, str(limit))), task_files)
    base = _cached(out / "base.json", base_key)
    if base is None:
        log(f"scoring the base model {model}")
        base = in_child("score", out / "base.json", model, task_files, limit)
        if "error" in base:
            raise UserError(f"study: scoring the base model {model} failed: {base['error']}")
        base = {"key": base_key, "model": model, **base["scores"], "cpu_s": base["cpu_s"]}
        (out / "base.json").write_text(json.dumps(base, indent=1) + "\n")

    results = []
    for i, p in enumerate(points, 1):
        key = point_key(p, task_files)
        where = out / "points" / p.id
        res = _cached(where / "result.json", key)
        if res is not None:
            log(f"[{i}/{len(points)}] {p.id}: cached")
        else:
            log(f"[{i}/{len(points)}] {p.id}: training")
            t0 = time.perf_counter()
            res = in_child("point", where / "result.json", p, where / "run", task_files, limit)
            res.update(key=key, id=p.id, method=p.method, budget=p.budget, lr=p.lr,
                       wall_s=time.perf_counter() - t0)
            (where / "result.json").write_text(json.dumps(res, indent=1) + "\n")
            if not keep_runs:  # the trained weights (a full copy of the model for full FT) are not needed again
                shutil.rmtree(where / "run" / "final", ignore_errors=True)
                shutil.rmtree(where / "run" / "checkpoints", ignore_errors=True)
            log(f"    {_brief(res)}")
        results.append(res)
        write_report(out, base, results, [q.id for q in points], time.perf_counter() - began, quick)
    return out


def _brief(res: dict) -> str:
    if "error" in res:
        return f"failed: {res['error']}"
    return (f"gain {res['gain']:.3f} · retention {res['retention']:.3f} · perplexity {res['perplexity']:.2f} · "
            f"{res['trainable']:,} trainable · {res['step_s']:.2f} s/step · {res['wall_s']:.0f} s")
