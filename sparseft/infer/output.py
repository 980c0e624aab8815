"""Writing generations: jsonl records, or text for reading in a terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Sequence


def write_jsonl(records: Sequence[dict], out: str | Path | IO[str]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if isinstance(out, (str, Path)):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    else:
        out.write(text)
        out.flush()


def format_text(records: Sequence[dict]) -> str:
    """A lone completion as it is; several each under a header naming the prompt and adapter."""
    if len(records) == 1:
        return records[0]["completion"] + "\n"
    parts = []
    for i, r in enumerate(records, start=1):
        source = r.get("prompt") if "prompt" in r else (r.get("messages") or [{}])[-1].get("content", "")
        head = f"=== {i} · {r['adapter'] or 'base'} · {source!r}"
        parts.append(f"{head}\n{r['completion']}\n")
    return "\n".join(parts)
