"""Apply an adapter directory to a loaded base model, whatever method wrote it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from sparseft.errors import UserError
from sparseft.export.adapter_files import read_adapter


def adapter_method(path: str | Path) -> str:
    cfg, _ = read_adapter(path)
    return cfg["method"]


@contextmanager
def adapter_applied(model, path: str | Path):
    """The base model with the adapter at `path` in effect; the base is restored on exit."""
    method = adapter_method(path)
    if method == "lora":
        from peft import PeftModel

        try:
            peft_model = PeftModel.from_pretrained(model, str(path))
        except Exception as e:
            raise UserError(f"adapter {path}: PEFT cannot load it onto this model ({str(e).splitlines()[0]})") from None
        peft_model.eval()
        try:
            yield peft_model
        finally:
            peft_model.unload()
    elif method == "s2ft":
        from sparseft.export.sparse_adapters import fuse, load_sparse_adapter, unfuse

        adapter = load_sparse_adapter(path)
        fuse(model, adapter)
        try:
            yield model
        finally:
            unfuse(model, adapter)
    elif method == "lamda":
        from sparseft.methods.lamda.adapter import lamda_applied

        with lamda_applied(model, path) as adapted:
            yield adapted
    else:
        raise UserError(f"adapter {path}: method {method!r} cannot be applied to a base model here "
                        "(export it with --merged instead)")
