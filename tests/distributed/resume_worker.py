"""What every rank runs for tests/distributed/test_ds_signals.py: `python -m tests.distributed.resume_worker RECIPE
REFERENCE_DIR NAN_RECIPE` (DeepSpeed starts once for all three):
- resume the recipe's stopped run;
- train the same recipe uninterrupted into REFERENCE_DIR;
- train NAN_RECIPE, whose loss blows up: every rank must stop with the same RunFailure, which each writes to
  failure-rank-R.txt in that recipe's output directory.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(recipe_path: str, reference_dir: str, nan_recipe: str) -> None:
    from sparseft.errors import RunFailure
    from sparseft.recipe import load_recipe
    from sparseft.train.distributed import start_ranks
    from sparseft.train.loop import train

    ranks = start_ranks()
    train(load_recipe(recipe_path), resume=True)
    train(load_recipe(recipe_path, [f"train.output_dir={reference_dir}"]))
    blow_up = load_recipe(nan_recipe)
    try:
        train(blow_up)
    except RunFailure as e:
        Path(blow_up.train.output_dir, f"failure-rank-{ranks.rank}.txt").write_text(str(e))


if __name__ == "__main__":
    main(*sys.argv[1:])
