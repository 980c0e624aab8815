"""Generate the bundled demo data: two-number addition as prompt/completion pairs (recipes/data/arith_*.jsonl).

Run once by the maintainers; the files are committed. Deterministic: the same seed gives the same files.
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
    print(f"wrote {out}/arith_train.jsonl and {out}/arith_val.jsonl")


if __name__ == "__main__":
    main()
