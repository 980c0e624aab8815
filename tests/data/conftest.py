"""Fixtures for the data tests: the tiny tokenizer and a writer of small data files."""

from __future__ import annotations

import json

import pytest

from sparseft.models.tiny import train_tokenizer


@pytest.fixture(scope="session")
def tok():
    return train_tokenizer()


def write_rows(path, rows) -> str:
    """Write `rows` (a list of dicts) to `path` in the format its suffix names; returns the path as a string."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(suffix)
    return str(path)


@pytest.fixture
def write(tmp_path):
    """write(name, rows) -> path of a data file in a fresh temporary directory."""
    return lambda name, rows: write_rows(tmp_path / name, rows)


@pytest.fixture(scope="session")
def loss_text(tok):
    """loss_text(example) -> the decoded tokens that count in the loss, in order."""
    return lambda ex: tok.decode([t for t in ex.labels if t != -100])
