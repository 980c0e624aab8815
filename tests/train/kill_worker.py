"""What tests/train/test_kill_resume.py runs in a subprocess: `python -m tests.train.kill_worker KILL_AT RECIPE...`.

The recipes' runs are trained one after the other, each in a child forked from this process (which has imported
torch but computed nothing, so forking is safe). Right after each checkpoint k is written, the child copies the run
directory to RUN-killed-at-k (what a SIGKILL at that moment leaves on disk); after checkpoint KILL_AT it sends itself
SIGKILL. The parent checks that each child died of SIGKILL and exits 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path


def child(recipe_path: str, kill_at: int) -> None:
    import sparseft.train.loop as loop
    from sparseft.recipe import load_recipe

    prune = loop.prune_checkpoints

    def after_checkpoint(run, keep):  # rank 0 calls it right after each checkpoint is in place
        prune(run, keep)
        k = int(run.latest_checkpoint().name.split("-")[1])
        shutil.copytree(run.path, run.path.with_name(f"{run.path.name}-killed-at-{k}"))
        if k == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    loop.prune_checkpoints = after_checkpoint
    loop.train(load_recipe(recipe_path))


def main(argv: list[str]) -> int:
    import sparseft.methods  # noqa: F401  (imports torch and transformers once, before forking)
    import sparseft.train.loop  # noqa: F401

    kill_at = int(argv[0])
    for recipe in argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                child(recipe, kill_at)
            finally:
                os._exit(3)  # not killed: the parent reports it
        _, status = os.waitpid(pid, 0)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            print(f"{recipe}: the run was not killed by SIGKILL (status {status})", file=sys.stderr)
            return 1
        print(f"{recipe}: killed by SIGKILL after checkpoint {kill_at}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
