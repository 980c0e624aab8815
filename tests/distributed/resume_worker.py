"""What every rank runs for tests/distributed/test_ds_signals.py: `python -m tests.distributed.resume_worker RECIPE
REFERENCE_DIR NAN_DIR` (DeepSpeed starts once for all three):
- resume the recipe's stopped run;
- train the same recipe uninterrupted into REFERENCE_DIR;
- train it into NAN_DIR at a learning rate that blows up, with on_nonfinite=skip: every rank must stop with the same
  RunFailure, which each writes to NAN_DIR/failure-rank-R.txt.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(recipe_path: str, reference_dir: str, nan_dir: str) -> None:
    from sparseft.errors import RunFailure
    from sparseft.recipe import load_recipe
    from sparseft.train.distributed import start_ranks
    from sparseft.train.loop import train

    ranks = start_ranks()
    train(load_recipe(recipe_path), resume=True)
    train(load_recipe(recipe_path, [f"train.output_dir={reference_dir}"]))
    blow_up = [f"train.output_dir={nan_dir}", "train.lr=1e10", "train.warmup_steps=0", "train.save_every=1",
               "train.on_nonfinite=skip", "train.max_skipped_steps=2"]
    try:
        train(load_recipe(recipe_path, blow_up))
    except RunFailure as e:
        Path(nan_dir, f"failure-rank-{ranks.rank}.txt").write_text(str(e))


if __name__ == "__main__":
    main(*sys.argv[1:])
