"""Perplexity over whole documents: every loss token of every row is scored, however long the row, by rolling
windows (lm-eval's `loglikelihood_rolling`), and reported per token, per word and per byte with bootstrap errors.

A row is tokenised as training tokenises it (its form: text, instruction, completion, chat), without truncation. Its
targets are positions 1..T-1. The first window feeds tokens [0, L) and scores every target it can (1..L); each next
window scores the next `stride` targets S and feeds the L tokens before them, so L - S tokens are context only. With
S = L (the default) the windows are disjoint, as lm-eval's are. Windows holding no loss token are skipped (the prompt
of a long completion row costs nothing past the last window it needs).

Words and bytes are those of the scored text (text; completion; output; the assistant turns of a chat), words split
at white space; the summed negative log-likelihood is shared by all four figures:

    perplexity = exp(nll / tokens)   word_perplexity = exp(nll / words)   byte_perplexity = exp(nll / bytes)
    bits_per_byte = nll / bytes / ln 2

Standard errors come from a bootstrap over documents (rows resampled with replacement, the ratio recomputed).
`perplexity` below is the plain validation loss of a training run, on its examples as training cut them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sparseft.data import encode_example, eval_batches
from sparseft.data.chat import get_messages
from sparseft.data.example import IGNORE, get_text
from sparseft.data.forms import check_form
from sparseft.errors import UserError
from sparseft.eval.rows import data_where, task_rows
from sparseft.eval.stats import bootstrap_stderr
from sparseft.infer.generate import model_device

BOOTSTRAP_ITERS = 1000
BOOTSTRAP_SEED = 1234


@dataclass
class Document:
    ids: list[int]     # the whole tokenised row
    labels: list[int]  # -100 outside the loss
    words: int
    bytes: int


@dataclass(frozen=True)
class Window:
    doc: int
    lo: int     # feeds ids[lo:hi - 1]
    first: int  # scores targets ids[first:hi] (where their label is not -100)
    hi: int


def scored_text(row: dict, form: str, fields: dict | None, where: str) -> str:
    """The text whose tokens carry the loss in `form`."""
    if form == "text":
        return get_text(row, "text", fields, where)
    if form == "completion":
        return get_text(row, "completion", fields, where)
    if form == "instruction":
        return get_text(row, "output", fields, where)
    return "".join(m["content"] for m in get_messages(row, fields, where) if m["role"] == "assistant")


def build_documents(task, tokenizer: Any, default_form: str = "text") -> list[Document]:
    """Every row of a perplexity task, tokenised whole."""
    form = task.form or default_form
    check_form(form, task.fields, task.prompt_template, tokenizer, form_key=f"task {task.name}: form")
    docs = []
    for number, row in task_rows(task):
        where = data_where(task, number)
        ex = encode_example(row, form, tokenizer, sys.maxsize, task.fields, task.prompt_template, where=where)
        if ex.n_loss_tokens == 0:
            continue  # nothing to score (an empty text with no BOS)
        text = scored_text(row, form, task.fields, where)
        docs.append(Document(ex.input_ids, ex.labels, len(text.split()), len(text.encode("utf-8"))))
    if not docs:
        raise UserError(f"task {task.name}: data={task.data}: no row has a token to score in the {form} form")
    return docs


def rolling_windows(n_ids: int, max_length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(lo, first, hi) of each window over a sequence of `n_ids` tokens: it feeds ids[lo:hi-1] (at most `max_length`
    tokens) and scores targets ids[first:hi]. Together the windows score every target 1..n_ids-1 exactly once."""
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride {stride} must be in [1, max_length={max_length}]")
    if n_ids < 2:
        return []
    hi = min(max_length, n_ids - 1) + 1
    windows = [(0, 1, hi)]
    while hi < n_ids:
        first, hi = hi, min(hi + stride, n_ids)
        windows.append((max(0, hi - 1 - max_length), first, hi))
    return windows


def _windows(docs: Sequence[Document], max_length: int, stride: int | None) -> list[Window]:
    out = []
    for d, doc in enumerate(docs):
        for lo, first, hi in rolling_windows(len(doc.ids), max_length, stride):
            if any(label != IGNORE for label in doc.labels[first:hi]):
                out.append(Window(d, lo, first, hi))
    return out


