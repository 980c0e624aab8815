"""Load causal LMs and tokenizers from a local directory, a GGUF file (models/gguf.py), or from the hub when online
(HF_HUB_OFFLINE is respected)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from sparseft.errors import UserError
from sparseft.models.gguf import gguf_config, gguf_source, load_gguf_model, load_gguf_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, warnings meant for library authors) out of what users read."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        # transformers imports DeepSpeed when it is installed; without this it warns that it fell back to the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # PEFT probes model.is_gradient_checkpointing, which transformers 5 deprecates; nothing a user can change.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _check_source(path: str, key: str) -> None:
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise UserError(f"{key}={path}: not a model directory (no config.json)")
        return
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(f"{key}={path}: no such directory")
    if _offline():
        raise UserError(f"{key}={path}: not a local directory, and HF_HUB_OFFLINE is set so the hub is not asked")


def load_tokenizer(path: str, trust_remote_code: bool = False, key: str = "model.path"):
    """The tokenizer, with a pad token (the EOS token where the tokenizer has none)."""
    from transformers import AutoTokenizer

    if (gguf := gguf_source(path)) is not None:
        return load_gguf_tokenizer(*gguf, key=key)
    _check_source(path, key)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{key}={path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def model_skeleton(path: str, trust_remote_code: bool = False, key: str = "model.path"):
    """The model's modules and shapes on the meta device, built from its config.json alone (no weight is read or
    allocated); None when `path` is not a local model directory (a hub id)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not Path(path).expanduser().exists():
        return None
    gguf = gguf_source(path)
    if gguf is None:
        _check_source(path, key)  # a directory, with a config.json
    try:
        if gguf:
            config = gguf_config(*gguf, key=key)
        else:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{key}={path}: cannot build a causal LM from its config.json ({str(e).splitlines()[0]})") \
            from None


def check_attention(attn_implementation: str | None, device: torch.device | str | None = None,
                    key: str = "model.attn_implementation") -> None:
    """flash_attention_2 needs a CUDA device and the flash-attn package; a UserError naming the key otherwise."""
    if attn_implementation != "flash_attention_2":
        return
    import importlib.util

    if device is not None and torch.device(device).type != "cuda":
        raise UserError(f"{key}=flash_attention_2: needs a CUDA device, and this run uses {device}; use sdpa or eager")
    if not torch.cuda.is_available():
        raise UserError(f"{key}=flash_attention_2: needs CUDA, which this machine does not have; use sdpa or eager")
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError(f"{key}=flash_attention_2: the flash-attn package is not installed (pip install flash-attn); "
                        "or use sdpa")


def load_model(path: str, dtype: str = "float32", trust_remote_code: bool = False, key: str = "model.path",
               attn_implementation: str | None = None, device: torch.device | str | None = None):
    """A causal LM in `dtype`, on `device` (the CPU when None), with transformers' attention kernel
    `attn_implementation` (None: transformers picks)."""
    from transformers import AutoModelForCausalLM

    check_attention(attn_implementation, device)
    if (gguf := gguf_source(path)) is not None:
        model = load_gguf_model(*gguf, DTYPES[dtype], key=key)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
    else:
        _check_source(path, key)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype],
                                                         trust_remote_code=trust_remote_code, **extra)
        except (OSError, ValueError) as e:
            raise UserError(f"{key}={path}: cannot load a causal LM ({str(e).splitlines()[0]})") from None
    if device is not None and torch.device(device).type != "cpu":
        model.to(device)
    return model
