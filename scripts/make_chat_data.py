"""Generate recipes/data/chat_varied.jsonl: seeded chat conversations of widely varied lengths (one to four turns,
answers from a number to a paragraph), the kind of data sequence packing is for. Run once by the maintainers; the
file is committed, and the same seed gives the same file.

    python scripts/make_chat_data.py --out recipes/data/chat_varied.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = ["You are a helpful assistant.", "You answer questions about numbers briefly and exactly.",
          "You are a patient maths tutor. Explain each step."]


def question(rng: random.Random) -> tuple[str, str]:
    """One user turn and its answer, short or long."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    kind = rng.random()
    if kind < 0.4:
        return f"What is {a} + {b}?", str(a + b)
    if kind < 0.7:
        return (f"Count from {a} to {a + 5}.", ", ".join(str(i) for i in range(a, a + 6)) + ".")
    steps = rng.randint(2, 12)
    lines = [f"We add {a} and {b} one step at a time."]
    total = a
    for i in range(steps):
        k = rng.randint(1, 9)
        lines.append(f"Step {i + 1}: {total} plus {k} makes {total + k}.")
        total += k
    lines.append(f"So the running total after {steps} steps is {total}, and {a} + {b} is {a + b}.")
    return f"Explain, step by step, how to add {a} and {b}.", " ".join(lines)


def conversation(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": rng.choice(SYSTEM)}] if rng.random() < 0.5 else []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
        q, a = question(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("recipes/data/chat_varied.jsonl"))
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(args.rows)))
    print(f"wrote {args.rows} conversations to {args.out}")


if __name__ == "__main__":
    main()
