"""Runs that go wrong stop cleanly and checkpoints never lie: non-finite steps (stop and skip), SIGTERM / SIGINT in
one process, a full disk, torn metrics, stale temporary directories, unusable output paths, nothing unpickled on
resume, and the global batch kept on another number of ranks."""

from __future__ import annotations

import errno
import os
import pickle
import signal

import pytest
import torch
from safetensors.torch import load_file
from sparseft.errors import UserError
from sparseft.recipe import load_recipe
from sparseft.train.optim import Engine
from sparseft.train.resume import resume_batch, same_recipe
from tests.helpers import assert_exit, cli, records, run, write_recipe

def checkpoints(run_dir):
    return sorted(d.name for d in (run_dir / "checkpoints").iterdir())


def all_finite(state_dir) -> bool:
    files = [f for f in state_dir.iterdir() if f.suffix == ".safetensors"]
    assert files
    return all(torch.isfinite(t).all() for f in files for t in load_file(str(f)).values() if t.is_floating_point())


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), train={"max_steps": 6, "save_every": 1,
                                                                      "keep_checkpoints": 1, "lr": 1e10})
    result = run("train", recipe)
    assert_exit(result, 1, "step 2: loss nan", "train.on_nonfinite=stop", "step-00000001")
    assert result.output.count("failed:") == 1
    out = tmp_path / "run"
    assert not (out / "final").exists()
    assert checkpoints(out) == ["step-00000001"]  # never pruned in favour of a poisoned one
    assert all_finite(out / "checkpoints" / "step-00000001")
    assert records(out)[-1]["step"] == 2 and records(out)[-1]["nonfinite"] is True


def _nan_on_calls(monkeypatch, calls: set[int]):
    """Engine.loss gives NaN on these (1-based) calls: a transient blow-up."""
    original, n = Engine.loss, [0]

    def loss(self, compute_loss, batch):
        n[0] += 1
        value, logs = original(self, compute_loss, batch)
        return (value * float("nan"), logs) if n[0] in calls else (value, logs)

    monkeypatch.setattr(Engine, "loss", loss)


def test_skip_drops_the_update_and_counts_it(tmp_path, tiny_model_dir, monkeypatch):
    _nan_on_calls(monkeypatch, {3, 4})
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), train={
        "max_steps": 6, "save_every": 1, "keep_checkpoints": 6, "on_nonfinite": "skip", "max_skipped_steps": 2})
    cli("train", recipe)
    out = tmp_path / "run"
    steps = {r["step"]: r for r in records(out)}
    assert [s for s, r in steps.items() if r.get("skipped")] == [3, 4]
    assert steps[4]["skipped_steps"] == 2 and "skipped" not in steps[5]
    # Steps 3 and 4 changed nothing: weights and optimizer state after step 4 are those after step 2.
    for name in ("trainable", "engine"):
        a, b = (load_file(str(out / "checkpoints" / f"step-0000000{k}" / f"{name}.safetensors")) for k in (2, 4))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert all_finite(out / "final")


def test_skip_stops_after_max_skipped_steps_in_a_row(tmp_path, tiny_model_dir, monkeypatch):
    _nan_on_calls(monkeypatch, {3, 4})
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), train={
        "max_steps": 6, "save_every": 1, "on_nonfinite": "skip", "max_skipped_steps": 1})
    assert_exit(run("train", recipe), 1, "step 4: loss nan", "2 steps in a row", "train.max_skipped_steps=1")
    assert checkpoints(tmp_path / "run")[-1] == "step-00000003"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch,
                                                                          signum):
    model = tiny_model_dir("llama")
    train = {"max_steps": 7, "save_every": 5, "schedule": "cosine", "warmup_steps": 2}
    reference = tmp_path / "ref"
    reference.mkdir()
    cli("train", write_recipe(reference, model, train=train))
    recipe = write_recipe(tmp_path, model, train=train)
    original, n = Engine.step, [0]

    def step(self):
        n[0] += 1
        if n[0] == 3:  # the signal arrives in the middle of step 3
            os.kill(os.getpid(), signum)
        return original(self)

    monkeypatch.setattr(Engine, "step", step)
    name = signal.Signals(signum).name
    before = signal.getsignal(signum)  # Python's default, or SIG_IGN where a shell started the tests in the background
    assert_exit(run("train", recipe), 128 + signum, f"{name}: stopped after step 3", "--resume")
    out = tmp_path / "run"
    assert checkpoints(out) == ["step-00000003"] and not (out / "final").exists()
    assert before is not None and signal.getsignal(signum) == before  # the handler given back
    monkeypatch.setattr(Engine, "step", original)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("resume unpickled something")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    assert "at step 3" in cli("train", recipe, "--resume").output
    a, b = (load_file(str(d / "run" / "final" / "trainable.safetensors")) for d in (reference, tmp_path))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert [r["step"] for r in records(out)] == list(range(1, 8))


def test_full_disk_is_one_message_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import safetensors.torch

    original = safetensors.torch.save_file

    def save_file(tensors, path, *args, **kwargs):
        if "step-00000003" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return original(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), train={"max_steps": 5, "save_every": 1})
    assert_exit(run("train", recipe), 1, "step 3: cannot write", "No space left on device", "step-00000002")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(d.name for d in ckpts.iterdir()) == ["step-00000001", "step-00000002"]  # no temporary left


