"""One tokenised example, and the helpers every form shares: reading a row's fields and tokenising without surprises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparseft.errors import UserError

IGNORE = -100  # label of positions left out of the loss (torch's cross_entropy ignore_index)


@dataclass
class Example:
    """One tokenised example; `labels` is `input_ids` with prompt positions set to -100. A packed row of several
    examples (sparseft/data/packing.py) also has `position_ids`, restarting at 0 at each example."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    position_ids: list[int] | None = None

    @property
    def n_loss_tokens(self) -> int:
        # A causal LM predicts position t from the tokens before it, so labels[0] never counts.
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def _column(field: str, fields: dict[str, str] | None) -> str:
    return (fields or {}).get(field, field)


def field_name(field: str, fields: dict[str, str] | None) -> str:
    col = _column(field, fields)
    return f"field {field!r}" if col == field else f"column {col!r} (field {field!r}, renamed in data.fields)"


def get_field(row: dict, field: str, fields: dict[str, str] | None, where: str, required: bool = True) -> Any:
    """`row[column]` for a canonical field; a missing required one is a UserError naming the column looked for."""
    col = _column(field, fields)
    if col not in row:
        if not required:
            return None
        keys = ", ".join(map(repr, list(row)[:12])) or "nothing"
        raise UserError(f"{where}: {field_name(field, fields)} is missing; the row has {keys}")
    return row[col]


def get_text(row: dict, field: str, fields: dict[str, str] | None, where: str, required: bool = True) -> str:
    value = get_field(row, field, fields, where, required)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "null" if value is None else f"{type(value).__name__} {_short(value)}"
        raise UserError(f"{where}: {field_name(field, fields)} must be text, got {got}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (special-token text such as "</s>" is still recognised)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def bos_ids(tokenizer: Any) -> list[int]:
    """[bos] if the tokenizer starts its encodings with BOS on its own, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def eos_ids(tokenizer: Any) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token, which ends every example; use a tokenizer that has one "
                        "(model.tokenizer)")
    return [tokenizer.eos_token_id]
