"""Training throughput with and without sequence packing, measured in one run: real (non-padding) tokens a second of
full fine-tuning on chat data of varied lengths, padded batches against packed rows, alternating rounds.

    python scripts/bench_packing.py                      # a small Llama built from config, bundled chat data
    python scripts/bench_packing.py --model PATH --data FILE --max-length 1024

Both runs see the same examples at the same micro-batch size (a packed row holds several), so the ratio is what
packing saves by not computing on padding. Steps before --warmup are not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from sparseft.recipe import validate_recipe_data
from sparseft.train.loop import train


def one_run(model: str, data: str, packing: bool, args, out: Path) -> float:
    recipe = validate_recipe_data({
        "model": {"path": model},
        "data": {"train": {"path": data}, "format": "chat", "max_length": args.max_length, "packing": packing},
        "method": {"name": "full"},
        "train": {"output_dir": str(out), "max_steps": args.steps, "micro_batch_size": args.batch, "lr": 1e-4,
                  "log_every": args.steps},
    })
    train(recipe, overwrite=True)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r][args.warmup:]
    return statistics.mean(r["tokens_per_s"] for r in steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a causal LM directory (default: a Llama of hidden 256, 4 layers, from config)")
    parser.add_argument("--data", default="recipes/data/chat_varied.jsonl")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sparseft-bench-packing-") as tmp:
        model = args.model
        if model is None:
            from sparseft.models.tiny import build_tiny_model

            model = str(build_tiny_model(Path(tmp) / "model", "llama", hidden_size=256, intermediate_size=688,
                                         num_layers=4))
        speeds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for packing in (False, True):
                speeds[packing].append(one_run(model, args.data, packing, args, Path(tmp) / f"run-{packing}"))
    padded, packed = statistics.mean(speeds[False]), statistics.mean(speeds[True])
    print(json.dumps({"padded_tokens_per_s": round(padded, 1), "packed_tokens_per_s": round(packed, 1),
                      "ratio": round(packed / padded, 2), "rounds": {str(k): v for k, v in speeds.items()}}))


if __name__ == "__main__":
    main()
