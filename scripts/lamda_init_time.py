"""Time LaMDA's initialisation (select: ranks and the SVD start) on a model, for each `svd` setting.

    python scripts/lamda_init_time.py demo/bench-125m [--r 16] [--repeats 1]

Prints one line per (rank_allocation, svd) with the seconds select took, and for LaMDA++ also the time of the
former start (singular values, then a second full SVD a linear) measured on the same weights, for comparison.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparseft.methods import MethodContext, build_method
from sparseft.models import load_model
from sparseft.recipe import validate_recipe_data


def timed_select(path: str, r: int, allocation: str, svd: str) -> float:
    recipe = validate_recipe_data({"model": {"path": path}, "data": {"train": {"path": "unused.jsonl"}},
                                   "train": {"max_steps": 10, "lr": 1e-4},
                                   "method": {"name": "lamda", "r": r, "rank_allocation": allocation, "svd": svd,
                                              "init": "spectrum"}})
    model = load_model(path)
    method = build_method(recipe.method)
    tick = time.perf_counter()
    method.select(model, MethodContext(recipe=recipe, log=lambda s: None))
    return time.perf_counter() - tick


def former_two_svds(path: str) -> float:
    """The former LaMDA++ start: svdvals for the spectrum, then a full SVD for the vectors, on every linear."""
    from sparseft.models.arch import ROLES, arch_of

    model = load_model(path)
    spec = arch_of(model)
    tick = time.perf_counter()
    for layer in range(spec.num_layers):
        for role in ROLES:
            w = spec.proj(model, layer, role).weight.detach().float()
            torch.linalg.svdvals(w)
            torch.linalg.svd(w, full_matrices=False)
    return time.perf_counter() - tick


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()
    print(f"threads {torch.get_num_threads()}, r {args.r}, every projection of every block")
    results = {}
    for allocation in ("uniform", "spectrum"):
        for svd in ("full", "lowrank"):
            results[allocation, svd] = timed_select(args.model, args.r, allocation, svd)
            print(f"{allocation:8} svd={svd:7}: {results[allocation, svd]:.2f} s", flush=True)
    former = former_two_svds(args.model)
    print(f"spectrum former (svdvals + svd): {former:.2f} s; full / former {results['spectrum', 'full'] / former:.2f}x,"
          f" lowrank / full (uniform) {results['uniform', 'lowrank'] / results['uniform', 'full']:.2f}x")


if __name__ == "__main__":
    main()
