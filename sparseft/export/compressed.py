"""Merged export in the `compressed-tensors` format (`sparseft export RUN --merged OUT --format compressed-tensors`).

Generic over methods: whatever linear weights of the merged model are sparse (at least MIN_SPARSITY zeros) are stored
compressed; nothing asks which method made them. When every such weight is 2:4 along its input dimension the model
is written as `sparse-24-bitmask` (two values a group of four, and the bitmask), otherwise as `sparse-bitmask`
(the non-zero values, the bitmask and each row's offset). Other tensors stay dense.

The layout is compressed-tensors' own: for a module `M`, `M.compressed`, `M.bitmask`, `M.shape` (and
`M.row_offsets` for sparse-bitmask) replace `M.weight`, and config.json carries `quantization_config` with the
`sparsity_config` (compressed-tensors' BitmaskConfig or Sparse24BitMaskConfig, its names of the formats). The bit
packing is compressed-tensors' `pack_bitmasks` / `unpack_bitmasks`. compressed-tensors 0.15 and later dropped the
sparse compressors themselves (only the configs and the bit packing remain) and their 0.14 release needs
transformers < 5, so the few lines that lay the tensors out live here; the tests check the files against
compressed-tensors 0.14's own decompressor.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from sparseft.errors import UserError

FORMAT = "compressed-tensors"
MIN_SPARSITY = 0.1  # below this a bitmask and values take more room than the dense weight saves
WEIGHTS = "model.safetensors"


def require_compressed_tensors() -> None:
    if importlib.util.find_spec("compressed_tensors") is None:
        raise UserError("--format compressed-tensors: the compressed-tensors package is not installed; install the "
                        "extra: pip install 'sparseft[compressed]'")


def sparse_linears(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name: weight} of the linears whose weights are at least MIN_SPARSITY zeros (the output head excluded:
    it is often tied to the embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            w = module.weight.detach()
            if float((w == 0).float().mean()) >= MIN_SPARSITY:
                out[name] = w
    return out


def is_24(weight: torch.Tensor) -> bool:
    """At most two non-zeros in every group of four consecutive inputs."""
    return weight.shape[-1] % 4 == 0 and bool(((weight.reshape(-1, 4) != 0).sum(-1) <= 2).all())


def compress_weight(weight: torch.Tensor, two_four: bool) -> dict[str, torch.Tensor]:
    """One weight in compressed-tensors' tensor layout (keys relative to the module)."""
    from compressed_tensors.utils import pack_bitmasks

    w = weight.detach().cpu().contiguous()
    rows, cols = w.shape
    if two_four:
        # The two largest of every four (zeros included where a group has fewer non-zeros): exactly cols/2 a row.
        top = w.reshape(-1, 4).abs().topk(2, dim=1).indices
        keep = torch.zeros(w.numel() // 4, 4, dtype=torch.bool).scatter_(1, top, True).reshape(rows, cols)
        return {"compressed": w[keep].reshape(rows, cols // 2), "bitmask": pack_bitmasks(keep),
                "shape": torch.tensor([rows, cols]).reshape(-1, 1)}
    keep = w != 0
    counts = keep.sum(-1)
    return {"compressed": w[keep], "bitmask": pack_bitmasks(keep), "shape": torch.tensor([rows, cols]),
            "row_offsets": torch.cumsum(counts, 0) - counts}


def compressed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(the tensors to save, config.json's quantization_config); a UserError when no weight is sparse."""
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    sparse = sparse_linears(model)
    if not sparse:
        raise UserError(f"--format {FORMAT}: no linear weight of this model is {MIN_SPARSITY:.0%} zeros or more, so "
                        "there is nothing to compress; export it without --format (a SquareHead run is sparse)")
    two_four = all(is_24(w) for w in sparse.values())
    zeros = sum(int((w == 0).sum()) for w in sparse.values())
    total = sum(w.numel() for w in sparse.values())
    cls = Sparse24BitMaskConfig if two_four else BitmaskConfig
    config = cls(global_sparsity=round(zeros / total, 6), sparsity_structure="2:4" if two_four else "unstructured",
                 targets=sorted(sparse), ignore=[])
    state = {}
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in sparse and key == f"{module}.weight":
            state.update({f"{module}.{k}": v for k, v in compress_weight(value, two_four).items()})
        else:
            state[key] = value.detach().cpu().contiguous()
    # Tied tensors share storage; safetensors refuses shared storage, and the config re-ties them on load.
    if getattr(model.config, "tie_word_embeddings", False):
        head = [k for k in state if k.endswith("lm_head.weight")]
        for k in head:
            state.pop(k)
    quant = {"quant_method": "compressed-tensors", "version": ct_version,
             "sparsity_config": config.model_dump(exclude_none=True)}
    return state, quant


def save_compressed(model: nn.Module, out: Path) -> dict:
    """Write the weights and config into `out` (a directory being assembled by the caller); returns the size report."""
    state, quant = compressed_state(model)
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = quant
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    sc = quant["sparsity_config"]
    # what the dense weights take (tied tensors once), for the size report
    dense = {t.untyped_storage().data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return {"format": sc["format"], "sparsity_structure": sc["sparsity_structure"],
            "global_sparsity": sc["global_sparsity"], "compressed_modules": len(sc["targets"]),
            "weights_bytes": (out / WEIGHTS).stat().st_size, "dense_tensor_bytes": sum(dense.values())}


def load_compressed_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a compressed export (with compressed-tensors' unpack_bitmasks), e.g. to check it."""
    from compressed_tensors.utils import unpack_bitmasks
    from safetensors.torch import load_file

    tensors = load_file(str(Path(directory) / WEIGHTS))
    dense = {}
    for key in [k for k in tensors if k.endswith(".bitmask")]:
        module = key[: -len(".bitmask")]
        shape = tensors.pop(f"{module}.shape").flatten().tolist()
        values = tensors.pop(f"{module}.compressed").flatten()
        keep = unpack_bitmasks(tensors.pop(key), shape)
        tensors.pop(f"{module}.row_offsets", None)
        w = torch.zeros(shape, dtype=values.dtype)
        w[keep] = values
        dense[f"{module}.weight"] = w
    return {**tensors, **dense}
