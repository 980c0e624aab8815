"""Rebuild a trained model from a run directory and export it: merged (a plain Hugging Face directory in the base
model's layout) or as an adapter (each method's own form, in the base model's coordinates)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import sparseft
from sparseft.errors import UserError
from sparseft.export.fingerprint import FIELD, base_fingerprint
from sparseft.files import atomic_dir
from sparseft.methods import Method, MethodContext, build_method
from sparseft.models import load_model, load_tokenizer
from sparseft.models.loader import DTYPES
from sparseft.recipe import Recipe, load_recipe, recipe_to_yaml
from sparseft.train.checkpoint import TRAINABLE, RunDir, load_trainable
from sparseft.train.precision import keep_masters, resolve_device, resolve_precision


@dataclass
class TrainedRun:
    recipe: Recipe
    method: Method
    model: nn.Module
    tokenizer: object


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "recipe.yaml").is_file() and (Path(path) / "selection.json").is_file()


def load_run(run_dir: str | Path, state: str = "final", masters: bool = False, device: str | None = None) -> TrainedRun:
    """The prepared model with its trained weights: base from model.path, selection and weights from the run.

    masters: the run's trainable weights as trained (fp32 under mixed precision), for exports whose deltas must be
    exact; otherwise they load in the model's storage dtype, the form the trained model computes in.
    device: where to put it (`train.device`'s values; None: the CPU)."""
    run = RunDir(Path(run_dir))
    if not run.path.is_dir():
        raise UserError(f"run directory {run.path}: no such directory")
    if not is_run_dir(run.path):
        raise UserError(f"{run.path}: not a sparseft run directory (no recipe.yaml and selection.json)")
    src = run.final if state == "final" else run.checkpoints / state
    if not (src / TRAINABLE).is_file():
        have = ", ".join(d.name for d in run.checkpoint_dirs()) or "none"
        raise UserError(f"{run.path}: no trained state {state!r} (the run has not finished; checkpoints: {have})")
    recipe = load_recipe(run.recipe)
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path, recipe.model.trust_remote_code)
    where = resolve_device(device, key="--device") if device is not None else torch.device("cpu")
    precision = resolve_precision(recipe.train.precision, recipe.model.dtype)
    model = load_model(recipe.model.path, recipe.model.dtype, recipe.model.trust_remote_code,
                       attn_implementation=recipe.model.attn_implementation, device=where)
    method = build_method(recipe.method)
    selection = json.loads(run.selection.read_text())
    model = method.prepare(model, selection, MethodContext(recipe=recipe, tokenizer=tokenizer, run_dir=run.path,
                                                           log=lambda s: None, device=where))
    if masters:
        keep_masters(method.master_parameters(model), precision)
    load_trainable(model, src / TRAINABLE)
    model.eval()
    return TrainedRun(recipe, method, model, tokenizer)


MERGED_FORMATS = ("hf", "compressed-tensors")


def export_merged(run_dir: str | Path, out: str | Path, fmt: str = "hf") -> Path:
    """Write a merged model: a plain Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads with no
    sparseft installed (fmt hf), or with its sparse weights stored compressed (fmt compressed-tensors,
    export/compressed.py)."""
    if fmt not in MERGED_FORMATS:
        raise UserError(f"--format {fmt!r}: unknown (known: {', '.join(MERGED_FORMATS)})")
    save_weights = None
    if fmt == "compressed-tensors":
        from sparseft.export.compressed import require_compressed_tensors, save_compressed

        require_compressed_tensors()
        save_weights = save_compressed
    trained = load_run(run_dir, masters=True)
    # Folded in from the trained (master) values, then every weight in the storage dtype, rounded once.
    merged = trained.method.merged(trained.model).to(DTYPES[trained.recipe.model.dtype])
    files = {"sparseft_recipe.yaml": recipe_to_yaml(trained.recipe), **trained.method.export_files(merged)}
    return save_merged_dir(merged, trained.tokenizer, out, _describe(trained, "merged"), files, save_weights)


def save_merged_dir(model: nn.Module, tokenizer, out: str | Path, description: dict,
                    files: dict[str, str] | None = None, save_weights=None) -> Path:
    """A plain Hugging Face directory (model, tokenizer, `sparseft_export.json`), written atomically. `save_weights`
    (model, directory) -> dict writes config and weights in another format and describes them (default:
    save_pretrained)."""
    with atomic_dir(out) as tmp:
        if save_weights is None:
            model.save_pretrained(tmp)
        else:
            description = {**description, "weights": save_weights(model, tmp)}
        tokenizer.save_pretrained(tmp)
        desc = {"format_version": 1, "sparseft_version": sparseft.__version__, **description}
        (tmp / "sparseft_export.json").write_text(json.dumps(desc, indent=2) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def export_adapter(run_dir: str | Path, out: str | Path) -> Path:
    """Write the method's adapter, tensors in the base model's own coordinates."""
    trained = load_run(run_dir, masters=True)
    if not trained.method.has_adapter:
        raise UserError(f"method {trained.method.name!r} has no adapter form; export it with --merged")
    with atomic_dir(out) as tmp:
        fields = trained.method.save_adapter(trained.model, tmp, trained.recipe.model.path)
        _stamp_adapter_config(tmp, trained, fields)
        (tmp / "sparseft_recipe.yaml").write_text(recipe_to_yaml(trained.recipe))
    return Path(out)


def _describe(trained: TrainedRun, form: str) -> dict:
    return {"format_version": 1, "sparseft_version": sparseft.__version__, "form": form,
            "method": trained.method.name, "base_model": trained.recipe.model.path}


def _stamp_adapter_config(out: Path, trained: TrainedRun, fields: dict | None) -> None:
    """Every adapter says what made it: method, base model (with a fingerprint of its weights the adapter changes),
    format and sparseft versions (the recipe is beside it). They go into adapter_config.json, or into a file of their
    own where that file is another library's (`Method.metadata_file`; PEFT's for LoRA, so PEFT reads exactly its own
    keys)."""
    path = out / trained.method.metadata_file
    cfg = json.loads(path.read_text()) if path.exists() else {}
    desc = _describe(trained, "adapter")
    desc.pop("form")
    # The storage dtype the deltas were computed against: applied to the base in that dtype they are exact.
    desc["base_dtype"] = trained.recipe.model.dtype
    fingerprint = base_fingerprint(trained.model.config, trained.method.base_weights(trained.model))
    cfg.update({**desc, **(fields or {}), FIELD: fingerprint})
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
