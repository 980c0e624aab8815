"""Reading a task's rows: its data file (first `limit` rows) and its few-shot examples, with row numbers for errors."""

from __future__ import annotations

from sparseft.data import read_numbered_rows
from sparseft.errors import UserError
from sparseft.eval.tasks import FewShot


def task_rows(task) -> list[tuple[int, dict]]:
    """(row number, row) of the task's data file, cut to `limit`."""
    rows = read_numbered_rows(task.data, f"task {task.name}: data")
    return rows[:task.limit] if task.limit else rows


def shot_rows(task) -> list[tuple[str, dict]]:
    """(where, row) of the few-shot examples, `where` naming each for error messages; [] without few_shot."""
    shots: FewShot | None = getattr(task, "few_shot", None)
    if shots is None:
        return []
    if shots.examples is not None:
        n = shots.n or len(shots.examples)
        if n > len(shots.examples):
            raise UserError(f"task {task.name}: few_shot.n={n} but few_shot.examples holds {len(shots.examples)}")
        return [(f"task {task.name}: few_shot.examples[{i}]", row) for i, row in enumerate(shots.examples[:n])]
    rows = read_numbered_rows(shots.path, f"task {task.name}: few_shot.path")
    n = shots.n or 3
    if n > len(rows):
        raise UserError(f"task {task.name}: few_shot.n={n} but few_shot.path={shots.path} has {len(rows)} rows")
    return [(f"task {task.name}: few_shot.path={shots.path} row {number}", row) for number, row in rows[:n]]


def data_where(task, number: int) -> str:
    return f"task {task.name}: data={task.data} row {number}"
