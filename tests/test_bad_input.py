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
