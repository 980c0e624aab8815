"""What every rank runs for tests/distributed/test_ds_signals.py: `python -m tests.distributed.resume_worker RECIPE
REFERENCE_DIR`: resume the recipe's stopped run, then train the same recipe uninterrupted into REFERENCE_DIR (DeepSpeed
starts once for both)."""

from __future__ import annotations

import sys


def main(recipe_path: str, reference_dir: str) -> None:
    from sparseft.recipe import load_recipe
    from sparseft.train.distributed import start_ranks
    from sparseft.train.loop import train

    start_ranks()
    train(load_recipe(recipe_path), resume=True)
    train(load_recipe(recipe_path, [f"train.output_dir={reference_dir}"]))


if __name__ == "__main__":
    main(*sys.argv[1:])
