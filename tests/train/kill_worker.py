"""What tests/train/test_kill_resume.py runs in a subprocess: `python -m tests.train.kill_worker STEPS RECIPE...`.

For every recipe (its output_dir RUN):
- a child trains the uninterrupted run into RUN-reference;
- for every checkpoint step k of the STEPS-step run (1 .. STEPS-1), a child trains into RUN-killed-at-k and sends
  itself SIGKILL right after checkpoint k is in place, before anything else happens (not even the pruning of older
  checkpoints); once it is dead and its newest checkpoint is step k, another child resumes RUN-killed-at-k to the end and writes the number of steps it
  trained to RUN-killed-at-k.resumed.

Children are forked from this process, which has imported torch but computed nothing (so forking is safe); each
writes its output to its run's `.log`. Two run at a time (the machine's two cores), one thread each, as the test's
references need the same arithmetic. The parent checks that every kill was a SIGKILL and every other child exited 0,
and exits 0 if so. The test compares the files.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

IN_FLIGHT = 2


def child(kind: str, recipe_path: str, k: int) -> None:
    import torch

    import sparseft.train.loop as loop
    from sparseft.recipe import load_recipe

    torch.set_num_threads(1)
    loop.plot_loss = lambda *a: None  # 72 loss plots would cost more than the runs

    def after_checkpoint(run, keep):  # rank 0 calls it right after each checkpoint is in place
        if kind == "kill" and int(run.latest_checkpoint().name.split("-")[1]) == k:
            os.kill(os.getpid(), signal.SIGKILL)
        prune(run, keep)

    prune, loop.prune_checkpoints = loop.prune_checkpoints, after_checkpoint
    out = Path(load_recipe(recipe_path).train.output_dir)
    out = out.with_name(f"{out.name}-reference" if kind == "reference" else f"{out.name}-killed-at-{k}")
    log = os.open(f"{out}.{kind}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    overrides = [f"train.output_dir={out}", *(["train.save_every=null"] if kind == "reference" else [])]
    result = loop.train(load_recipe(recipe_path, overrides), resume=kind == "resume")
    if kind == "resume":
        Path(f"{out}.resumed").write_text(f"{result.steps}\n")


def _start(job: tuple[str, str, int]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            child(*job)
            code = 0
        finally:
            os._exit(code)
    return pid


def _newest_checkpoint(recipe_path: str, k: int) -> int | None:
    """The step of the newest checkpoint the run killed after checkpoint k left (k, if it died where it should)."""
    from sparseft.recipe import load_recipe

    out = Path(load_recipe(recipe_path).train.output_dir)
    checkpoints = out.with_name(f"{out.name}-killed-at-{k}") / "checkpoints"
    return max((int(d.name.split("-")[1]) for d in checkpoints.glob("step-*")), default=None)


def main(argv: list[str]) -> int:
    import sparseft.methods  # noqa: F401  (imports torch and transformers once, before forking)
    import sparseft.train.loop  # noqa: F401

    steps = int(argv[0])
    jobs = [job for recipe in argv[1:]
            for job in [("reference", recipe, 0), *(("kill", recipe, k) for k in range(1, steps))]]
    running: dict[int, tuple[str, str, int]] = {}
    failed = 0
    while jobs or running:
        while jobs and len(running) < IN_FLIGHT:
            job = jobs.pop(0)
            running[_start(job)] = job
        pid, status = os.wait()
        kind, recipe, k = running.pop(pid)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if kind == "kill" and killed and _newest_checkpoint(recipe, k) == k:
            print(f"{recipe}: killed by SIGKILL after checkpoint {k}", flush=True)
            jobs.insert(0, ("resume", recipe, k))
        elif kind != "kill" and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            print(f"{recipe}: {kind} {k or ''} finished", flush=True)
        else:
            print(f"{recipe}: {kind} {k or ''} ended with status {status}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
