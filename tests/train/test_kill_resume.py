"""SIGKILL right after checkpoint k of a 12-step run (save_every 1), for every k and every method; resuming gives the
uninterrupted run's final weights to 1e-6.

One subprocess trains the six methods, each in a child that is really killed with SIGKILL right after checkpoint 11;
at each earlier checkpoint k the child copied its run directory aside at that moment, which is what a SIGKILL there
leaves on disk (tests/train/kill_worker.py). Each state is resumed in this process and compared with an uninterrupted
run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparseft.recipe import load_recipe
from sparseft.train.loop import train
from tests.helpers import records, write_recipe

ROOT = Path(__file__).resolve().parents[2]
STEPS, KILL_AT = 12, 11
METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "r": 4, "dropout": 0.1},
    "s2ft": {"name": "s2ft", "projections": ["v", "o", "up", "down"], "heads": {"count": 1},
             "channels": {"ratio": 0.1}},
    "hift": {"name": "hift", "order": "random"},
    "lamda": {"name": "lamda", "r": 4, "freeze_b": {"start": 0.2, "end": 0.7}},
    "squarehead": {"name": "squarehead"},
}
TRAIN = {"max_steps": STEPS, "save_every": 1, "keep_checkpoints": 2, "micro_batch_size": 2, "lr": 3e-3,
         "schedule": "cosine", "warmup_steps": 2, "weight_decay": 0.01}
pytestmark = pytest.mark.slow


def test_sigkill_after_every_checkpoint_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("sparseft.train.loop.plot_loss", lambda *a: None)  # 72 loss plots would cost more than the runs
    model = tiny_model_dir("llama")
    recipes = {}
    for name, method in METHODS.items():
        (tmp_path / name).mkdir()
        recipes[name] = write_recipe(tmp_path / name, model, method, data={"validation": None},
                                     train={**TRAIN, "output_dir": str(tmp_path / name / "run")})
    began = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "tests.train.kill_worker", str(KILL_AT), *map(str, recipes.values())],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"killed by SIGKILL after checkpoint {KILL_AT}") == len(METHODS)
    killed_s = time.perf_counter() - began
    print(proc.stdout)
    resumed = 0
    for name, recipe in recipes.items():
        run = tmp_path / name / "run"
        assert not (run / "final").exists()  # the killed run never finished
        reference = tmp_path / name / "reference"
        train(load_recipe(recipe, [f"train.output_dir={reference}", "train.save_every=null"]))
        want = load_file(str(reference / "final" / "trainable.safetensors"))
        for k in range(1, KILL_AT + 1):
            state = tmp_path / name / f"run-killed-at-{k}"
            result = train(load_recipe(recipe, [f"train.output_dir={state}"]), resume=True)
            assert result.steps == STEPS - k, (name, k)
            got = load_file(str(state / "final" / "trainable.safetensors"))
            assert got.keys() == want.keys()
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6,
                                           msg=lambda m: f"{name}, killed after checkpoint {k}: {key}: {m}")
            assert [r["step"] for r in records(state) if "loss" in r] == list(range(1, STEPS + 1))
            resumed += 1
    print(f"{len(METHODS)} methods killed by SIGKILL in {killed_s:.1f}s; {resumed} resumes checked "
          f"in {time.perf_counter() - began - killed_s:.1f}s")
