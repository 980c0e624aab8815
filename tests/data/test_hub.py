"""Hub datasets (`data.train.hub`): the same rows, forms, renames and row errors as a file; offline, one message."""

from __future__ import annotations

import re

import datasets
import pytest
from typer.testing import CliRunner

from sparseft.cli import app
from sparseft.data import build_datasets
from sparseft.errors import UserError
from sparseft.recipe import validate_recipe_data
from tests.data.conftest import write_rows

CHATS = [{"conv": [{"role": "user", "content": f"What is {i} + {i}?"},
                   {"role": "assistant", "content": f"{2 * i}" + " and more" * (i % 4)}]} for i in range(9)]


def _data_section(tmp_path, train: dict, **extra):
    return validate_recipe_data({
        "model": {"path": "m"}, "method": {"name": "full"}, "train": {"max_steps": 1, "lr": 1e-3},
        "data": {"train": train, "format": "chat", "fields": {"messages": "conv"}, "max_length": 64, **extra},
    }).data


def _same(a, b):
    assert [(e.input_ids, e.labels) for e in a] == [(e.input_ids, e.labels) for e in b]


def test_saved_dataset_reads_like_the_file(tmp_path, tok):
    local = write_rows(tmp_path / "chats.jsonl", CHATS)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(CHATS[:3]),
                          "test": datasets.Dataset.from_list(CHATS)}).save_to_disk(str(tmp_path / "saved"))
    from_file = build_datasets(_data_section(tmp_path, {"path": local}), tok, seed=0)
    from_hub = build_datasets(_data_section(tmp_path, {"hub": str(tmp_path / "saved"), "split": "test"},
                                            val_fraction=0.2), tok, seed=0)
    assert len(from_hub.train) == 7 and len(from_hub.validation) == 2  # the held-out split works on hub rows too
    assert sorted(e.input_ids for e in from_hub.train + from_hub.validation) == \
        sorted(e.input_ids for e in from_file.train)
    whole = build_datasets(_data_section(tmp_path, {"hub": str(tmp_path / "saved"), "split": "test"}), tok, seed=0)
    _same(whole.train, from_file.train)
    with pytest.raises(UserError, match=r"no split 'validation' \(the dataset has train, test\)"):
        build_datasets(_data_section(tmp_path, {"hub": str(tmp_path / "saved"), "split": "validation"}), tok, 0)


def test_dataset_repository_through_load_dataset(tmp_path, tok):
    """A directory laid out like a hub repository goes through datasets.load_dataset, as a hub id does."""
    repo = tmp_path / "org-name"
    (repo / "data").mkdir(parents=True)
    write_rows(repo / "data" / "train.jsonl", CHATS)
    bad = [dict(r) for r in CHATS]
    bad[4] = {"conv": [{"role": "user", "content": "hi"}]}
    write_rows(repo / "data" / "test.jsonl", bad)
    local = write_rows(tmp_path / "chats.jsonl", CHATS)
    hub = build_datasets(_data_section(tmp_path, {"hub": str(repo)}), tok, seed=0)
    _same(hub.train, build_datasets(_data_section(tmp_path, {"path": local}), tok, seed=0).train)
    # Row errors name the source and the row, as for files.
    with pytest.raises(UserError, match=rf"data.train.hub={repo}\[test\] row 5: column 'conv' .* no assistant"):
        build_datasets(_data_section(tmp_path, {"hub": str(repo), "split": "test"}), tok, seed=0)


def test_offline_and_not_cached_is_one_message(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": tiny_model_dir("llama")}, "method": {"name": "full"},
        "data": {"train": {"hub": "sparseft-tests/never-downloaded", "subset": "x"}, "format": "chat"},
        "train": {"max_steps": 1, "lr": 1e-3, "output_dir": str(tmp_path / "run")}}))
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "data.train.hub=sparseft-tests/never-downloaded/x[train]: not in the local datasets cache" in result.output
    assert "HF_HUB_OFFLINE" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("train, message", [
    ({"path": "a.jsonl", "hub": "org/name"}, "data.train: give either path .* not both"),
    ({"split": "train"}, "data.train: give either path .* not neither"),
    ({"path": "a.jsonl", "split": "test", "revision": "main"}, "data.train: revision, split: only used with hub"),
])
def test_source_keys_are_checked(tmp_path, train, message):
    with pytest.raises(UserError) as e:
        _data_section(tmp_path, train)
    assert any(re.search(message, p) for p in e.value.problems), e.value.problems