@torch.no_grad()
def document_nll(model: Any, docs: Sequence[Document], max_length: int, stride: int | None, batch_size: int,
                 pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(summed negative log-likelihood, scored tokens) of each document, by rolling windows."""
    nll = np.zeros(len(docs))
    tokens = np.zeros(len(docs), dtype=np.int64)
    # Longest first: equal lengths share batches (little padding), and a batch that does not fit fails at once.
    windows = sorted(_windows(docs, max_length, stride), key=lambda w: w.lo - w.hi)
    device = model_device(model)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        width = max(w.hi - 1 - w.lo for w in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, w in enumerate(chunk):  # right padding: positions are those of the unpadded window
            ids[b, :w.hi - 1 - w.lo] = torch.as_tensor(docs[w.doc].ids[w.lo:w.hi - 1])
            mask[b, :w.hi - 1 - w.lo] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
        for b, w in enumerate(chunk):
            # Window position t predicts ids[lo + t + 1]: targets first..hi-1 are read at first-1-lo .. hi-2-lo.
            labels = torch.as_tensor(docs[w.doc].labels[w.first:w.hi], device=logits.device)
            rows = logits[b, w.first - 1 - w.lo:w.hi - 1 - w.lo].float()
            nll[w.doc] += float(F.cross_entropy(rows, labels, ignore_index=IGNORE, reduction="sum"))
            tokens[w.doc] += int((labels != IGNORE).sum())
    return nll, tokens


def _figures(nll, tokens, words, nbytes):
    """The reported figures from (possibly resampled) sums; numpy arrays in, arrays out."""
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = nll / np.maximum(tokens, 1)
        per_word = nll / np.maximum(words, 1)
        per_byte = nll / np.maximum(nbytes, 1)
    return {"loss": loss, "perplexity": np.exp(np.minimum(loss, 700.0)),
            "word_perplexity": np.exp(np.minimum(per_word, 700.0)),
            "byte_perplexity": np.exp(np.minimum(per_byte, 700.0)), "bits_per_byte": per_byte / math.log(2)}


def perplexity_metrics(nll: np.ndarray, tokens: np.ndarray, words: np.ndarray, nbytes: np.ndarray,
                       iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED) -> dict:
    """Every figure, its bootstrap standard error over documents, and the counts."""
    columns = np.stack([nll, tokens, words, nbytes]).astype(float)  # (4, n_docs)
    point = _figures(*columns.sum(axis=1))
    errors = bootstrap_stderr(columns, lambda sums: _figures(*sums), iters, seed)
    out: dict = {}
    for name, value in point.items():
        out[name] = float(value)
        out[f"{name}_stderr"] = errors[name]
    out.update(tokens=int(tokens.sum()), words=int(words.sum()), bytes=int(nbytes.sum()), documents=len(nll))
    return out


def rolling_perplexity(model: Any, docs: Sequence[Document], max_length: int, batch_size: int, pad_id: int,
                       stride: int | None = None) -> dict:
    """Rolling-window perplexity of whole documents: figures, bootstrap standard errors and counts."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        nll, tokens = document_nll(model, docs, max_length, stride, batch_size, pad_id)
    finally:
        model.train(was_training)
    words = np.array([d.words for d in docs])
    nbytes = np.array([d.bytes for d in docs])
    return perplexity_metrics(nll, tokens, words, nbytes)


@torch.no_grad()
def perplexity(model, examples, batch_size: int, pad_id: int, max_batches: int | None = None) -> dict:
    """Token-weighted perplexity of training examples as they are (already cut to data.max_length): the validation
    loss of a training run."""
    total_nll, total_tokens = 0.0, 0
    device = model_device(model)
    for i, batch in enumerate(eval_batches(examples, batch_size, pad_id)):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # Position t predicts token t+1: (B, T-1, V) against (B, T-1).
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="sum")
        total_nll += float(nll)
        total_tokens += int((labels != -100).sum())
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": total_tokens}
