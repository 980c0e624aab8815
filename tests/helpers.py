"""Builders the tests share: data files and recipe files for the tiny models."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import yaml
from typer.testing import CliRunner

from sparseft.cli import app


def cli(*args):
    """Run the real `sparseft` command in-process; it must succeed."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def run(*args):
    """Run the real `sparseft` command in-process; returns the result, whatever its exit code."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_exit(result, code, *needles):
    """The command ended with `code`, no traceback, and its output says each of `needles`."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    for n in needles:
        assert n in result.output, (n, result.output)


def random_batches(vocab: int, n: int, batch: int = 2, length: int = 12, seed: int = 0) -> list[dict]:
    """n seeded batches of random token ids (ids from 4 up: the special tokens stay out), every token labelled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (batch, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def records(run: Path) -> list[dict]:
    """The run directory's metrics.jsonl, one dict a line."""
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def write_arith(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{a} + {b} =", "completion": f" {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_recipe(tmp: Path, model_dir: str, method: dict | None = None, name: str = "recipe.yaml", **sections) -> Path:
    """A complete recipe on arithmetic data in `tmp`; `sections` update model/data/train keys, e.g. train={...}."""
    train_file = tmp / "train.jsonl"
    val_file = tmp / "val.jsonl"
    if not train_file.exists():
        write_arith(train_file, 64, seed=0)
        write_arith(val_file, 16, seed=1)
    recipe = {
        "model": {"path": model_dir},
        "data": {"train": {"path": str(train_file)}, "validation": {"path": str(val_file)},
                 "format": "completion", "max_length": 16},
        "method": method or {"name": "full"},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 8, "micro_batch_size": 4, "lr": 3e-3, "seed": 0},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path = tmp / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
