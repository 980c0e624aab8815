"""Device placement and precision (train.device, train.precision, model.dtype): fp32 masters under bf16-mixed keep
small updates, exports reproduce the trained weights bit for bit in the storage dtype, resume stays exact, and every
tensor a method creates follows the model's device."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from sparseft.cli import app
from sparseft.methods import MethodContext, build_method
from sparseft.models import load_model
from sparseft.recipe import load_recipe
from sparseft.train.precision import keep_masters, resolve_precision
from tests.helpers import cli, records, write_recipe

runner = CliRunner()
S2FT = {"name": "s2ft", "heads": {"ratio": 0.5}, "channels": {"ratio": 0.25}, "projections": ["q", "v", "o", "down"]}
LORA = {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}
# Spectrum init and B never frozen: every element of S and B has a gradient from the first step (with init zero, S0 = 0
# gives B none at first, and the default schedule freezes B after half the run).
LAMDA = {"name": "lamda", "r": 4, "init": "spectrum", "freeze_b": {"start": 1.0, "end": 1.0}}


def _train(tmp_path, model, method, name: str, dtype: str, precision: str, **train):
    d = tmp_path / name
    d.mkdir()
    recipe = write_recipe(d, model, method, model={"dtype": dtype},
                          train={"precision": precision, "device": "cpu", **train})
    cli("train", recipe)
    return recipe, d / "run"


def _initial_trainable(recipe_path, run) -> dict[str, torch.Tensor]:
    """The trainable tensors as prepared before any step (the same selection as the run), as fp32."""
    recipe = load_recipe(recipe_path)
    method = build_method(recipe.method)
    model = load_model(recipe.model.path, recipe.model.dtype)
    ctx = MethodContext(recipe=recipe, run_dir=run, log=lambda s: None)
    model = method.prepare(model, json.loads((run / "selection.json").read_text()), ctx)
    return {n: p.detach().float().clone() for n, p in method.trainable_parameters(model).items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", [S2FT, LORA, LAMDA], ids=["s2ft", "lora", "lamda"])
def test_bf16_mixed_keeps_small_updates_and_follows_fp32(tmp_path, tiny_model_dir, method):
    model = tiny_model_dir("llama")
    # 3 AdamW steps at lr 2e-5: every element with a gradient moves by ~2e-5, far below a bf16 step of the weights.
    recipe, run = _train(tmp_path, model, method, "mixed", "bfloat16", "bf16-mixed", max_steps=3, lr=2e-5)
    before, after = _initial_trainable(recipe, run), load_file(str(run / "final" / "trainable.safetensors"))
    assert all(t.dtype == torch.float32 for t in after.values()), "masters are saved in fp32"
    moved = sum(int((after[n].float() != before[n]).sum()) for n in before)
    total = sum(t.numel() for t in before.values())
    assert moved >= 0.99 * total, f"{moved}/{total} trainable elements moved"
    if method is S2FT:  # what the masters are for: trained in bf16 directly, most of these updates round away
        recipe, run = _train(tmp_path, model, method, "true", "bfloat16", "bf16-true", max_steps=3, lr=2e-5)
        before, after = _initial_trainable(recipe, run), load_file(str(run / "final" / "trainable.safetensors"))
        assert sum(int((after[n].float() != before[n]).sum()) for n in before) < 0.9 * total

    # The loss curve over 20 steps under bf16 autocast stays within 1e-2 of the fp32 run's.
    _, fp32 = _train(tmp_path, model, method, "fp32", "float32", "fp32", max_steps=20, lr=1e-3)
    _, mixed = _train(tmp_path, model, method, "mixed20", "float32", "bf16-mixed", max_steps=20, lr=1e-3)
    a, b = [r["loss"] for r in records(fp32) if "loss" in r], [r["loss"] for r in records(mixed) if "loss" in r]
    assert len(a) == len(b) == 20 and a[-1] < a[0] - 0.05
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-2


def _storage(dtype: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _base_state(model_dir: str, dtype: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_model(model_dir, dtype).state_dict().items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_s2ft_merged_export_is_the_trained_model_bit_for_bit(tmp_path, tiny_model_dir, dtype):
    """The merged weights equal the trained fp32 slices rounded once to the storage dtype, placed at the adapter's
    base-coordinate indices: no second rounding through a delta. A large lr makes weights near zero change sign, where
    an fp32 delta cannot be exact (the float64 path)."""
    model = tiny_model_dir("llama")
    _, run = _train(tmp_path, model, S2FT, "run", dtype, "auto", max_steps=4, lr=5e-2)
    cli("export", run, "--merged", tmp_path / "merged")
    cli("export", run, "--adapter", tmp_path / "adapter")
    trained = load_file(str(run / "final" / "trainable.safetensors"))
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=_storage(dtype)).state_dict()
    expected = _base_state(model, dtype)
    n = 0
    for name, slice_values in trained.items():  # <path>.trainable -> <path>.weight at <path>.rows | <path>.cols
        path = name.removesuffix(".trainable")
        w = expected[path + ".weight"]
        if f"{path}.rows" in adapter:
            w[adapter[f"{path}.rows"]] = slice_values.to(w.dtype)
        else:
            w[:, adapter[f"{path}.cols"]] = slice_values.to(w.dtype)
        n += 1
    assert n > 0
    for k, w in expected.items():
        assert merged[k].dtype == _storage(dtype)
        assert torch.equal(merged[k], w), k
    # Applying the adapter to the untouched base gives the same weights, bit for bit.
    cli("adapter", "apply", model, "--adapter", tmp_path / "adapter", "--out", tmp_path / "applied")
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied", dtype=_storage(dtype)).state_dict()
    for k, w in expected.items():
        assert torch.equal(applied[k].to(w.dtype), w), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lamda_merged_export_is_the_independent_formula_bit_for_bit(tmp_path, tiny_model_dir, dtype):
    """W' = W + scale (B S - B0 S0) A, each product in fp32 from the trained fp32 S and B, rounded once to storage.
    Computed here from the run's files, not through the layer's code."""
    model = tiny_model_dir("llama")
    _, run = _train(tmp_path, model, {**LAMDA, "scale": 2.0}, "run", dtype, "auto", max_steps=4, lr=1e-2)
    cli("export", run, "--merged", tmp_path / "merged")
    trained = load_file(str(run / "final" / "trainable.safetensors"))
    init = load_file(str(run / "lamda_init.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=_storage(dtype)).state_dict()
    expected = _base_state(model, dtype)
    paths = sorted({k.rsplit(".lamda_", 1)[0] for k in trained})
    assert paths and all(t.dtype == torch.float32 for t in trained.values())
    for p in paths:
        w = expected[p + ".weight"]
        a = init[f"{p}.lamda_A"].to(w.dtype).float()  # A and B0 S0 live in the storage dtype in the model
        s = trained[f"{p}.lamda_S"]
        b = torch.stack([trained[f"{p}.lamda_B_cols.{j}"] for j in range(s.shape[0])], dim=1)  # (d_out, r), fp32
        m = b @ s  # fp32 (d_out, r)
        if f"{p}.lamda_start" in init:
            m = m - init[f"{p}.lamda_start"].to(w.dtype).float()
        w.copy_((w.float() + 2.0 * (m @ a)).to(w.dtype))
    for k, w in expected.items():
        assert torch.equal(merged[k], w), k


@pytest.mark.slow
@pytest.mark.parametrize("method", [S2FT, {"name": "hift", "group_size": 2}], ids=["s2ft", "hift"])
def test_resume_after_bf16_mixed_is_exact(tmp_path, tiny_model_dir, method):
    """HiFT keeps fp32 masters for its active group only: the others wait (rounded once) with their parked masters,
    so resume must bring back the parked and the active masters alike."""
    model = tiny_model_dir("llama")
    train = {"max_steps": 8, "save_every": 3, "keep_checkpoints": 3, "lr": 1e-3, "schedule": "cosine"}
    _, a = _train(tmp_path, model, method, "a", "bfloat16", "bf16-mixed", **train)
    recipe_b, b = _train(tmp_path, model, method, "b", "bfloat16", "bf16-mixed", **train)
    shutil.rmtree(b / "final")
    shutil.rmtree(b / "checkpoints" / "step-00000006")
    out = cli("train", recipe_b, "--resume")
    assert "at step 3" in out.output
    wa, wb = load_file(str(a / "final" / "trainable.safetensors")), load_file(str(b / "final" / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k
    la, lb = [r["loss"] for r in records(a) if "loss" in r], [r["loss"] for r in records(b) if "loss" in r]
    assert la == lb


def test_hift_keeps_fp32_masters_for_the_active_group_only(tmp_path, tiny_model_dir):
    from tests.methods.hift.hift_testlib import Driver  # noqa: F401  (documents where the step driver lives)

    model_dir = tiny_model_dir("llama")
    recipe = load_recipe(write_recipe(tmp_path, model_dir, {"name": "hift"}, model={"dtype": "bfloat16"},
                                      train={"max_steps": 6, "lr": 1e-3}))
    model = load_model(model_dir, "bfloat16")
    method = build_method(recipe.method)
    ctx = MethodContext(recipe=recipe, log=lambda s: None, master_dtype=torch.float32)
    model = method.prepare(model, method.select(model, ctx), ctx)
    assert keep_masters(method.master_parameters(model), resolve_precision("bf16-mixed", "bfloat16")) == 0
    opt = torch.optim.AdamW(method.optimizer_param_groups(model, 0.0), lr=1e-3)
    params = dict(model.named_parameters())
    for step in range(method.num_groups + 1):
        method.on_step_start(step, model, opt)
        active = set(method.group_names(method.group_at(step)))
        for n, p in params.items():
            assert p.dtype == (torch.float32 if n in active else torch.bfloat16), (step, n)
        for n in active:
            params[n].grad = torch.full_like(params[n], 1e-3)
        opt.step()
        opt.zero_grad(set_to_none=True)
    # Every group has had its turn: each waiting group's master is parked beside its optimizer state.
    waiting = set(params) - set(method.group_names(method.group_at(method.num_groups)))
    assert {n for n, s in method._parked.items() if "_master" in s} == waiting
    assert all(method._parked[n]["_master"].dtype == torch.float32 for n in waiting)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_device_cpu_and_auto_run_and_the_log_says_where(tmp_path, tiny_model_dir, device):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), {"name": "lora", "r": 2},
                          train={"max_steps": 2, "device": device}, model={"dtype": "bfloat16"})
    out = cli("train", recipe)
    expected = "cuda:0" if device == "auto" and torch.cuda.is_available() else "cpu"
    assert f"device {expected}" in out.output and "precision bf16-mixed" in out.output
    rec = records(tmp_path / "run")
    assert all(r["peak_mem_mb"] > 0 for r in rec if "loss" in r)


@pytest.mark.parametrize("override, message", [
    ("train.device=cuda:0", "train.device=cuda:0: CUDA is not available"),
    ("train.device=tpu", "train.device"),
    ("model.attn_implementation=flash_attention_2", "model.attn_implementation=flash_attention_2: needs"),
    ("train.precision=bf16-true", "train.precision=bf16-true: does not fit model.dtype=float32"),
    ("train.precision=fp32", "train.precision=fp32: does not fit model.dtype=bfloat16"),
])
def test_devices_and_kernels_this_machine_lacks_are_recipe_errors(tmp_path, tiny_model_dir, override, message):
    if torch.cuda.is_available() and "cuda" in override:
        pytest.skip("this machine has CUDA")
    dtype = "bfloat16" if "precision=fp32" in override else "float32"
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), {"name": "full"}, model={"dtype": dtype},
                          train={"max_steps": 1})
    result = runner.invoke(app, ["train", str(recipe), override])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "final").exists()


def test_eval_device_flag(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "1 2 3 4 5"}\n')
    ok = runner.invoke(app, ["eval", tiny_model_dir("llama"), "--data", str(data), "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    if not torch.cuda.is_available():
        bad = runner.invoke(app, ["eval", tiny_model_dir("llama"), "--data", str(data), "--device", "cuda"])
        assert bad.exit_code == 2 and "--device=cuda: CUDA is not available" in bad.output


METHODS = [S2FT, LORA, LAMDA, {"name": "full"}, {"name": "hift", "group_size": 2},
           {"name": "squarehead", "sparsity": 0.5, "pruner": "magnitude"}]


@pytest.mark.parametrize("method", METHODS, ids=[m["name"] for m in METHODS])
def test_every_tensor_a_method_creates_follows_the_model_device(tmp_path, tiny_model_dir, method):
    """The method selects on the CPU model, then prepares it moved to the `meta` device: any tensor made on a fixed
    device (a bare torch.zeros, a .cpu()) would show up off `meta`, which a CPU-only machine could not show."""
    model_dir = tiny_model_dir("llama")
    recipe = load_recipe(write_recipe(tmp_path, model_dir, method, model={"dtype": "bfloat16"}))
    m = build_method(recipe.method)
    cpu_model = load_model(model_dir, "bfloat16")
    ctx = MethodContext(recipe=recipe, run_dir=None, log=lambda s: None)
    selection = m.select(cpu_model, ctx)
    meta = torch.device("meta")
    model = cpu_model.to(meta)
    ctx = MethodContext(recipe=recipe, run_dir=None, log=lambda s: None, device=meta, master_dtype=torch.float32)
    model = m.prepare(model, selection, ctx)
    keep_masters(m.master_parameters(model), resolve_precision("bf16-mixed", "bfloat16"))
    # (The step hooks read values, .item(), which meta tensors cannot give; what they create is placed by inspection:
    # LaMDA's freeze columns go to its buffer's device, HiFT's parked state to pinned CPU memory by design.)
    off = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device != meta]
    assert not off, off

    def walk(obj, path, seen):
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device != meta:
                off.append(path)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}", seen)
        elif isinstance(obj, (list, tuple, set)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]", seen)
        elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
            walk(vars(obj), path, seen)

    # The method's own state (masks, copies ...); a teacher module moves to the student's device on first use.
    walk({k: v for k, v in vars(m).items() if not isinstance(v, torch.nn.Module)}, m.name, set())
    assert not off, off
