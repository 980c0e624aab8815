"""Every bundled recipe validates (no model is loaded), and `recipes ls` / `recipes cp` work."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparseft.cli import app
from sparseft.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
runner = CliRunner()


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_bundled_recipe_validates(path):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "sparseft" in path.read_text().split("\n\n")[0], \
        "each recipe begins with a comment giving the command that runs it"
    assert recipe.train.max_steps > 0


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_bundled_recipe_reads_its_data(path, tiny_model_dir, monkeypatch):
    """Every data row of the recipe reads and encodes in its data.format (as `sparseft train` would, from the repo
    root): the schema alone does not catch rows the form cannot read."""
    from sparseft.data import build_datasets
    from sparseft.models import load_tokenizer

    monkeypatch.chdir(path.parent.parent)
    recipe = load_recipe(path)
    data = build_datasets(recipe.data, load_tokenizer(tiny_model_dir("llama")), seed=recipe.train.seed)
    assert len(data.train) > 0
    assert all(ex.n_loss_tokens > 0 for ex in data.train), "every example has a token in the loss"


def test_recipes_ls_and_cp(tmp_path):
    result = runner.invoke(app, ["recipes", "ls"])
    assert result.exit_code == 0 and "quickstart" in result.output and "s2ft" in result.output
    result = runner.invoke(app, ["recipes", "cp", "s2ft", str(tmp_path)])
    assert result.exit_code == 0
    assert (tmp_path / "s2ft.yaml").read_text() == (RECIPES[0].parent / "s2ft.yaml").read_text()
    again = runner.invoke(app, ["recipes", "cp", "s2ft", str(tmp_path)])
    assert again.exit_code == 2 and "exists already" in again.output
    unknown = runner.invoke(app, ["recipes", "cp", "nope", str(tmp_path)])
    assert unknown.exit_code == 2 and "not bundled" in unknown.output


TASKS = sorted((RECIPES[0].parent / "tasks").glob("*.yaml"))


@pytest.mark.parametrize("path", TASKS, ids=[p.stem for p in TASKS])
def test_validate_recognises_task_files(path):
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and f"eval task {path.stem}" in result.output, result.output


def test_validate_names_a_bad_task_key(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("metric: exact_match\ndata: x.jsonl\ncolour: red\n")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "colour: unknown key" in result.output
