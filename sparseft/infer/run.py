"""`sparseft generate`: prompts from the command line or a file, run on a model alone or with adapters.

A prompt row is {"prompt": text} or {"messages": [{role, content}, ...]}, optionally with "adapter": the adapter's
directory name, its index in the --adapter list, or "base". A row that names no adapter runs once with each adapter
(or on the model alone when there is none). When every adapter's method can mix them (`Method.load_mixable`: S2FT),
every batch mixes adapters row by row in one forward a decoding step (nothing is merged); otherwise the adapters run
one after another, each applied and removed. An adapter made for another base is refused unless `force`.
Other keys of a row (an id, say) are copied to its output record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sparseft.data import read_numbered_rows
from sparseft.data.chat import ROLES
from sparseft.errors import UserError
from sparseft.infer.generate import Sampling, generate
from sparseft.infer.loading import load_for_inference
from sparseft.infer.prompts import chat_prompt_ids, prompt_ids

BASE = -1


@dataclass
class Request:
    row: dict  # the input row, copied to the output
    where: str  # "--prompt 1" or "--prompts FILE row N", for messages
    adapter: Any = None  # what the row names: None (every adapter), "base", an index or a name


def requests_from_texts(texts: Sequence[str]) -> list[Request]:
    return [Request({"prompt": t}, f"--prompt {i}") for i, t in enumerate(texts, start=1)]


def requests_from_file(path: str | Path) -> list[Request]:
    out = []
    for number, row in read_numbered_rows(path, "--prompts"):
        where = f"--prompts {path} row {number}"
        has_prompt, has_messages = isinstance(row.get("prompt"), str), "messages" in row
        if has_prompt == has_messages:
            raise UserError(f"{where}: needs a text 'prompt' or a 'messages' list (one of them); the row has "
                            f"{', '.join(map(repr, row)) or 'nothing'}")
        if has_messages:
            _check_messages(row["messages"], where)
        out.append(Request(row, where, row.get("adapter")))
    return out


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects with roles "
                        f"{', '.join(ROLES)}")


def adapter_labels(adapters: Sequence[str]) -> list[str]:
    """Each adapter's name in output and in a row's "adapter": its directory name (index:name when names repeat)."""
    names = [Path(a).name for a in adapters]
    return [n if names.count(n) == 1 else f"{i}:{n}" for i, n in enumerate(names)]


def resolve_adapter(ref: Any, labels: Sequence[str], where: str, paths: Sequence[str] = ()) -> list[int]:
    """The adapter indices a row runs with (BASE for the model alone): a label, an index, or the path given to
    --adapter (`paths`)."""
    if ref is None:
        return list(range(len(labels))) or [BASE]
    if ref == "base":
        return [BASE]
    if isinstance(ref, str) and ref in labels:
        return [labels.index(ref)]
    resolved = [Path(p).expanduser().resolve() for p in paths]
    if isinstance(ref, str) and ref and Path(ref).expanduser().resolve() in resolved:
        return [resolved.index(Path(ref).expanduser().resolve())]
    if isinstance(ref, str) and ref.strip().lstrip("-").isdigit():
        ref = int(ref)
    if isinstance(ref, int) and not isinstance(ref, bool) and 0 <= ref < len(labels):
        return [ref]
    known = ", ".join([f"{i} or {n!r}" for i, n in enumerate(labels)] + ["'base'"])
    raise UserError(f"{where}: adapter {ref!r} is not one of the --adapter directories (known: {known})")


def _ids(tokenizer: Any, req: Request, chat: bool) -> list[int]:
    if "messages" in req.row:
        return chat_prompt_ids(tokenizer, req.row["messages"], req.where)
    if chat:
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": req.row["prompt"]}], req.where)
    ids = prompt_ids(tokenizer, req.row["prompt"])
    if not ids:
        raise UserError(f"{req.where}: the prompt is empty and the tokenizer adds no BOS token; give some text")
    return ids


def run_generation(model_path: str, requests: Sequence[Request], adapters: Sequence[str] = (),
                   sampling: Sampling = Sampling(), chat: bool = False, batch_size: int = 8,
                   dtype: str = "float32", device: str = "auto", force: bool = False) -> list[dict]:
    """One output record a (prompt, adapter) pair, in input order: the row, "adapter", "completion", "stop_reason",
    "new_tokens"."""
    if not requests:
        raise UserError("generate: give --prompt TEXT or --prompts FILE")
    labels = adapter_labels(adapters)
    jobs = [(req, a) for req in requests for a in resolve_adapter(req.adapter, labels, req.where, adapters)]
    from sparseft.export.apply import adapter_applied, adapter_class, mixable_adapters

    for a in adapters:  # a missing or malformed adapter fails before the model loads
        adapter_class(a)
    loaded = load_for_inference(model_path, dtype, device=device)
    if adapters and loaded.is_run:
        raise UserError(f"MODEL {model_path} is a run directory; adapters apply to a base model")
    model, tok = loaded.model, loaded.tokenizer
    ids = [_ids(tok, req, chat) for req, _ in jobs]
    which = [a for _, a in jobs]

    mixed = mixable_adapters(model, adapters, force) if adapters else None
    if mixed is not None:
        outputs = generate(model, tok, ids, sampling, batch_size, adapters=mixed, row_adapter=which)
    else:
        outputs = [None] * len(jobs)
        for a in sorted(set(which)):
            rows = [i for i, w in enumerate(which) if w == a]
            if a == BASE:
                outs = generate(model, tok, [ids[i] for i in rows], sampling, batch_size)
            else:
                with adapter_applied(model, adapters[a], force) as adapted:
                    outs = generate(adapted, tok, [ids[i] for i in rows], sampling, batch_size)
            for i, o in zip(rows, outs):
                outputs[i] = o
    return [{**req.row, "adapter": labels[a] if a != BASE else None, "completion": o.text,
             "stop_reason": o.stop_reason, "new_tokens": len(o.token_ids)} for (req, a), o in zip(jobs, outputs)]
