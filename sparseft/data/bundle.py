"""Train and validation examples from a recipe's `data` section, and any file encoded for evaluation, with counts.

Relative paths are read from the working directory. With `data.val_fraction`, validation rows are held out of the train
file by a split seeded from the run's seed; both parts keep file order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparseft.data.example import Example
from sparseft.data.files import read_numbered_rows
from sparseft.data.forms import check_form, encode_example
from sparseft.data.hub import describe, read_source_rows
from sparseft.data.packing import PackStats, pack_examples, require_packed_attention
from sparseft.errors import UserError

if TYPE_CHECKING:
    from sparseft.recipe import DataSection


@dataclass
class DataStats:
    """Counts for one split: `truncated` counts kept examples that were cut, `dropped` those with no loss tokens."""

    name: str
    max_length: int
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    def summary(self) -> str:
        return (f"{self.name}: {self.rows} rows, {self.examples} examples, {self.truncated} truncated to "
                f"{self.max_length} tokens, {self.dropped} dropped (no loss tokens left), {self.tokens} tokens "
                f"({self.loss_tokens} in the loss)")


@dataclass
class DataBundle:
    train: list[Example]
    validation: list[Example] | None
    stats: DataStats
    validation_stats: DataStats | None = None
    packing: PackStats | None = None  # when data.packing: `train` holds packed rows

    def summary(self) -> str:
        """One line a split (and one for packing)."""
        return "\n".join(s.summary() for s in (self.stats, self.validation_stats, self.packing) if s is not None)


def encode_rows(rows: list[tuple[int, dict]], form: str, tokenizer: Any, max_length: int, where: str,
                fields: dict[str, str] | None = None, prompt_template: str | None = None,
                name: str = "train") -> tuple[list[Example], DataStats]:
    """Encode numbered rows, dropping examples with no loss tokens; `where` (e.g. "data.train.path=x.jsonl") starts
    every error message."""
    stats = DataStats(name, max_length, rows=len(rows))
    examples = []
    for number, row in rows:
        ex = encode_example(row, form, tokenizer, max_length, fields, prompt_template, where=f"{where} row {number}")
        if ex.n_loss_tokens == 0:
            stats.dropped += 1
            continue
        examples.append(ex)
        stats.truncated += ex.truncated
        stats.tokens += len(ex.input_ids)
        stats.loss_tokens += ex.n_loss_tokens
    stats.examples = len(examples)
    if not examples:
        raise UserError(f"{where}: none of its {len(rows)} rows has a loss token left after truncation to "
                        f"{max_length} tokens; raise data.max_length or check the {form} fields")
    return examples, stats


def split_rows(rows: list, val_fraction: float, seed: int, where: str = "data.train.path") -> tuple[list, list]:
    """(train, validation): a seeded, disjoint split of `rows`, each part in file order; at least one validation row."""
    n_val = max(1, round(len(rows) * val_fraction))
    if n_val >= len(rows):
        raise UserError(f"data.val_fraction={val_fraction}: holds out {n_val} of the {len(rows)} rows of {where}, "
                        "leaving none to train on; lower it or give data.validation.path")
    # A string seed hashes the same in every process (unlike hash()), so the split is reproducible.
    held = set(random.Random(f"sparseft-val-split:{seed}").sample(range(len(rows)), n_val))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def build_datasets(data_cfg: DataSection, tokenizer: Any, seed: int) -> DataBundle:
    """Read, split and encode the recipe's data; every problem is a UserError naming the key, file and row."""
    if data_cfg.validation is not None and data_cfg.val_fraction > 0:
        raise UserError(f"{describe(data_cfg.validation, 'data.validation')} and data.val_fraction="
                        f"{data_cfg.val_fraction} are both set: use one (a separate file, or a fraction of the train "
                        "rows held out)")
    check_form(data_cfg.format, data_cfg.fields, data_cfg.prompt_template, tokenizer)
    opts = dict(form=data_cfg.format, tokenizer=tokenizer, max_length=data_cfg.max_length, fields=data_cfg.fields,
                prompt_template=data_cfg.prompt_template)

    if data_cfg.packing:
        require_packed_attention()
    train_where = describe(data_cfg.train, "data.train")
    train_rows = read_source_rows(data_cfg.train, "data.train")
    val_rows, val_where = None, train_where
    if data_cfg.val_fraction > 0:
        train_rows, val_rows = split_rows(train_rows, data_cfg.val_fraction, seed, train_where)
    elif data_cfg.validation is not None:
        val_rows = read_source_rows(data_cfg.validation, "data.validation")
        val_where = describe(data_cfg.validation, "data.validation")

    train, stats = encode_rows(train_rows, where=train_where, name="train", **opts)
    packed = None
    if data_cfg.packing:  # validation stays one example a row: its loss is per example either way
        train, packed = pack_examples(train, data_cfg.max_length)
    validation, val_stats = None, None
    if val_rows is not None:
        validation, val_stats = encode_rows(val_rows, where=val_where, name="validation", **opts)
    return DataBundle(train, validation, stats, val_stats, packed)


def load_examples(path: str | Path, form: str, tokenizer: Any, max_length: int, fields: dict[str, str] | None = None,
                  prompt_template: str | None = None, source_key: str = "--data") -> tuple[list[Example], DataStats]:
    """Encode any data file in `form` (for evaluation); errors name `source_key`, the file and the row."""
    check_form(form, fields, prompt_template, tokenizer, form_key="data.format")
    rows = read_numbered_rows(path, source_key)
    return encode_rows(rows, form, tokenizer, max_length, where=f"{source_key}={path}", fields=fields,
                       prompt_template=prompt_template, name=str(path))
