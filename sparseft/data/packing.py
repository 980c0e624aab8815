"""Sequence packing (`data.packing: true`): several examples share one row of at most `data.max_length` tokens.

Examples are placed once, before training, by best-fit decreasing (longest first, each into the fullest row it still
fits), so the rows depend only on the data and a resumed run sees exactly the same rows; the training stream then
shuffles rows as it shuffles examples (sparseft/data/batching.py).

Inside a row no example sees another:
- positions restart at 0 at each example (`position_ids`);
- the first token of each example is out of the loss (its label would be predicted from the previous example);
- the model is called with `position_ids` and no 2-D attention mask (`forward_inputs`). transformers then finds the
  example boundaries where the positions restart: with eager or sdpa attention (CPU) it builds a block-diagonal causal
  mask, and flash attention runs its variable-length kernel on the same boundaries (GPU).
The batch still carries the 0/1 `attention_mask` (real tokens vs padding): the trainer counts tokens with it, and
losses that weigh tokens (SquareHead) read it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import torch

from sparseft.data.example import IGNORE, Example
from sparseft.errors import UserError


@dataclass
class PackStats:
    examples: int
    rows: int
    tokens: int
    max_length: int

    def summary(self) -> str:
        fill = self.tokens / max(self.rows * self.max_length, 1)
        return (f"packing: {self.examples} examples in {self.rows} rows of up to {self.max_length} tokens "
                f"({fill:.1%} filled)")


def require_packed_attention() -> None:
    """Packing relies on transformers finding packed sequences from position_ids (masking_utils); without that an
    older release would let examples attend to each other."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        import transformers

        raise UserError("data.packing: this transformers release cannot keep packed examples apart (no "
                        f"masking_utils.find_packed_sequence_indices in {transformers.__version__}); upgrade "
                        "transformers or set data.packing: false") from None


def pack_examples(examples: Sequence[Example], max_length: int) -> tuple[list[Example], PackStats]:
    """Rows of whole examples of at most `max_length` tokens, positions restarting and boundary labels masked."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[int]] = []
    # (room left, row index), kept sorted: the best fit is the first row with room >= the example's length.
    room: list[tuple[int, int]] = []
    for i in order:
        n = len(examples[i].input_ids)
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            left, r = room.pop(at)
        else:
            left, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if left - n > 0:
            bisect.insort(room, (left - n, r))
    packed = [join([examples[i] for i in sorted(members)]) for members in rows]
    return packed, PackStats(len(examples), len(packed), sum(len(e.input_ids) for e in examples), max_length)


def join(examples: Sequence[Example]) -> Example:
    """One packed row: the examples' tokens end to end, positions restarting and each first label masked."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        ids += ex.input_ids
        labels += [IGNORE] + ex.labels[1:]
        positions += range(len(ex.input_ids))
    return Example(ids, labels, any(ex.truncated for ex in examples), positions)


def forward_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The model's inputs for a training batch, without a KV cache: a packed batch passes position_ids and no 2-D mask
    (transformers looks for packed sequences only then, and only without a cache; see the module docstring)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    mask = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
    return {"input_ids": batch["input_ids"], **mask, "use_cache": False}
