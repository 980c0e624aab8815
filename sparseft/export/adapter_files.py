"""Adapter directories: `adapter_config.json` + `adapter_model.safetensors`, every tensor in the base model's coordinates.

Writing is atomic (sparseft/files.py), so a failed export never leaves a half adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import sparseft
from sparseft.errors import UserError
from sparseft.files import atomic_dir, read_json_object

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METADATA_NAME = "sparseft_adapter.json"  # sparseft's fields, where adapter_config.json is PEFT's


def write_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict, extra_files: dict[str, str] = {}):
    """Write an adapter directory. `config` must hold `method` and `base_model`; format and versions are added here."""
    from safetensors.torch import save_file

    cfg = {"format_version": FORMAT_VERSION, "sparseft_version": sparseft.__version__, **config}
    for key in ("method", "base_model"):
        if key not in cfg:
            raise ValueError(f"adapter config needs {key!r}")
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
    return Path(out_dir)


def read_adapter_config(path: str | Path, method: str | None = None) -> dict:
    """Check an adapter directory and read its config: adapter_config.json, with sparseft's own fields from
    `sparseft_adapter.json` where the config file is another library's (PEFT's, for LoRA). Adapters written before
    that file existed kept sparseft's fields in adapter_config.json; they read the same. Problems are UserErrors
    naming the file."""
    d = Path(path)
    cfg_path, w_path, meta_path = d / CONFIG_NAME, d / WEIGHTS_NAME, d / METADATA_NAME
    if not d.is_dir():
        raise UserError(f"adapter {d}: no such directory")
    if not cfg_path.is_file():
        raise UserError(f"adapter {d}: {CONFIG_NAME} is missing")
    cfg = read_json_object(cfg_path, f"adapter {cfg_path}")
    if meta_path.is_file():
        cfg = {**cfg, **read_json_object(meta_path, f"adapter {meta_path}")}
    if "peft_type" in cfg and "method" not in cfg:
        cfg = {**cfg, "method": "lora"}
    for key in ("method", "base_model"):
        if key not in cfg and not (key == "base_model" and "base_model_name_or_path" in cfg):
            raise UserError(f"adapter {cfg_path}: key {key!r} is missing")
    if method is not None and cfg["method"] != method:
        raise UserError(f"adapter {d}: made by method {cfg['method']!r}, expected {method!r}")
    version = cfg.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"adapter {cfg_path}: format_version {version!r} is newer than this sparseft reads "
                        f"({FORMAT_VERSION}); upgrade sparseft")
    if not w_path.is_file():
        raise UserError(f"adapter {d}: {WEIGHTS_NAME} is missing")
    return cfg


def read_adapter(path: str | Path, method: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check an adapter directory: (config, tensors). Problems are UserErrors naming the file."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(path, method)
    w_path = Path(path) / WEIGHTS_NAME
    try:
        tensors = load_file(str(w_path))
    except Exception as e:
        raise UserError(f"adapter {w_path}: cannot read safetensors ({e})") from None
    return cfg, tensors
