"""Checkpoint files on their own, without a training run: which directories count as checkpoints and in what order,
what a checkpoint holds and how it reads back, the random streams it restores, and the refusals (non-finite weights,
unreadable or pickled state, tensors that do not fit the model)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from sparseft.errors import RunFailure, UserError
from sparseft.train.checkpoint import (TRAINABLE, RunDir, load_engine_state, load_method_state, load_trainable,
                                       prune_checkpoints, read_meta, rng_state, save_state, set_rng_state)


def _mkdirs(root, names):
    for n in names:
        (root / n).mkdir(parents=True)


def test_run_dir_paths_and_has_run(tmp_path):
    run = RunDir(str(tmp_path / "r"))  # a string is taken as a path
    assert run.path == tmp_path / "r"
    assert (run.recipe, run.selection, run.metrics, run.final, run.checkpoints) == tuple(
        tmp_path / "r" / n for n in ("recipe.yaml", "selection.json", "metrics.jsonl", "final", "checkpoints"))
    assert not run.has_run() and run.checkpoint_dirs() == [] and run.latest_checkpoint() is None
    run.path.mkdir()
    run.recipe.write_text("x")  # a recipe alone is not a run
    assert not run.has_run()
    for made in (run.metrics, run.final, run.checkpoints):
        made.mkdir() if made.suffix == "" else made.write_text("")
        assert run.has_run()
        (made.rmdir() if made.suffix == "" else made.unlink())


def test_checkpoints_in_step_order_and_only_step_dirs(tmp_path):
    """step-NNNNNNNN directories (8 digits), sorted by step, not by name; temporary and other names are not
    checkpoints."""
    run = RunDir(tmp_path)
    _mkdirs(run.checkpoints, ["step-00000010", "step-00000002", "step-100000000", "step-00000009",
                              ".step-00000011.abcd1234", "step-0000001", "step-00000003x", "xstep-00000004"])
    assert [d.name for d in run.checkpoint_dirs()] == ["step-00000002", "step-00000009", "step-00000010"]
    assert run.latest_checkpoint() == run.checkpoints / "step-00000010"


def test_prune_checkpoints_keeps_the_newest(tmp_path):
    """The newest `keep` stay; removing the others is best effort: one that cannot be removed (here a file in the
    way) is left, and the run goes on."""
    run = RunDir(tmp_path)
    _mkdirs(run.checkpoints, [f"step-{s:08d}" for s in (8, 12, 16, 100)])
    (run.checkpoints / "step-00000004").write_text("")
    prune_checkpoints(run, 2)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-00000004", "step-00000016", "step-00000100"]
    (run.checkpoints / "step-00000004").unlink()
    prune_checkpoints(run, 1)
    assert [d.name for d in run.checkpoint_dirs()] == ["step-00000100"]


def test_stale_temps_removed_beside_checkpoints_and_final(tmp_path):
    run = RunDir(tmp_path)
    _mkdirs(tmp_path, [".final.abcd1234", "checkpoints/.step-00000004.wxyz5678", "checkpoints/step-00000002",
                       "keep"])
    removed = run.remove_stale_temps()
    assert sorted(p.name for p in removed) == [".final.abcd1234", ".step-00000004.wxyz5678"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "keep"]
    assert [d.name for d in run.checkpoint_dirs()] == ["step-00000002"]


def test_write_json_replaces_the_file_whole(tmp_path):
    run = RunDir(tmp_path)
    path = tmp_path / "selection.json"
    path.write_text("old")
    run.write_json(path, {"a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2]}, indent=2) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selection.json"]  # no temporary file left


def _draws():
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_rng_state_restores_torch_python_and_numpy_streams():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = rng_state()
    assert set(state) == {"torch", "python", "numpy"}  # no GPU generator on a CPU-only machine
    first = _draws()
    _draws()
    set_rng_state(state)
    assert _draws() == first


def test_gpu_generators_are_saved_once_cuda_is_in_use_and_restored_on_each_visible_gpu(monkeypatch):
    """With CUDA (faked here) the checkpoint also holds one generator state a GPU, but only once CUDA has started
    (before that nothing drew from them, and reading them would start it); they are restored GPU by GPU, as many as
    are visible, and skipped when the state has none or no GPU is there."""
    gens = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: gens)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda gen, device="cuda": restored.append((gen, device)))
    assert "cuda" not in rng_state()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    state = rng_state()
    assert state["cuda"] is gens
    set_rng_state(state)
    assert restored == [(gens[0], 0)]  # one GPU visible of the two saved
    restored.clear()
    set_rng_state({k: v for k, v in state.items() if k != "cuda"})  # written without CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    set_rng_state(state)  # resumed without a GPU
    assert restored == []


def test_save_state_writes_a_checkpoint_that_reads_back(tmp_path):
    """A checkpoint (engine state given) holds the trainable tensors, the method state, the engine state with the
    random streams and state.json; a final state the same less the engine files."""
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.idx": torch.tensor([1, 2])}
    meta = {"step": 7, "examples_seen": 56}
    method = {"masks": {"x": torch.ones(2)}, "n": 3}
    engine = {"optimizer": {"state": {0: {"step": torch.tensor(7.0)}}}, "lr": [0.5]}
    torch.manual_seed(4)
    out = tmp_path / "checkpoints" / "step-00000007"
    save_state(out, tensors, meta, method, engine)
    assert sorted(p.name for p in out.iterdir()) == ["engine.json", "engine.safetensors", "method.json",
                                                     "method.safetensors", "state.json", TRAINABLE]
    assert read_meta(out) == meta
    assert json.loads((out / "state.json").read_text()) == meta
    got_method = load_method_state(out)
    assert got_method["n"] == 3 and torch.equal(got_method["masks"]["x"], torch.ones(2))
    got_engine, rng = load_engine_state(out)
    assert got_engine["lr"] == [0.5] and torch.equal(got_engine["optimizer"]["state"][0]["step"], torch.tensor(7.0))
    expected = torch.rand(2)
    torch.manual_seed(5)
    set_rng_state(rng)
    assert torch.equal(torch.rand(2), expected)  # the streams as they were when the checkpoint was written
    final = tmp_path / "final"
    save_state(final, {"a.weight": tensors["a.weight"]}, meta, method)
    assert sorted(p.name for p in final.iterdir()) == ["method.json", "method.safetensors", "state.json", TRAINABLE]
    model = nn.Module()
    model.a = nn.Linear(3, 2, bias=False)
    load_trainable(model, final / TRAINABLE)
    assert torch.equal(model.a.weight, tensors["a.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "final"]  # no temporary directory left


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_never_written(tmp_path, bad):
    out = tmp_path / "step-00000003"
    w = torch.ones(4)
    w[2] = bad
    with pytest.raises(RunFailure, match=r"step 3: b.weight holds non-finite values; step-00000003 was not written"):
        save_state(out, {"a.idx": torch.tensor([5]), "b.weight": w}, {"step": 3}, {}, {})
    assert list(tmp_path.iterdir()) == []
    save_state(out, {"a.idx": torch.tensor([5]), "b.weight": torch.ones(4)}, {"step": 3}, {}, {})  # integers pass
    assert read_meta(out)["step"] == 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))


def test_load_trainable_copies_the_saved_tensors_only(tmp_path):
    from safetensors.torch import save_file

    model = _model()
    other = model[1].weight.detach().clone()
    saved = {"0.weight": torch.full((2, 3), 0.5), "0.bias": torch.tensor([1.0, -1.0])}
    save_file(saved, str(tmp_path / TRAINABLE))
    load_trainable(model, tmp_path / TRAINABLE)
    assert torch.equal(model[0].weight, saved["0.weight"]) and torch.equal(model[0].bias, saved["0.bias"])
    assert torch.equal(model[1].weight, other)  # not in the file: untouched
    assert model[0].weight.requires_grad  # still a parameter that trains


def test_load_trainable_refuses_tensors_that_do_not_fit(tmp_path):
    from safetensors.torch import save_file

    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_file({"0.weight": torch.zeros(2, 3), "9.weight": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(UserError, match=r"tensors \['9.weight'\] do not match the prepared model"):
        load_trainable(model, tmp_path / "a.safetensors")
    save_file({"0.weight": torch.zeros(3, 2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(UserError, match=r"0.weight has shape \(3, 2\), the model expects \(2, 3\)"):
        load_trainable(model, tmp_path / "b.safetensors")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_read_meta_refusals(tmp_path):
    ckpt = tmp_path / "step-00000004"
    ckpt.mkdir()
    with pytest.raises(UserError, match="state.json: unreadable"):
        read_meta(ckpt)  # no state.json
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="state.json: unreadable"):
        read_meta(ckpt)
    for meta in ([4], {"examples_seen": 3}, {"step": "4"}, {"step": 4.0}):
        (ckpt / "state.json").write_text(json.dumps(meta))
        with pytest.raises(UserError, match="state.json: has no step"):
            read_meta(ckpt)
    (ckpt / "state.json").write_text(json.dumps({"step": 4}))
    assert read_meta(ckpt) == {"step": 4}
    (ckpt / "engine.pt").write_bytes(b"pickle")
    with pytest.raises(UserError, match="written by an older sparseft"):
        read_meta(ckpt)
    (ckpt / "engine.json").write_text("{}")  # a stray engine.pt beside the new files is ignored
    assert read_meta(ckpt) == {"step": 4}
