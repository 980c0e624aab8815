"""Atomic directory writes, shared by checkpoints and exports: a directory appears complete or not at all, and is on
disk (synced) before it appears."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary directory beside `out`; on success it replaces `out`, on any error it is removed, so
    a killed or failed write never leaves a half directory under the final name. Files and directory are synced before
    the rename and the parent after it, so a power loss leaves the old directory or the whole new one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        _sync_tree(tmp)
        _replace_dir(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# The temporary directories atomic_dir makes (mkdtemp's 8-character suffix) and the old copy it moves aside.
_TEMP = re.compile(r"^\..+\.([a-z0-9_]{8}|old)$")


def remove_stale_temps(parent: Path) -> list[Path]:
    """Remove the temporary directories that killed atomic_dir writes left in `parent`; returns them. Call it only
    where nothing else is writing into `parent`."""
    if not Path(parent).is_dir():
        return []
    stale = [d for d in Path(parent).iterdir() if _TEMP.match(d.name) and d.is_dir() and not d.is_symlink()]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def check_output_path(path: str | Path, where: str, directory: bool = False) -> None:
    """A UserError starting with `where` when `path` cannot be written: a file is in the way (on its path or, for a
    directory, at it), or the nearest existing folder above it is not writable."""
    from sparseft.errors import UserError

    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise UserError(f"{where} {path}: a file, not a directory")
    existing = next((p for p in path.parents if p.exists()), None)
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{where} {path}: {blocker} is a file, not a directory")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{where} {path}: {existing} is not writable")


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
