"""Atomic directory writes, shared by checkpoints and exports: a directory appears complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary directory beside `out`; on success it replaces `out`, on any error it is removed, so
    a killed or failed write never leaves a half directory under the final name."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(path: Path, where: str) -> dict:
    """A JSON file that must hold an object; a UserError starting with `where` when it does not parse or is not one."""
    from sparseft.errors import UserError

    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: must be a JSON object")
    return data


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory to `out`, removing an older one only once the new one is in place."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
