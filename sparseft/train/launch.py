"""Launching ranks: `sparseft train RECIPE --nproc N` on this machine, `--hostfile FILE` across machines.

The command checks the recipe and its DeepSpeed config and prepares the run directory first, so a bad recipe fails
once, before any rank starts. Then DeepSpeed's launcher starts the ranks (`python -m sparseft.cli train RECIPE ...`
with RANK, WORLD_SIZE and MASTER_ADDR/PORT set), watches them, and stops every rank when one fails; its exit code is
the failed rank's.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from sparseft.errors import UserError


def launch_train(recipe_path: Path, overrides: list[str], nproc: int | None, hostfile: Path | None,
                 master_port: int | None, resume: bool, overwrite: bool) -> int:
    """Check, prepare, launch `sparseft train` on the ranks; returns the job's exit code."""
    from sparseft.methods import build_method
    from sparseft.recipe import load_recipe
    from sparseft.train.checkpoint import RunDir
    from sparseft.train.distributed import check_method_stage, resolve_ds_config, zero_stage
    from sparseft.train.loop import prepare_run_dir

    check_launch_args(nproc, hostfile)
    recipe = load_recipe(recipe_path, overrides)
    check_method_stage(build_method(recipe.method), zero_stage(resolve_ds_config(recipe)))
    prepare_run_dir(RunDir(Path(recipe.train.output_dir)), recipe, resume, overwrite)
    args = ["train", str(recipe_path), *overrides] + ["--resume"] * resume + ["--overwrite"] * overwrite
    return launch("sparseft.cli", args, nproc, hostfile, master_port)


def launch(module: str, args: list[str], nproc: int | None, hostfile: Path | None = None,
           master_port: int | None = None) -> int:
    """Run `python -m module args` on every rank; returns 0 when all succeed, else the first failure's code."""
    check_launch_args(nproc, hostfile)
    env = dict(os.environ)
    if hostfile is None:
        if not torch.cuda.is_available():
            # CPU ranks share the cores; without this each would start a thread per core.
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
            env.setdefault("DS_ACCELERATOR", "cpu")  # said outright, DeepSpeed does not warn that it fell back
        # DeepSpeed's per-machine launcher, given this machine's slots directly.
        world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
               "--master_addr=127.0.0.1", f"--master_port={master_port or free_port()}"]
    else:
        # DeepSpeed's runner reads the hostfile (`host slots=N` lines) and starts the per-machine launchers (pdsh).
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}",
               f"--master_port={master_port or 29500}"] + ([f"--num_gpus={nproc}"] if nproc else [])
    cmd += ["--module", "--no_local_rank", "--log_level=warning", module, *args]
    proc = subprocess.Popen(cmd, env=env)
    try:
        code = proc.wait()
    except BaseException:  # Ctrl-C, a test timeout: the launcher stops its ranks on SIGTERM
        proc.terminate()
        proc.wait()
        raise
    return code if code in (0, 1, 2) else 1


def check_launch_args(nproc: int | None, hostfile: Path | None) -> None:
    if importlib.util.find_spec("deepspeed") is None:  # found, not imported: this process only waits
        raise UserError("--nproc / --hostfile need DeepSpeed: pip install -e '.[deepspeed]'")
    if nproc is None and hostfile is None:
        raise UserError("give --nproc N (ranks on this machine) or --hostfile FILE")
    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc {nproc}: must be at least 1")
    if hostfile is not None and not hostfile.is_file():
        raise UserError(f"--hostfile {hostfile}: no such file")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
