"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow.

Each gets what metrics.jsonl gets (every numeric value of every record, at its step), the resolved recipe as
hyperparameters (flattened to dotted keys), and the final eval results (eval.json). Only the process that writes
metrics.jsonl (rank 0) opens trackers: the Reporter owns them.

Where each writes, with no network needed:
- tensorboard: `<run>/tensorboard` (event files; `tensorboard --logdir <run>/tensorboard`). A resumed run purges the
  events after its checkpoint, as metrics.jsonl drops its lines.
- wandb: `<run>/wandb`; online unless `WANDB_MODE=offline` (then `wandb sync` uploads it later). Project from
  `WANDB_PROJECT` (default sparseft). A resumed run continues the same W&B run.
- mlflow: `MLFLOW_TRACKING_URI` when set, else a local file store at `<run>/mlruns` (`mlflow ui --backend-store-uri
  <run>/mlruns`). Experiment from `MLFLOW_EXPERIMENT_NAME` (default sparseft). A resumed run continues the same
  MLflow run.
The W&B and MLflow run ids are kept in `<run>/trackers.json` for resuming.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from sparseft.errors import UserError

# tracker -> (module it needs, the pyproject extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}
IDS_FILE = "trackers.json"


def check_trackers(names: list[str] | tuple[str, ...]) -> None:
    """Each tracker named in train.report_to is installed; else a UserError naming the extra that installs it."""
    for i, name in enumerate(names):
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"train.report_to[{i}]={name}: the {module} package is not installed; install the "
                            f"extra: pip install 'sparseft[{extra}]'")


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted.key: leaf}; lists stay whole (as text where a tracker needs scalars)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def scalars(record: dict) -> dict[str, float]:
    """The numeric values of a metrics.jsonl record, without its step."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def result_scalars(payload: dict) -> dict[str, float]:
    """eval.json's numbers as {task.metric: value}."""
    return {f"{r['task']}.{k}": v for r in payload.get("results", []) for k, v in scalars(r).items()}


class Tracker:
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def results(self, payload: dict) -> None: ...

    def close(self) -> None: ...


class TensorBoard(Tracker):
    def __init__(self, run_dir: Path, params: dict, recipe_yaml: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # Events at or after start_step that an earlier (killed or overwritten) run left are discarded on reading.
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)
        if not start_step:
            hp = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in params.items()}
            for summary in hparams(hp, {}):  # the HParams dashboard's experiment, session start and end
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("recipe", "```yaml\n" + recipe_yaml + "```")

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def results(self, payload: dict) -> None:
        self.writer.add_text("eval", "```json\n" + json.dumps(payload, indent=2) + "\n```", payload.get("step"))

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    def __init__(self, run_dir: Path, params: dict, run_id: str | None):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sparseft"), name=run_dir.name,
                              dir=str(run_dir), config=params, id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(silent=True))
        self.id = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def results(self, payload: dict) -> None:
        self.run.summary.update({f"eval/{k}": v for k, v in result_scalars(payload).items()})

    def close(self) -> None:
        self.run.finish()


class MLflow(Tracker):
    def __init__(self, run_dir: Path, params: dict, run_id: str | None):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow keeps its file store in maintenance mode behind this switch; it needs no server or database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "sparseft")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
            # MLflow caps a parameter value at 6000 characters.
            values = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)[:6000])
                      for k, v in params.items()]
            for i in range(0, len(values), 100):  # at most 100 params a batch
                self.client.log_batch(run_id, params=values[i:i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.id = run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def results(self, payload: dict) -> None:
        self.client.log_dict(self.id, payload, "eval.json")

    def close(self) -> None:
        self.client.set_terminated(self.id)


class Trackers:
    """The recipe's trackers for one run, fed by the Reporter: every record, the final eval results, and close."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, record: dict) -> None:
        values = scalars(record)
        if values:
            for t in self.trackers:
                t.log(int(record["step"]), values)

    def results(self, payload: dict) -> None:
        for t in self.trackers:
            t.results(payload)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def open_trackers(recipe, run_dir: Path, start_step: int) -> Trackers | None:
    """Open the trackers of `train.report_to` (None when it is empty); call on the process that writes metrics only."""
    names = list(recipe.train.report_to)
    if not names:
        return None
    check_trackers(names)
    from sparseft.recipe import recipe_to_yaml

    params = flat(recipe.model_dump(mode="json"))
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if start_step and ids_path.is_file() else {}
    opened: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            opened.append(TensorBoard(run_dir, params, recipe_to_yaml(recipe), start_step))
        elif name == "wandb":
            opened.append(WandB(run_dir, params, ids.get("wandb")))
            ids["wandb"] = opened[-1].id
        else:
            opened.append(MLflow(run_dir, params, ids.get("mlflow")))
            ids["mlflow"] = opened[-1].id
    ids_path.write_text(json.dumps(ids, indent=2) + "\n")
    return Trackers(opened)
