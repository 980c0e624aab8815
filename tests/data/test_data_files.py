"""Each file type reads the same rows, with row numbers for messages."""

from __future__ import annotations

import json

import pytest

from sparseft.data import read_numbered_rows, read_rows

ROWS = [
    {"instruction": "Add the numbers.", "input": "3 4", "output": "7"},
    {"instruction": "Say hi,\nthen \"bye\".", "input": "", "output": "hi, bye"},
    {"instruction": "Count to three.", "input": "", "output": "1 2 3"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_reads_the_same_rows(write, suffix):
    assert read_rows(write("train" + suffix, ROWS)) == ROWS


def test_csv_cells_stay_text(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("prompt,completion\n12 + 7 =,19\nNA,\n")
    assert read_rows(path) == [{"prompt": "12 + 7 =", "completion": "19"}, {"prompt": "NA", "completion": ""}]


def test_json_accepts_a_data_key_and_json_lines(tmp_path):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": ROWS, "version": 1}))
    assert read_rows(wrapped) == ROWS
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert read_rows(lines) == ROWS


def test_jsonl_numbers_are_line_numbers_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n")
    assert read_numbered_rows(path) == [(1, ROWS[0]), (4, ROWS[1])]


def test_reading_leaves_no_files_behind(write, tmp_path):
    path = write("train.parquet", ROWS)
    read_rows(path)
    assert [p.name for p in tmp_path.iterdir()] == ["train.parquet"]
