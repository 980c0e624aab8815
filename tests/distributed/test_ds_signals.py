"""SIGTERM to `sparseft train --nproc 2`: both ranks stop after the same step with a checkpoint, the command exits 143,
no process of the job is alive 10 s later, and --resume on 2 ranks gives the uninterrupted 2-rank run's weights.
In the same launch, a run whose loss blows up stops on both ranks at the same step with the same message, and every
checkpoint it wrote is finite."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from sparseft.train.launch import launch
from tests.helpers import records, write_recipe

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60
pytestmark = pytest.mark.slow


def test_sigterm_at_the_launcher_stops_every_rank_with_a_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), {"name": "lora", "r": 4}, data={"validation": None},
                          distributed={"config": "configs/zero2.json"},
                          train={"max_steps": STEPS, "micro_batch_size": 2, "lr": 1e-2, "schedule": "cosine",
                                 "warmup_steps": 2, "output_dir": str(out)})
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sparseft.cli", "train", str(recipe), "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None and time.perf_counter() - began < 300, "the job ended or never started"
            time.sleep(0.05)
        job = psutil.Process(proc.pid).children(recursive=True)  # DeepSpeed's launcher and the two ranks
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    ended = time.perf_counter()
    assert proc.returncode == 143, output[-3000:]
    assert len(job) >= 3, job
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in job) and time.perf_counter() < ended + 10:
        time.sleep(0.2)
    assert not [p for p in job if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "orphans 10 s later"
    stopped = re.findall(r"SIGTERM: stopped after step (\d+)", output)
    assert len(stopped) == 1, output[-3000:]  # rank 0 says it, once
    step = int(stopped[0])
    assert 1 <= step < STEPS and not (out / "final").exists()
    assert [d.name for d in (out / "checkpoints").iterdir()] == [f"step-{step:08d}"]
    assert [r["step"] for r in records(out)] == list(range(1, step + 1))

    # Resume on 2 ranks, then an uninterrupted 2-rank run of the same recipe (one launch): the same weights.
    reference, blown = tmp_path / "reference", tmp_path / "nan"
    (tmp_path / "nan-recipe").mkdir()
    nan_recipe = write_recipe(tmp_path / "nan-recipe", tiny_model_dir("llama"), {"name": "full"},
                              data={"validation": None}, distributed={"config": "configs/zero2.json"},
                              train={"max_steps": 8, "micro_batch_size": 2, "lr": 1e10, "save_every": 1,
                                     "on_nonfinite": "skip", "max_skipped_steps": 2, "output_dir": str(blown)})
    assert launch("tests.distributed.resume_worker", [str(recipe), str(reference), str(nan_recipe)], nproc=2) == 0
    print(f"SIGTERM after step {step}; stop, resume and reference took {time.perf_counter() - began:.1f}s")
    a, b = (load_file(str(d / "final" / "trainable.safetensors")) for d in (out, reference))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert [r["step"] for r in records(out)] == list(range(1, STEPS + 1))

    # Non-finite steps on 2 ranks: both skip the same steps, and both stop at the same one with the same message.
    failures = [(blown / f"failure-rank-{r}.txt").read_text() for r in (0, 1)]
    assert failures[0] == failures[1] and "3 steps in a row" in failures[0], failures
    skipped = [r["step"] for r in records(blown) if r.get("skipped")]
    stop = int(re.match(r"step (\d+)", failures[0]).group(1))
    assert skipped == [stop - 2, stop - 1] and not (blown / "final").exists()
    for ckpt in (blown / "checkpoints").iterdir():
        assert int(ckpt.name.split("-")[1]) < stop
        for t in load_file(str(ckpt / "trainable.safetensors")).values():
            assert torch.isfinite(t).all()
