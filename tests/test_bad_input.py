"""Bad recipes, data rows, model paths and adapters: exit code 2, one clear message naming the key, file or row,
no traceback, and nothing half-written."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from sparseft.cli import app
from tests.helpers import write_recipe

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    for n in needles:
        assert n in result.output, (n, result.output)


def edit(path, fn):
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data))
    return path


RECIPE_CASES = [
    # (id, edit of the recipe dict, overrides, words the message must contain)
    ("missing model.path", lambda d: d["model"].pop("path"), [], ["model.path", "Field required"]),
    ("unknown section", lambda d: d.update(optimiser={"lr": 1}), [], ["optimiser", "unknown key"]),
    ("typo in data", lambda d: d["data"].update(max_lenght=8), [], ["data.max_lenght", "unknown key"]),
    ("negative lr", lambda d: d["train"].update(lr=-1), [], ["train.lr", "greater than 0"]),
    ("zero steps", lambda d: d["train"].update(max_steps=0), [], ["train.max_steps"]),
    ("unknown method", lambda d: d["method"].update(name="lorra"), [], ["unknown method 'lorra'", "lora"]),
    ("field of another method", lambda d: d["method"].update(r=8), [], ["method.r", "unknown key"]),
    ("wrong type", lambda d: d.update(method={"name": "lora", "r": "big"}), [], ["method.r", "integer"]),
    ("unknown data format", lambda d: d["data"].update(format="tsv"), [], ["data.format", "tsv"]),
    ("betas of one value", lambda d: d["train"].update(betas=[0.9]), [], ["train.betas"]),
    ("val fraction", lambda d: d["data"].update(val_fraction=1.5), [], ["data.val_fraction"]),
    ("micro batch", lambda d: d["train"].update(micro_batch_size=-2), [], ["train.micro_batch_size"]),
    ("bad override value", lambda d: None, ["train.max_steps=many"], ["train.max_steps", "many"]),
    ("unknown override key", lambda d: None, ["train.lrr=1"], ["train.lrr", "unknown key"]),
    ("override without =", lambda d: None, ["train.lr"], ["train.lr", "key=value"]),
    ("bad interpolation", lambda d: d["train"].update(output_dir="${train.nope}"), [], ["train.nope"]),
    ("no method name", lambda d: d["method"].pop("name"), [], ["method.name", "missing"]),
]


@pytest.mark.parametrize("case", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipes(tmp_path, case):
    _, change, overrides, needles = case
    recipe = edit(write_recipe(tmp_path, "unused-model-dir"), change)
    assert_user_error(run("validate", recipe, *overrides), *needles)


def test_all_problems_at_once(tmp_path):
    recipe = edit(write_recipe(tmp_path, "m"), lambda d: (d["train"].update(lr=0, max_steps=-1),
                                                            d["data"].update(colour="red")))
    result = run("validate", recipe)
    assert_user_error(result, "3 problem(s)", "train.lr", "train.max_steps", "data.colour")


METHOD_FIT_CASES = [
    # (id, method section, words the message must contain): settings that only a model's shapes can refuse
    ("s2ft heads", {"name": "s2ft", "heads": {"count": 9}}, ["method.heads.count=9", "kv groups"]),
    ("s2ft channels", {"name": "s2ft", "projections": ["up", "down"], "channels": {"count": 100000}},
     ["method.channels.count=100000", "FFN channels"]),
    ("lamda rank", {"name": "lamda", "r": 500}, ["method.r=500", "largest possible rank"]),
    ("lamda++ budget", {"name": "lamda", "rank_allocation": "spectrum", "rank_budget": 1},
     ["method.rank_budget=1", "must be between"]),
    ("lora targets", {"name": "lora", "target_modules": ["qkv_proj"]}, ["method.target_modules", "qkv_proj"]),
]


@pytest.mark.parametrize("case", METHOD_FIT_CASES, ids=[c[0] for c in METHOD_FIT_CASES])
def test_validate_checks_method_settings_against_the_model_config(tmp_path, tiny_model_dir, case):
    """validate builds the model from its config.json alone (meta device, no weights) and lets the method check its
    settings against it; train refuses the same recipe with the same message."""
    _, method, needles = case
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), method)
    assert_user_error(run("validate", recipe), *needles)
    assert_user_error(run("train", recipe), *needles)
    assert not (tmp_path / "run" / "final").exists()


def test_validate_says_what_it_checked(tmp_path, tiny_model_dir, monkeypatch):
    ok = run("validate", write_recipe(tmp_path, tiny_model_dir("llama"), {"name": "s2ft"}))
    assert ok.exit_code == 0 and "(checked against its config)" in ok.output
    hub_recipe = write_recipe(tmp_path, "some-org/some-model", {"name": "s2ft"}, name="hub.yaml")
    assert_user_error(run("validate", hub_recipe), "model.path=some-org/some-model", "HF_HUB_OFFLINE")  # as train
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub = run("validate", hub_recipe)
    assert hub.exit_code == 0 and "(not checked: not a local directory)" in hub.output
    (tmp_path / "empty").mkdir()
    bad = run("validate", write_recipe(tmp_path, str(tmp_path / "empty"), name="dir.yaml"))
    assert_user_error(bad, "model.path=", "not a model directory (no config.json)")


def test_not_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: [unclosed\n")
    assert_user_error(run("validate", p), str(p), "not valid YAML")


def test_not_a_mapping(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- a\n- b\n")
    assert_user_error(run("validate", p), "must be a mapping")


def test_missing_recipe_file(tmp_path):
    assert_user_error(run("train", tmp_path / "nope.yaml"), "nope.yaml", "no such file")


# --- input that only shows when training starts: data rows, model paths --------------------------------------------

def _train_with_rows(tmp_path, tiny_model_dir, lines: list[str]):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"))
    (tmp_path / "train.jsonl").write_text("".join(x + "\n" for x in lines))
    return run("train", recipe)


GOOD = json.dumps({"prompt": "1 + 1 =", "completion": " 2"})


def test_row_missing_field(tmp_path, tiny_model_dir):
    r = _train_with_rows(tmp_path, tiny_model_dir, [GOOD, GOOD, json.dumps({"prompt": "2 + 2 ="})])
    assert_user_error(r, "train.jsonl", "row 3", "completion")
    assert not (tmp_path / "run" / "final").exists()


def test_row_not_json(tmp_path, tiny_model_dir):
    r = _train_with_rows(tmp_path, tiny_model_dir, [GOOD, "{not json"])
    assert_user_error(r, "train.jsonl", "line 2")


def test_row_wrong_type(tmp_path, tiny_model_dir):
    r = _train_with_rows(tmp_path, tiny_model_dir, [GOOD, json.dumps({"prompt": "3 + 4 =", "completion": 7})])
    assert_user_error(r, "train.jsonl", "row 2", "completion")


def test_data_file_missing(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"))
    (tmp_path / "train.jsonl").unlink()
    assert_user_error(run("train", recipe), "data.train.path", "train.jsonl")


def test_model_path_missing(tmp_path):
    recipe = write_recipe(tmp_path, str(tmp_path / "no-model"))
    assert_user_error(run("train", recipe), "model.path", "no-model")


def test_lora_target_not_in_model(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), {"name": "lora", "target_modules": ["qproj"]})
    assert_user_error(run("train", recipe), "method.target_modules", "qproj")


def test_resume_without_run(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"))
    assert_user_error(run("train", recipe, "--resume"), "train.output_dir", "nothing to resume")


def test_run_dir_taken(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), train={"max_steps": 1})
    assert run("train", recipe).exit_code == 0
    assert_user_error(run("train", recipe), "train.output_dir", "--overwrite")


def test_overwrite_with_bad_data_keeps_the_old_run(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), train={"max_steps": 1})
    assert run("train", recipe).exit_code == 0
    final = (tmp_path / "run" / "final" / "trainable.safetensors").read_bytes()
    (tmp_path / "train.jsonl").write_text(GOOD + "\n" + json.dumps({"prompt": "2 + 2 ="}) + "\n")
    assert_user_error(run("train", recipe, "--overwrite"), "row 2", "completion")
    assert (tmp_path / "run" / "final" / "trainable.safetensors").read_bytes() == final
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_bad_adapter_and_gate(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    data = write_recipe(tmp_path, model) and tmp_path / "val.jsonl"
    assert_user_error(run("eval", model, "--data", data, "--form", "completion", "--adapter", tmp_path / "nope"),
                      "adapter", "nope")
    assert_user_error(run("eval", model, "--data", data, "--fail-under", "accuracy"), "--fail-under", "accuracy")


def test_export_not_a_run(tmp_path):
    assert_user_error(run("export", tmp_path, "--merged", tmp_path / "out"), "not a sparseft run directory")
    assert not (tmp_path / "out").exists()
