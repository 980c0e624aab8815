"""Peak memory and time of S2FT's gradient selection strategy on a model, in this process.

    python scripts/s2ft_gradient_memory.py demo/bench-125m [--batches 4] [--batch 4] [--length 256]

Scores every projection (q, k, v, o, up, gate, down) of every block on seeded random batches and prints the peak
resident memory above the loaded model (VmHWM - VmRSS before scoring) and the seconds it took.
"""

from __future__ import annotations

import argparse
import time
import torch

from sparseft.bench.worker import _reset_peak
from sparseft.methods.s2ft.config import S2FTConfig
from sparseft.methods.s2ft.select import select_units
from sparseft.models import load_model
from sparseft.models.arch import ROLES
from sparseft.train.precision import rss_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    args = ap.parse_args()
    model = load_model(args.model)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(4, model.config.vocab_size, (args.batch, args.length), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    cfg = S2FTConfig(projections=list(ROLES), strategy="gradient", calibration_batches=args.batches)
    before = rss_mb("VmRSS")
    _reset_peak(torch.device("cpu"))  # peak RSS counts from here
    tick = time.perf_counter()
    select_units(model, cfg, 0, lambda n: iter(batches[:n]))
    seconds = time.perf_counter() - tick
    print(f"gradient scores of {len(ROLES)} projections x {model.config.num_hidden_layers} layers, "
          f"{args.batches} batches of {args.batch} x {args.length}: peak {rss_mb('VmHWM') - before:.0f} MB above the "
          f"loaded model ({before:.0f} MB), {seconds:.1f} s")


if __name__ == "__main__":
    main()
