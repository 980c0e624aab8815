"""The architecture table: where each decoder's projections live and how its attention is shaped.

Structured methods (S2FT, HiFT, SquareHead) address blocks and projections by role, not by name. Head geometry is read
from the config (`num_key_value_heads`, `head_dim`), never assumed to be hidden/heads: Qwen3 and Mistral variants differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from sparseft.errors import UserError

# Roles of the projections in a decoder block, and whether a unit (head, channel) owns rows or columns of each.
ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("up", "gate", "down")
ROLES = ATTN_ROLES + MLP_ROLES
ROW_ROLES = ("q", "k", "v", "up", "gate")  # a unit is a block of output rows
COL_ROLES = ("o", "down")  # a unit is a block of input columns


@dataclass(frozen=True)
class ArchFamily:
    """Module paths of one model family, relative to the causal-LM root or to a decoder block."""

    blocks: str  # ModuleList of decoder blocks
    embed: str
    final_norm: str
    lm_head: str
    proj: dict[str, str]  # role -> path inside a block


_LLAMA_LIKE = ArchFamily(
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    proj={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "up": "mlp.up_proj",
        "gate": "mlp.gate_proj",
        "down": "mlp.down_proj",
    },
)

FAMILIES: dict[str, ArchFamily] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
}


@dataclass(frozen=True)
class ArchSpec:
    """One loaded model's geometry plus its family's module paths."""

    model_type: str
    family: ArchFamily
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool

    @property
    def group_size(self) -> int:
        """q heads that share one kv head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.family.blocks)

    def proj_path(self, layer: int, role: str) -> str:
        return f"{self.family.blocks}.{layer}.{self.family.proj[role]}"

    def proj(self, model: nn.Module, layer: int, role: str) -> nn.Linear:
        return model.get_submodule(self.proj_path(layer, role))

    def unit_size(self, role: str) -> int:
        """Rows (or columns) one selectable unit owns in a projection of this role.

        The attention unit is a kv group: one kv head's rows of k and v, and the rows of q (columns of o) of the
        group_size q heads that read it. Moving whole groups keeps GQA's q->kv pairing intact. An FFN unit is one channel.
        """
        if role in ("k", "v"):
            return self.head_dim
        if role in ("q", "o"):
            return self.head_dim * self.group_size
        return 1

    def num_units(self, role: str) -> int:
        return self.num_kv_heads if role in ATTN_ROLES else self.intermediate_size


def check_roles(roles: list[str]) -> list[str]:
    """A recipe's list of projection roles: known, non-empty, no repeats; returned in canonical order (so selections
    and adapters read the same whatever order the recipe lists them in). Raises ValueError for pydantic to report."""
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"unknown projection(s) {bad}; choose from {list(ROLES)}")
    if not roles:
        raise ValueError(f"list at least one projection of {list(ROLES)}")
    if len(set(roles)) != len(roles):
        raise ValueError(f"projection listed twice in {roles}")
    return sorted(roles, key=ROLES.index)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `path` (wrapping or unwrapping a layer)."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def arch_of(model_or_config) -> ArchSpec:
    """The ArchSpec of a causal LM (or its config); a clear error for families the table does not know."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise UserError(f"model type {model_type!r} is not in sparseft's architecture table (known: {known})")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise UserError(f"model config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return ArchSpec(
        model_type=model_type,
        family=FAMILIES[model_type],
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )
