"""Launching ranks: `sparseft train RECIPE --nproc N` on this machine, `--hostfile FILE` across machines.

The command checks the recipe and its DeepSpeed config and prepares the run directory first, so a bad recipe fails
once, before any rank starts. Then DeepSpeed's launcher starts the ranks (`python -m sparseft.cli train RECIPE ...`
with RANK, WORLD_SIZE and MASTER_ADDR/PORT set), watches them, and stops every rank when one fails; its exit code is
the failed rank's.

SIGTERM or SIGINT to this command goes on to the ranks (DeepSpeed's launcher would kill them): they stop after their
current step and a checkpoint, and the command exits 143 or 130. A second signal stops the job at once. A hostfile
that names only this machine needs no ssh: its ranks start here as with --nproc.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import torch

from sparseft.errors import UserError


def launch_train(recipe_path: Path, overrides: list[str], nproc: int | None, hostfile: Path | None,
                 master_port: int | None, resume: bool, overwrite: bool) -> int:
    """Check (the recipe, its DeepSpeed config, the method against the model's config), prepare, launch `sparseft train`
    on the ranks; returns the job's exit code."""
    from sparseft.methods import build_method, check_against_config
    from sparseft.recipe import load_recipe
    from sparseft.train.checkpoint import RunDir, read_meta
    from sparseft.train.distributed import check_method_stage, resolve_ds_config, zero_stage
    from sparseft.train.loop import prepare_run_dir
    from sparseft.train.resume import resume_batch

    world = check_launch_args(nproc, hostfile)
    recipe = load_recipe(recipe_path, overrides)
    method = build_method(recipe.method)
    check_method_stage(method, zero_stage(resolve_ds_config(recipe)))
    check_against_config(method, recipe)
    ckpt = prepare_run_dir(RunDir(Path(recipe.train.output_dir)), recipe, resume, overwrite)
    if ckpt is not None:
        resume_batch(recipe, read_meta(ckpt), world)  # refused here, once, rather than on every rank
    args = ["train", str(recipe_path), *overrides] + ["--resume"] * resume + ["--overwrite"] * overwrite
    return launch("sparseft.cli", args, nproc, hostfile, master_port)


def launch(module: str, args: list[str], nproc: int | None, hostfile: Path | None = None,
           master_port: int | None = None) -> int:
    """Run `python -m module args` on every rank; returns 0 when all succeed, else the first failure's code.
    `sparseft train` has checked the arguments (`check_launch_args`)."""
    env = dict(os.environ)
    if hostfile is not None and _this_machine_only(hosts := read_hostfile(hostfile)):
        nproc, hostfile = nproc or hosts[0][1], None
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
    # Its own session: a Ctrl-C at the terminal reaches this process alone, which passes it on to the ranks.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        with _forwarding_signals(proc):
            code = proc.wait()
    except BaseException:  # a test timeout, an error here: the launcher stops its ranks on SIGTERM
        proc.terminate()
        proc.wait()
        raise
    return code if code in (0, 1, 2, 128 + signal.SIGINT, 128 + signal.SIGTERM) else 1


@contextlib.contextmanager
def _forwarding_signals(proc: subprocess.Popen):
    """SIGTERM / SIGINT here go to the ranks (the launcher's children), which stop after a checkpoint; a second one
    goes to the launcher, which stops them at once."""
    import psutil

    got = []

    def forward(signum, frame):
        got.append(signum)
        try:
            ranks = psutil.Process(proc.pid).children() if len(got) == 1 else []
        except psutil.Error:
            ranks = []
        for target in ranks or [proc]:
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                target.send_signal(signum if ranks else signal.SIGTERM)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def check_launch_args(nproc: int | None, hostfile: Path | None) -> int:
    """Check --nproc / --hostfile; returns the number of ranks they give."""
    if importlib.util.find_spec("deepspeed") is None:  # found, not imported: this process only waits
        raise UserError("--nproc / --hostfile need DeepSpeed: pip install -e '.[deepspeed]'")
    if nproc is None and hostfile is None:
        raise UserError("give --nproc N (ranks on this machine) or --hostfile FILE")
    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc {nproc}: must be at least 1")
    if hostfile is not None:
        hosts = read_hostfile(hostfile)
        if nproc is not None and any(nproc > slots for _, slots in hosts):
            host, slots = next((h, n) for h, n in hosts if nproc > n)
            raise UserError(f"--nproc {nproc}: more than the {slots} slots {hostfile} gives {host}")
        if not _this_machine_only(hosts):  # DeepSpeed's runner starts one local host's ranks without ssh
            check_hosts_reachable(hostfile, hosts)
        return nproc * len(hosts) if nproc is not None else sum(slots for _, slots in hosts)
    return nproc


def _this_machine_only(hosts: list[tuple[str, int]]) -> bool:
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    return len(hosts) == 1 and hosts[0][0] in names


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """(host, slots) of each line of a DeepSpeed hostfile: `host slots=N`, blank lines and `#` comments allowed."""
    if not path.is_file():
        raise UserError(f"--hostfile {path}: no such file")
    hosts: list[tuple[str, int]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        slots = parts[1].removeprefix("slots=") if len(parts) == 2 and parts[1].startswith("slots=") else ""
        if not slots.isdigit() or int(slots) < 1:
            raise UserError(f"{path}:{number}: {line.strip()!r}: expected `HOST slots=N` with N at least 1")
        if parts[0] in dict(hosts):
            raise UserError(f"{path}:{number}: host {parts[0]} is listed twice")
        hosts.append((parts[0], int(slots)))
    if not hosts:
        raise UserError(f"--hostfile {path}: lists no host (`HOST slots=N` lines)")
    return hosts


def check_hosts_reachable(path: Path, hosts: list[tuple[str, int]]) -> None:
    """DeepSpeed's runner reaches every host over passwordless ssh (and starts ranks on several with pdsh); check
    that first, so the answer is one message, not a traceback from the runner."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    if shutil.which("ssh") is None:
        raise UserError(f"--hostfile {path}: ssh is not installed; DeepSpeed's runner reaches the hosts over ssh")
    if len(hosts) > 1 and shutil.which("pdsh") is None:
        raise UserError(f"--hostfile {path}: pdsh is not installed; DeepSpeed's runner starts the ranks on several "
                        "hosts with it (e.g. apt install pdsh)")

    def reachable(host: str) -> bool:
        cmd = ["ssh", "-o", "PasswordAuthentication=no", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", host,
               "hostname"]
        try:
            return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        ok = list(pool.map(reachable, [h for h, _ in hosts]))
    down = [h for (h, _), fine in zip(hosts, ok) if not fine]
    if down:
        raise UserError(f"--hostfile {path}: {', '.join(down)} not reachable over passwordless ssh "
                        f"(`ssh {down[0]} hostname` must work without a prompt); DeepSpeed's runner needs it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
