"""Reading data files into rows: .jsonl, .json, .csv and .parquet.

Each row keeps a 1-based number for messages: the line number in a .jsonl file, the position in a .json list, the
data row (header not counted) in a .csv file and the row in a .parquet file.

- .jsonl: one JSON object a line; blank lines are skipped (but still counted, so numbers stay line numbers).
- .json: a list of objects, or an object whose "data" key holds that list. A .json file that is really JSON Lines
  (common on the hub) is read as JSON Lines.
- .csv: read through `datasets` with every column as text, so "7" stays "7" and an empty cell is "" (never null or NaN).
- .parquet: read through `datasets`; values keep their types (so a chat column can be a list of structs).
"""

from __future__ import annotations

import contextlib
import csv
import json
import tempfile
from pathlib import Path
from typing import Any, Iterator

from sparseft.errors import UserError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_rows(path: str | Path, source_key: str = "data.train.path") -> list[dict]:
    """The rows of a local data file as dicts, in file order; a problem is a UserError naming `source_key` and file."""
    return [row for _, row in read_numbered_rows(path, source_key)]


def read_numbered_rows(path: str | Path, source_key: str = "data.train.path") -> list[tuple[int, dict]]:
    """Like `read_rows`, with each row's 1-based number (see the module docstring) for error messages."""
    where = f"{source_key}={path}"
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{where}: unknown file type {p.suffix or '(none)'!r}; use one of {', '.join(SUFFIXES)}")
    if not p.is_file():
        raise UserError(f"{where}: no such file")
    if p.stat().st_size == 0:
        raise UserError(f"{where}: the file is empty")
    if suffix == ".jsonl":
        rows = _read_jsonl(p, where)
    elif suffix == ".json":
        rows = _read_json(p, where)
    else:
        rows = list(enumerate(_read_with_datasets(p, suffix, where), start=1))
    if not rows:
        raise UserError(f"{where}: the file has no rows")
    for number, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where} row {number}: expected a JSON object, got {type(row).__name__}")
    return rows


def _read_text(p: Path, where: str) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text ({e})") from None


def _read_jsonl(p: Path, where: str, text: str | None = None) -> list[tuple[int, Any]]:
    rows = []
    for number, line in enumerate((text if text is not None else _read_text(p, where)).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{where} line {number}: not valid JSON ({e.msg}; column {e.colno})") from None
    return rows


def _read_json(p: Path, where: str) -> list[tuple[int, Any]]:
    text = _read_text(p, where)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            return _read_jsonl(p, where, text)
        raise UserError(f"{where}: not valid JSON ({e.msg}; line {e.lineno} column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{where}: expected a list of objects (or {{\"data\": [...]}}), got {type(data).__name__}")
    return list(enumerate(data, start=1))


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence datasets' progress bars and logs for one read (we report its errors ourselves), then restore them."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_off = datasets.utils.are_progress_bars_disabled()
    verbosity = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _read_with_datasets(p: Path, suffix: str, where: str) -> list[dict]:
    import datasets

    kwargs: dict[str, Any] = {}
    if suffix == ".csv":
        # CSV cells are text: without explicit string features pandas turns "7" into 7.0 and empty cells into null.
        with open(p, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f)
            header, first = next(reader, []), next(reader, None)
        if not header:
            raise UserError(f"{where}: the file has no header row")
        if first is None:  # datasets calls a header-only file "no data"; say it the way the other types do
            return []
        kwargs = dict(features=datasets.Features({c: datasets.Value("string") for c in header}), keep_default_na=False)
    # A throwaway cache: nothing lands in the repo or ~/.cache, and an edited file is never served from a stale cache.
    with quiet_datasets(), tempfile.TemporaryDirectory(prefix="sparseft-data-") as cache:
        try:
            ds = datasets.load_dataset(suffix[1:], data_files=str(p.resolve()), split="train", cache_dir=cache,
                                       **kwargs)
            return ds.to_list()
        except Exception as e:  # datasets wraps pandas/pyarrow errors; the innermost one says what is wrong
            while e.__cause__ is not None:
                e = e.__cause__
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{where}: could not read as {suffix[1:]}: {detail}") from None
