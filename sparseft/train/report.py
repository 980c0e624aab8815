"""What a run shows and leaves behind: a progress bar (or plain lines when stdout is not a terminal), metrics.jsonl,
and a loss-curve PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sparseft.errors import UserError


class Reporter:
    def __init__(self, metrics_path: Path, max_steps: int, start_step: int, console: Console | None = None,
                 trackers=None):
        self.console = console or Console(stderr=False)
        self.trackers = trackers  # sparseft.train.trackers.Trackers: each record goes to them too
        self.metrics_path = metrics_path
        self.max_steps = max_steps
        _truncate_after(metrics_path, start_step)
        self._file = open(metrics_path, "a")
        self.interactive = sys.stdout.isatty()
        self.progress = None
        if self.interactive:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            )
            self.task = self.progress.add_task("train", total=max_steps, completed=start_step, info="")
            self.progress.start()

    def info(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def log(self, record: dict, show: bool = True) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.trackers is not None:
            self.trackers.log(record)
        if not show:
            return
        step = record["step"]
        parts = [f"{k} {_fmt(v)}" for k, v in record.items() if k not in ("step", "elapsed_s")]
        line = "  ".join(parts)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=line)
        else:
            print(f"step {step}/{self.max_steps}  {line}", flush=True)

    def results(self, payload: dict) -> None:
        """The final eval results (what eval.json holds), for the trackers."""
        if self.trackers is not None:
            self.trackers.results(payload)

    def close(self) -> None:
        """End the display, metrics.jsonl and the trackers; a second call (the run's exit path after its end) does
        nothing."""
        if self._file.closed:
            return
        if self.progress is not None:
            self.progress.stop()
        self._file.close()
        if self.trackers is not None:
            self.trackers.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5)) else f"{v:.4f}"
    return str(v)


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop records a killed run wrote after its newest checkpoint, so the curve has no duplicates."""
    if not path.exists():
        return
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    keep = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:  # torn: the run was killed while writing its last line
                break
            raise UserError(f"{path}:{number}: not a JSON line; remove it (or the file) to resume") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}:{number}: a record without a step; remove it (or the file) to resume")
        if record["step"] <= step:
            keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp")  # a kill while rewriting leaves the old file
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out: Path, title: str) -> Path | None:
    """Training loss (and validation loss where logged) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.2, ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
