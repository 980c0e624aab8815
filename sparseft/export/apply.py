"""Apply an adapter directory to a loaded base model, whatever method wrote it.

The adapter's config names its method; the method class, looked up in the registry, applies it
(`Method.apply_adapter`), so nothing here branches on a method's name.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from sparseft.export.adapter_files import read_adapter_config
from sparseft.export.fingerprint import check_base
from sparseft.methods import Method, method_class


def adapter_method(path: str | Path) -> str:
    """The method that wrote the adapter at `path` (its files are checked)."""
    return read_adapter_config(path)["method"]


def adapter_class(path: str | Path) -> type[Method]:
    return method_class(adapter_method(path), where=f"adapter {path}: method")


@contextmanager
def adapter_applied(model, path: str | Path, force: bool = False):
    """The base model with the adapter at `path` in effect; the base is restored on exit. A base other than the one
    the adapter was made for is refused unless `force`."""
    cls = adapter_class(path)
    check_base(model, read_adapter_config(path), str(path), force)
    with cls.apply_adapter(model, Path(path)) as adapted:
        yield adapted


def mixable_adapters(model, paths, force: bool = False) -> list | None:
    """The adapters at `paths` loaded for one batch that mixes them row by row, or None when one of their methods
    cannot mix (they are then applied one after another)."""
    classes = [adapter_class(p) for p in paths]
    loaded = []
    for cls, p in zip(classes, paths):
        check_base(model, read_adapter_config(p), str(p), force)
        adapter = cls.load_mixable(Path(p), model)
        if adapter is None:
            return None
        loaded.append(adapter)
    return loaded
