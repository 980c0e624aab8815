"""One point of a study, in its own process: train the recipe, then score the trained model on the study's tasks.

A process per point keeps each point's peak memory its own (the RSS high-water mark on CPU, the allocator's peak on
a GPU) and returns every byte to the system before the next point. The result is written as JSON beside the run.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import statistics
import traceback
from pathlib import Path
from typing import Sequence

from sparseft.study.spec import Point

ROLES = ("gain", "perplexity", "retention")
# The metric each task type is read by (higher is better except perplexity).
MAIN_METRIC = {"exact_match": "exact_match", "perplexity": "perplexity", "multiple_choice": "accuracy"}


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def median_step_seconds(metrics: Path) -> float | None:
    elapsed = [r["elapsed_s"] for r in map(json.loads, metrics.read_text().splitlines()) if "elapsed_s" in r]
    steps = [b - a for a, b in zip([0.0, *elapsed], elapsed)]
    return statistics.median(steps[1:] or steps) if steps else None


def score(model_path: str, task_files: Sequence[str], limit: int | None) -> dict[str, float]:
    """{role: main metric} for the (trained or base) model at `model_path`."""
    from sparseft.eval.runner import evaluate
    from sparseft.eval.tasks import load_task

    tasks = []
    for role, f in zip(ROLES, task_files):
        t = load_task(f, key=f"tasks.{role}")
        tasks.append(t.model_copy(update={"name": role, **({"limit": limit} if limit else {})}))
    out = {}
    for res in evaluate(model_path, tasks):
        metric = MAIN_METRIC[next(t.metric for t in tasks if t.name == res.task)]
        out[res.task] = float(res.metrics[metric])
    return out


def train_and_score(point: Point, run_dir: Path, task_files: Sequence[str], limit: int | None) -> dict:
    import torch

    from sparseft.export.run import load_run
    from sparseft.recipe import load_recipe
    from sparseft.train.loop import train

    recipe = load_recipe(point.recipe, [*point.overrides, f"train.output_dir={run_dir}"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(recipe, overwrite=True)
    peak = peak_memory_mib()
    trained = load_run(run_dir)
    trainable = sum(p.numel() for p in trained.method.trainable_parameters(trained.model).values())
    total = sum(p.numel() for p in trained.model.parameters())
    del trained
    scores = score(str(run_dir), task_files, limit)
    return {"id": point.id, "method": point.method, "budget": point.budget, "lr": point.lr,
            "trainable": trainable, "trainable_pct": 100 * trainable / total, "steps": result.steps,
            "train_s": result.seconds, "step_s": median_step_seconds(run_dir / "metrics.jsonl"),
            "peak_mib": peak, "first_loss": result.first_loss, "last_loss": result.last_loss, **scores}


def _child(job: str, out: str, args: tuple) -> None:
    import torch

    from sparseft.models.loader import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        res = train_and_score(*args) if job == "point" else {"scores": score(*args)}
    except BaseException as e:  # recorded as the point's failure; the study goes on with the next point
        res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    # CPU seconds of this process (all its threads): on a shared machine, a truer measure of the work than wall time.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    res["cpu_s"] = usage.ru_utime + usage.ru_stime
    Path(out).write_text(json.dumps(res, indent=1) + "\n")


def _context():
    """A fork server: a clean process that imported torch and sparseft once and forks each point from there. Forking
    the caller itself can deadlock when it already ran threads (torch's pools, tokenizers); spawning would import
    torch again for every point."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "sparseft.study.point"])
    return ctx


def in_child(job: str, out: Path, *args) -> dict:
    """Run `job` ("point" or "score") in a process of its own and return what it wrote to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".part")
    part.unlink(missing_ok=True)
    proc = _context().Process(target=_child, args=(job, str(part), args))
    proc.start()
    proc.join()
    if not part.is_file():
        return {"error": f"the point's process ended with exit code {proc.exitcode} and wrote nothing"}
    return json.loads(part.read_text())
