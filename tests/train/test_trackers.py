"""Experiment trackers: TensorBoard, MLflow and W&B get what metrics.jsonl holds, the recipe and the eval results."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sparseft.cli import app
from tests.helpers import records, write_recipe

runner = CliRunner()


def _expected(run) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from metrics.jsonl."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records(run):
        for k, v in r.items():
            if k != "step":
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


def _close(got: list[tuple[int, float]], want: list[tuple[int, float]], key: str) -> None:
    assert [s for s, _ in got] == [s for s, _ in want], key
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), key  # TensorBoard stores float32


@pytest.mark.slow
def test_trackers_get_what_metrics_jsonl_gets(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import wandb

    sent = {"log": [], "config": None, "summary": None}
    real_init = wandb.init

    def spy_init(**kwargs):  # the real offline run, with what sparseft hands it recorded
        run = real_init(**kwargs)
        sent["config"] = dict(run.config)
        log = run.log
        run.log = lambda values, step: (sent["log"].append((step, dict(values))), log(values, step=step))[1]
        finish = run.finish
        run.finish = lambda: (sent.update(summary=dict(run.summary)), finish())[1]
        return run

    monkeypatch.setattr(wandb, "init", spy_init)
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"),
                          train={"max_steps": 4, "eval_every": 2, "report_to": ["tensorboard", "wandb", "mlflow"]},
                          eval={"data": str(tmp_path / "val.jsonl")})
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = tmp_path / "run"
    want = _expected(run)
    assert {"loss", "lr", "grad_norm", "val_loss", "val.perplexity"} <= set(want)
    eval_payload = json.loads((run / "eval.json").read_text())

    # TensorBoard: read the event files back.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(want)
    for key, series in want.items():
        _close([(e.step, e.value) for e in acc.Scalars(key)], series, key)
    from tensorboard.plugins.hparams import plugin_data_pb2

    hp = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hp.session_start_info.hparams["train.lr"].number_value == 0.003
    assert hp.session_start_info.hparams["method.name"].string_value == "full"
    assert "recipe/text_summary" in acc.Tags()["tensors"] and "eval/text_summary" in acc.Tags()["tensors"]

    # MLflow: read the local file store back.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (mlrun,) = client.search_runs([client.get_experiment_by_name("sparseft").experiment_id])
    assert set(mlrun.data.metrics) == set(want)
    for key, series in want.items():
        _close([(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key)], series, key)
    assert mlrun.data.params["train.lr"] == "0.003" and mlrun.data.params["method.name"] == "full"
    assert json.loads((run / "mlruns").joinpath(mlrun.info.experiment_id, mlrun.info.run_id, "artifacts",
                                                "eval.json").read_text()) == eval_payload
    assert mlrun.info.status == "FINISHED"

    # W&B (offline): what the run was given.
    by_key: dict[str, list[tuple[int, float]]] = {}
    for step, values in sent["log"]:
        for k, v in values.items():
            by_key.setdefault(k, []).append((step, v))
    assert by_key.keys() == want.keys()
    for key, series in want.items():
        _close(by_key[key], series, key)
    assert sent["config"]["train.lr"] == 0.003 and sent["config"]["data.max_length"] == 16
    assert sent["summary"]["eval/val.perplexity"] == eval_payload["results"][0]["perplexity"]
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))


def test_missing_tracker_package_names_the_extra(tmp_path, tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), train={"report_to": ["tensorboard", "wandb"]})
    for cmd in ("validate", "train"):
        result = runner.invoke(app, [cmd, str(recipe)])
        assert result.exit_code == 2, result.output
        assert "train.report_to[1]=wandb" in result.output and "sparseft[wandb]" in result.output
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_unknown_tracker_is_a_recipe_error(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), train={"report_to": ["comet"]})
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2 and "train.report_to.0" in result.output
