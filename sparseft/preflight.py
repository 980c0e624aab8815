"""What `sparseft validate` checks beyond the schema: the paths a recipe names exist and can be used, so a recipe that
validates does not fail on them once `train` starts. Every problem is reported at once, each with its key."""

from __future__ import annotations

from pathlib import Path

from sparseft.errors import UserError
from sparseft.recipe import Recipe


def path_problems(recipe: Recipe) -> list[str]:
    from sparseft.data.files import SUFFIXES
    from sparseft.eval.tasks import load_task
    from sparseft.models.loader import _check_source

    problems = []

    def attempt(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except UserError as e:
            problems.append(str(e))

    attempt(_check_source, recipe.model.path, "model.path")
    if recipe.model.tokenizer and not Path(recipe.model.tokenizer).expanduser().is_dir():
        attempt(_check_source, recipe.model.tokenizer, "model.tokenizer")
    files = {}  # local data files (a hub dataset is checked when it is read)
    if recipe.data.train.path is not None:
        files["data.train.path"] = recipe.data.train.path
    if recipe.data.validation is not None and recipe.data.validation.path is not None:
        files["data.validation.path"] = recipe.data.validation.path
    if recipe.eval is not None and recipe.eval.data:
        files["eval.data"] = recipe.eval.data
    for key, value in files.items():
        p = Path(value)
        if p.suffix.lower() not in SUFFIXES:
            problems.append(f"{key}={value}: unknown file type {p.suffix or '(none)'!r}; use one of "
                            f"{', '.join(SUFFIXES)}")
        elif not p.is_file():
            problems.append(f"{key}={value}: no such file")
        elif p.stat().st_size == 0:
            problems.append(f"{key}={value}: the file is empty")
    for i, task in enumerate(recipe.eval.tasks if recipe.eval is not None else []):
        attempt(load_task, task, key=f"eval.tasks.{i}")
    out = Path(recipe.train.output_dir)
    blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        problems.append(f"train.output_dir={out}: {blocker} is a file, not a directory")
    return problems
