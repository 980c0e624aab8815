"""What every rank runs for tests/distributed/test_ds_train.py, launched through sparseft.train.launch.

`python -m tests.distributed.ds_worker RECIPE...`: train each recipe (DeepSpeed starts once for all of them), then
simulate a run killed after its first checkpoint (rank 0 keeps the finished final state aside as `final-uninterrupted`
and removes `final`) and resume it on the same ranks.
`python -m tests.distributed.ds_worker --fail-on-rank R`: rank R raises while the others wait in a collective.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch


def main(argv: list[str]) -> None:
    from sparseft.recipe import load_recipe
    from sparseft.train.distributed import start_ranks
    from sparseft.train.loop import train

    ranks = start_ranks()
    if argv[0] == "--fail-on-rank":
        if ranks.rank == int(argv[1]):
            raise RuntimeError(f"rank {ranks.rank} fails on purpose")
        torch.distributed.barrier()  # the other ranks wait here for the one that never comes
        return
    for path in argv:
        recipe = load_recipe(path)
        train(recipe)
        run = Path(recipe.train.output_dir)
        if ranks.is_main:
            shutil.copytree(run / "final", run / "final-uninterrupted")
            shutil.rmtree(run / "final")
            for ckpt in sorted((run / "checkpoints").iterdir())[1:]:
                shutil.rmtree(ckpt)
        torch.distributed.barrier()
        train(recipe, resume=True)


if __name__ == "__main__":
    main(sys.argv[1:])
