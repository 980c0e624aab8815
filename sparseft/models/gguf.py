"""GGUF files as a model source: dequantized on load into a plain Hugging Face causal LM, tokenizer from the same file.

transformers reads GGUF (with the `gguf` package) and dequantizes every tensor. The model it returns carries a gguf
`quantization_config` in its config, and `save_pretrained` refuses such a model, so `plain_model` rebuilds the model
from the config without that entry and loads the dequantized state dict into it: what sparseft trains and exports is
then an ordinary model, and exports are ordinary Hugging Face directories.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from sparseft.errors import UserError

EXTRA_HINT = "pip install 'sparseft[gguf]'"


def gguf_source(path: str, gguf_file: str | None = None) -> tuple[Path, str] | None:
    """(directory, file name) when the source is GGUF: `path` a .gguf file, or a directory with `gguf_file` in it;
    None for any other source (a Hugging Face directory or hub id)."""
    p = Path(path).expanduser()
    if gguf_file is not None:
        return p, gguf_file
    if p.suffix.lower() == ".gguf":
        return p.parent, p.name
    return None


def require_gguf(key: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"{key}: reading a GGUF file needs the `gguf` package: {EXTRA_HINT}")


def _check_file(directory: Path, name: str, key: str) -> Path:
    f = directory / name
    if not f.is_file():
        raise UserError(f"{key}={f}: no such GGUF file")
    require_gguf(key)
    return f


def _read(auto_class, what: str, directory: Path, name: str, key: str, **kwargs):
    """`auto_class.from_pretrained` on the GGUF file; what transformers cannot read becomes one UserError."""
    f = _check_file(directory, name, key)
    try:
        return auto_class.from_pretrained(str(directory), gguf_file=name, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{key}={f}: cannot read {what} from it ({str(e).splitlines()[0]})") from None


def load_gguf_tokenizer(directory: Path, name: str, key: str = "model.path"):
    """The tokenizer stored in the GGUF file, with a pad token (the EOS token where it has none)."""
    from transformers import AutoTokenizer

    tok = _read(AutoTokenizer, "a tokenizer", directory, name, key)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def plain_model(model, dtype: torch.dtype):
    """The same weights in a model built from the config without its gguf quantization_config (savable, exportable)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # A tied head has no tensor of its own in the file; anything else missing would be a silent random weight.
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise UserError(f"GGUF model: weights do not match the {type(fresh).__name__} built from its config "
                        f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    fresh.tie_weights()
    return fresh


def load_gguf_model(directory: Path, name: str, dtype: torch.dtype, key: str = "model.path"):
    """The causal LM in the GGUF file, dequantized into `dtype`, as a plain (exportable) Hugging Face model."""
    from transformers import AutoModelForCausalLM

    return plain_model(_read(AutoModelForCausalLM, "a causal LM", directory, name, key, dtype=torch.float32), dtype)


def gguf_config(directory: Path, name: str, key: str = "model.path"):
    """The model's config as read from the GGUF file's metadata (no tensor is dequantized)."""
    from transformers import AutoConfig

    config = _read(AutoConfig, "a model config", directory, name, key)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config
