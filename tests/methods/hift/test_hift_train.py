"""HiFT through the real trainer and CLI: the loss falls, the LR follows the schedule over optimizer steps, a resume
in the middle of a cycle continues it exactly, and the merged export is a plain transformers model."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from sparseft.cli import app
from sparseft.export.run import load_run
from sparseft.methods import MethodContext, build_method
from sparseft.methods.hift import _MASTER
from sparseft.recipe import load_recipe
from sparseft.train.checkpoint import TRAINABLE, load_engine_state, load_method_state, load_trainable, save_state
from sparseft.train.optim import Engine, lr_factor
from tests.helpers import cli, records, write_recipe
from tests.methods.hift.hift_testlib import recipe as hift_recipe

runner = CliRunner()


def test_trains_follows_the_schedule_and_exports_merged(tmp_path, tiny_model_dir):
    train = {"max_steps": 32, "lr": 1e-2, "schedule": "cosine", "warmup_steps": 4, "min_lr_ratio": 0.1,
             "weight_decay": 0.01, "eval_every": 32}
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), {"name": "hift", "group_size": 2, "order": "top_down"},
                          train=train)
    cli("train", recipe)
    run = tmp_path / "run"
    steps = [r for r in records(run) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 33))
    # Two groups, top down: the head half first.
    assert [r["group"] for r in steps] == [1, 0] * 16
    # The schedule runs over optimizer steps: step k (1-based in metrics) used lr * lr_factor(k - 1), warmup ends
    # at step 4 and the cosine reaches lr * min_lr_ratio at the last step, whichever group trained.
    t = load_recipe(recipe).train
    for r in steps:
        assert r["lr"] == pytest.approx(t.lr * lr_factor(r["step"] - 1, t), rel=1e-9)
    assert steps[3]["lr"] == pytest.approx(1e-2) and steps[-1]["lr"] == pytest.approx(1e-3)
    losses = [r["loss"] for r in steps]
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses
    # The final state carries the weights, not the parked optimizer state.
    assert "optimizer_state" not in load_method_state(run / "final")

    cli("export", run, "--merged", tmp_path / "merged")
    trained = load_run(run)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__module__.startswith("transformers.")
    ids = torch.tensor([[5, 9, 13, 40, 41, 42, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained.model(ids).logits, rtol=1e-5, atol=1e-5)
    result = runner.invoke(app, ["export", str(run), "--adapter", str(tmp_path / "ad")])
    assert result.exit_code == 2 and "no adapter form" in result.output


def test_resume_mid_cycle_continues_the_cycle_exactly(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    method = {"name": "hift", "order": "random"}  # 4 groups, a new order every cycle
    train = {"max_steps": 10, "save_every": 3, "keep_checkpoints": 3, "grad_accum_steps": 2, "lr": 1e-2,
             "weight_decay": 0.1, "schedule": "cosine", "warmup_steps": 2}
    runs = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        runs[name] = write_recipe(tmp_path / name, model, method, train=train)
        cli("train", runs[name])
    b = tmp_path / "b" / "run"
    ckpt = load_method_state(b / "checkpoints" / "step-00000006")
    assert (ckpt["cycle"], ckpt["position"]) == (1, 2)  # mid-cycle
    assert ckpt["optimizer_state"]  # the waiting groups' optimizer state travels with the checkpoint
    # Simulate a run killed after step 6.
    shutil.rmtree(b / "final")
    shutil.rmtree(b / "checkpoints" / "step-00000009")
    out = cli("train", runs["b"], "--resume")
    assert "at step 6" in out.output
    a = tmp_path / "a" / "run"
    assert [r["group"] for r in records(a) if "loss" in r] == [r["group"] for r in records(b) if "loss" in r]
    assert [r["step"] for r in records(b) if "loss" in r] == list(range(1, 11))
    wa, wb = load_file(str(a / "final" / "trainable.safetensors")), load_file(str(b / "final" / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


class _Mixed:
    """A bf16 model trained with fp32 masters for the active group (bf16-mixed in one process), each step's gradients
    seeded by step and weight; it writes and reads checkpoints with the trainer's functions, in the trainer's order."""

    def __init__(self, load, max_steps: int, **train):
        r = hift_recipe({"name": "hift", "order": "random"}, max_steps=max_steps, weight_decay=0.1, **train)
        model = load("llama").to(torch.bfloat16)
        self.method = build_method(r.method)
        ctx = MethodContext(recipe=r, log=lambda s: None, master_dtype=torch.float32)
        self.model = self.method.prepare(model, self.method.select(model, ctx), ctx)
        self.engine = Engine(self.model, self.method.optimizer_param_groups(self.model, 0.1), r.train)
        self.params = dict(self.model.named_parameters())
        self.last_turn: dict[str, torch.Tensor] = {}  # each weight as its last turn left it (fp32)

    def run_step(self, step: int) -> None:
        self.method.on_step_start(step, self.model, self.engine.optimizer)
        active = self.method.group_names(self.method.group_at(step))
        for n in active:  # its turn again: its fp32 values from the last turn, not their bf16 rounding
            if n in self.last_turn:
                p = self.params[n]
                assert p.dtype == torch.float32 and torch.equal(p, self.last_turn[n]), (step, n)
        for i, p in enumerate(self.params.values()):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + i)).to(p.dtype)
        self.engine.step()
        self.method.on_step_end(step, self.model, self.engine.optimizer)
        self.last_turn.update({n: self.params[n].detach().clone() for n in active})

    def save(self, out, step: int) -> None:
        tensors = self.engine.gather(self.method.trainable_parameters(self.model))
        save_state(out, tensors, {"step": step}, self.method.state_dict(), self.engine.state_dict())

    def restore(self, ckpt) -> None:
        load_trainable(self.model, ckpt / TRAINABLE)  # as stored: the active group's fp32 weights rounded to bf16
        self.method.load_state_dict(load_method_state(ckpt))  # first: it puts the active group's masters back
        self.engine.load_state_dict(load_engine_state(ckpt)[0])

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}


def test_resume_under_mixed_precision_brings_back_the_state_and_the_masters(load, tmp_path):
    """In process, without the CLI (tests/train/test_precision.py runs the same through `sparseft train`): a
    checkpoint mid-cycle, read into a fresh model and method, gives back the cycle position (what state_dict then
    writes), the parked state, and the active group's fp32 masters bit for bit, which the stored bf16 weights round;
    the run then continues exactly as one that never stopped. A final state (no parked state) loads too. Each group
    starts its turn from its fp32 masters of its last turn, parked while it waited (checked in every step)."""
    a = _Mixed(load, max_steps=10)
    for step in range(6):  # 4 groups: stopped in the second cycle, with every group's state parked or active
        a.run_step(step)
    assert any(not torch.equal(w, w.to(torch.bfloat16).float()) for w in a.last_turn.values()), \
        "the masters differ from their rounding: the turn check above is not empty"
    a.save(tmp_path / "ckpt", 6)
    b = _Mixed(load, max_steps=10)
    b.restore(tmp_path / "ckpt")
    active = set(a.method.group_names(a.method.group_at(5)))
    for n, w in a.weights().items():  # the masters are back, beside the waiting groups' stored weights
        assert w.dtype == (torch.float32 if n in active else torch.bfloat16), n
        assert b.params[n].dtype == w.dtype and torch.equal(b.params[n], w), n
    sa, sb = a.method.state_dict(), b.method.state_dict()
    assert {k: sb[k] for k in ("next_step", "cycle", "position", "order")} == \
        {"next_step": 6, "cycle": 1, "position": 2, "order": sa["order"]}
    assert sb["optimizer_state"].keys() == sa["optimizer_state"].keys() == set(a.params) - active
    for step in range(6, 10):
        a.run_step(step)
        b.run_step(step)
        for n, w in a.weights().items():
            assert b.params[n].dtype == w.dtype and torch.equal(b.params[n], w), (step, n)
    final = a.method.state_dict()
    assert "optimizer_state" not in final and final["next_step"] == 10
    c = _Mixed(load, max_steps=10)
    c.method.load_state_dict(final)
    assert c.method._parked == {} and c.method.state_dict()["next_step"] == 10


def test_masters_wait_also_beside_an_optimizer_that_keeps_no_state(load):
    """Plain SGD (no momentum) keeps no state per weight, so a waiting group's parking holds its fp32 master alone;
    each turn still starts from the fp32 values of the last (checked in every step by run_step)."""
    a = _Mixed(load, max_steps=12, optimizer="sgd", momentum=0.0)
    for step in range(12):
        a.run_step(step)
        waiting = set(a.params) - set(a.method.group_names(a.method.group_at(step)))
        assert not a.engine.optimizer.state
        assert {n for n in waiting if n in a.last_turn} == set(a.method._parked), step
        assert all(set(s) == {_MASTER} for s in a.method._parked.values()), step
    assert len(a.last_turn) == len(a.params), "every group took a turn"


def test_the_saved_masters_are_a_snapshot(load):
    """What state_dict returns for the active group's masters is a copy: training on after it (the group's next
    turns) changes the weights, not the state a checkpoint is being written from."""
    a = _Mixed(load, max_steps=20)
    for step in range(5):
        a.run_step(step)
    saved = a.method.state_dict()
    snapshot = {n: t.clone() for n, t in saved["masters"].items()}
    assert snapshot
    for step in range(5, 13):  # two more cycles: the group trains again
        a.run_step(step)
    assert all(not torch.equal(a.params[n].float(), t) for n, t in snapshot.items())
    assert all(torch.equal(saved["masters"][n], t) for n, t in snapshot.items())


def test_resumed_masters_land_on_the_device_of_their_weights(load):
    """A checkpoint is read into CPU memory; the active group's fp32 masters go to the device its weights are on.
    (The `meta` device stands in for a GPU, which a CPU-only machine cannot show: there every move is to the CPU.)"""
    r = hift_recipe({"name": "hift"})
    model = load("llama").to(torch.bfloat16).to("meta")
    method = build_method(r.method)
    ctx = MethodContext(recipe=r, log=lambda s: None, device="meta", master_dtype=torch.float32)
    model = method.prepare(model, method.select(model, ctx), ctx)
    params = dict(model.named_parameters())
    names = method.group_names(0)
    method.load_state_dict({"next_step": 1, "cycle": 0, "position": 1, "order": [0, 1, 2, 3],
                            "masters": {n: torch.zeros(params[n].shape) for n in names}})
    for n in names:
        assert params[n].device.type == "meta" and params[n].dtype == torch.float32, n
