"""Optimizer-state bytes and step time of a LaMDA run while B freezes, step by step, in this process.

    python scripts/lamda_freeze_measure.py demo/bench-125m [--steps 20] [--r 16] [--batch 2] [--length 64]

B trains whole for the first 10% of the steps, freezes direction by direction until 60%, then is wholly frozen.
Prints, every step, the trainable parameters, the bytes of every tensor in the optimizer's state and the step's
seconds, then the mean state and the median step time over the freezing window and after it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparseft.methods import MethodContext, build_method
from sparseft.models import load_model
from sparseft.recipe import validate_recipe_data
from sparseft.train.optim import Engine


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=64)
    args = ap.parse_args()
    from sparseft.methods.lamda import LamdaConfig

    method_section = {"name": "lamda", "r": args.r, "init": "spectrum", "freeze_b": {"start": 0.1, "end": 0.6}}
    if "svd" in LamdaConfig.model_fields:  # (also runs on sparseft versions before the option, for comparison)
        method_section["svd"] = "lowrank"
    recipe = validate_recipe_data({"model": {"path": args.model}, "data": {"train": {"path": "unused.jsonl"}},
                                   "train": {"max_steps": args.steps, "lr": 1e-3}, "method": method_section})
    torch.manual_seed(0)
    model = load_model(args.model)
    method = build_method(recipe.method)
    ctx = MethodContext(recipe=recipe, log=lambda s: None)
    model = method.prepare(model, method.select(model, ctx), ctx)
    model.train()
    engine = Engine(model, method.optimizer_param_groups(model, 0.0), recipe.train)
    g = torch.Generator().manual_seed(0)
    rows = []
    for step in range(args.steps):
        ids = torch.randint(4, model.config.vocab_size, (args.batch, args.length), generator=g)
        tick = time.perf_counter()
        method.on_step_start(step, model, engine.optimizer)
        loss, _ = method.compute_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                              "labels": ids})
        engine.backward(loss)
        engine.step()
        logged = method.on_step_end(step, model, engine.optimizer)
        seconds = time.perf_counter() - tick
        rows.append((step, logged["trainable_params"], state_bytes(engine.optimizer), seconds))
        print(f"step {step:3}: trainable {rows[-1][1]:>10,}  optimizer state {rows[-1][2] / 2**20:8.2f} MiB  "
              f"{seconds:.3f} s", flush=True)
    start, end = round(0.1 * args.steps), round(0.6 * args.steps)
    for name, part in (("freezing", rows[start + 1:end]), ("frozen", rows[end + 1:])):
        print(f"{name}: mean optimizer state {statistics.mean(r[2] for r in part) / 2**20:.2f} MiB, median step "
              f"{statistics.median(r[3] for r in part):.3f} s")


if __name__ == "__main__":
    main()
