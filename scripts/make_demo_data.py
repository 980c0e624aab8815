"""Generate the bundled demo data (run once by the maintainers; the files are committed; the same seed gives the same
files):

- recipes/data/arith_{train,val}.jsonl: two-number addition as prompt/completion pairs, the fine-tuning task;
- recipes/data/numbers_{train,val}.jsonl: plain text about numbers that `make demo` pretrains the demo base model on,
  subtraction facts and counting runs but no addition, so fine-tuning on addition adapts a model that already reads
  numbers (as fine-tuning a pretrained model does) instead of starting from random weights.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def rows(n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 19), rng.randint(0, 19)
        out.append({"prompt": f"{a} + {b} =", "completion": f" {a + b}"})
    return out


def number_text(n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        if rng.random() < 0.6:
            a = rng.randint(0, 38)
            b = rng.randint(0, a)
            out.append({"text": f"{a} - {b} = {a - b}"})
        else:
            start, length = rng.randint(0, 34), rng.randint(3, 6)
            out.append({"text": " ".join(str(start + i) for i in range(length))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="recipes/data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("arith_train", 2000), ("arith_val", 200)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n, rng)))
    text_rng = random.Random(args.seed + 1)  # its own stream: the addition files stay as they were
    for name, n in (("numbers_train", 3000), ("numbers_val", 200)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in number_text(n, text_rng)))
    print(f"wrote {out}/arith_train.jsonl, arith_val.jsonl, numbers_train.jsonl and numbers_val.jsonl")


if __name__ == "__main__":
    main()