def test_torn_metrics_line_is_dropped_and_stale_temps_removed_on_resume(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), train={"max_steps": 4, "save_every": 2})
    cli("train", recipe)
    out = tmp_path / "run"
    import shutil

    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-00000002")  # killed after step 3 while writing its metrics line
    lines = (out / "metrics.jsonl").read_text().splitlines()[:3]
    (out / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    stale = [out / "checkpoints" / ".step-00000004.k2x9_a1b", out / ".final.old", out / ".final.zz09ab_c"]
    for d in stale:
        d.mkdir()
        (d / "trainable.safetensors").write_text("half")
    # Nothing is resumed from a stale directory, and it is gone afterwards. (No checkpoint: nothing to resume.)
    assert_exit(run("train", recipe, "--resume"), 2, "no checkpoint to resume from")
    assert not any(d.exists() for d in stale)
    cli("train", recipe, "--overwrite")
    shutil.rmtree(out / "final")
    (out / "metrics.jsonl").write_text("\n".join((out / "metrics.jsonl").read_text().splitlines()[:3]) + '\n{"ste')
    cli("train", recipe, "--resume")
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    shutil.rmtree(out / "final")
    text = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([text[0], "garbage", *text[1:]]) + "\n")
    assert_exit(run("train", recipe, "--resume"), 2, "metrics.jsonl:2", "not a JSON line")


def test_unusable_output_dirs_are_messages(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        recipe = write_recipe(tmp_path, model, train={"output_dir": str(out), "max_steps": 1})
        assert_exit(run("train", recipe), 2, f"train.output_dir={out}", f"{blocker} is a file")
        assert_exit(run("validate", recipe), 2, f"train.output_dir={out}", f"{blocker} is a file")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        recipe = write_recipe(tmp_path, model, train={"output_dir": str(locked / "run"), "max_steps": 1})
        assert_exit(run("train", recipe), 2, "train.output_dir=", "cannot be used")


def test_validate_checks_model_and_data_paths(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, str(tmp_path / "no-model"), data={"train": {"path": str(tmp_path / "no.jsonl")}},
                          eval={"tasks": [str(tmp_path / "no-task.yaml")]})
    assert_exit(run("validate", recipe), 2, f"model.path={tmp_path / 'no-model'}: no such directory",
                f"data.train.path={tmp_path / 'no.jsonl'}: no such file", "eval.tasks.0", "3 problem(s)")


def test_resume_keeps_the_global_batch_on_another_rank_count(tmp_path, tiny_model_dir):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir("llama"), train={"micro_batch_size": 2}))
    two_ranks = {"step": 3, "ranks": 2, "micro_batch_size": 2, "grad_accum_steps": 1}
    assert resume_batch(recipe, two_ranks, 1).train.grad_accum_steps == 2  # 2 x 1 x 2 = 2 x 2 x 1
    assert resume_batch(recipe, two_ranks, 2) is recipe
    with pytest.raises(UserError, match="4 examples .* which 3 ranks cannot share evenly"):
        resume_batch(recipe, two_ranks, 3)
    four = load_recipe(write_recipe(tmp_path, tiny_model_dir("llama"), train={"micro_batch_size": 4}))
    with pytest.raises(UserError, match=r"override train.micro_batch_size=3 \(grad_accum_steps then adapts\)"):
        resume_batch(four, {**two_ranks, "ranks": 3}, 2)  # 6 examples: 3 a rank, not a multiple of 4
    # Overriding the batch split (or moving the run) still resumes the same recipe; other changes do not.
    base = "train:\n  micro_batch_size: 4\n  grad_accum_steps: 1\n  output_dir: a\n  lr: 0.1\n"
    assert same_recipe(base, base.replace("4", "2").replace("1\n", "2\n", 1).replace(" a\n", " b\n"))
    assert not same_recipe(base, base.replace("0.1", "0.2"))


def test_a_one_host_hostfile_for_this_machine_needs_no_ssh(tmp_path, monkeypatch):
    from sparseft.train import launch

    def no_ssh(*args):
        raise AssertionError("ssh asked")

    monkeypatch.setattr(launch, "check_hosts_reachable", no_ssh)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    assert launch.check_launch_args(None, hostfile) == 2
    assert launch.check_launch_args(1, hostfile) == 1


def test_a_loss_scalers_own_skips_are_not_counted():
    """fp16 loss scaling skips overflowing steps itself (the optimizer is never called) and lowers its scale: normal
    work, not a non-finite run. Without a scaler the same step stops the run."""
    import math

    from sparseft.train.guard import NonFiniteGuard

    class Scaled:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        scaler = object()

    class Plain:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)

    scaled, plain = NonFiniteGuard(Scaled()), NonFiniteGuard(Plain())
    assert scaled.check(1, {"loss": 2.0, "grad_norm": math.inf}) == {} and scaled.failure is None
    assert plain.check(1, {"loss": 2.0, "grad_norm": math.inf}) == {"nonfinite": True}
    assert "step 1: gradient norm inf" in plain.failure
