"""Adapters as the method protocol applies them (issue 17): every adapter records its base and is refused on another
base unless forced; LoRA's adapter_config.json is exactly PEFT's, sparseft's fields beside it, old adapters still
load; applying and serving never branch on a method's name; methods never import the trainer."""

from __future__ import annotations

import ast
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sparseft
from sparseft.cli import app
from sparseft.errors import UserError
from sparseft.export.adapter_files import CONFIG_NAME, METADATA_NAME
from sparseft.export.apply import adapter_applied
from sparseft.models import load_model
from tests.helpers import cli, random_batches, write_recipe

METHODS = {"s2ft": {"name": "s2ft", "projections": ["q", "o", "down"], "heads": {"count": 1}},
           "lamda": {"name": "lamda", "r": 4, "projections": ["q", "down"]},
           "lora": {"name": "lora", "r": 4}}
PACKAGE = Path(sparseft.__file__).parent


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """{method: adapter dir} trained 3 steps on the tiny Llama and exported with `sparseft export --adapter`."""
    base = tiny_model_dir("llama")
    out = {}
    for name, method in METHODS.items():
        tmp = tmp_path_factory.mktemp(name)
        cli("train", write_recipe(tmp, base, method, train={"max_steps": 3, "lr": 3e-2}))
        cli("export", tmp / "run", "--adapter", tmp / "adapter")
        out[name] = tmp / "adapter"
    return out


def _probe(model, vocab):
    with torch.no_grad():
        return model(input_ids=random_batches(vocab, 1, seed=5)[0]["input_ids"]).logits


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_an_adapter_is_refused_on_another_base(name, adapters, tiny_model_dir, tmp_path):
    base, other = tiny_model_dir("llama"), tiny_model_dir("llama", seed=1)  # same config, other weights
    path = adapters[name]
    cfg = json.loads((path / (METADATA_NAME if name == "lora" else CONFIG_NAME)).read_text())
    fp = cfg["base_fingerprint"]
    assert fp["config"]["hidden_size"] == 64 and fp["modules"] and len(fp["weights_sha256"]) == 64

    model = load_model(other).eval()
    before = _probe(model, model.config.vocab_size)
    with pytest.raises(UserError, match="made for another base model .*modules it changes differ.*--force"):
        with adapter_applied(model, path):
            pass
    assert torch.equal(_probe(model, model.config.vocab_size), before), "a refused adapter leaves the model alone"
    with adapter_applied(model, path, force=True) as adapted:
        assert not torch.equal(_probe(adapted, model.config.vocab_size), before)
    for dtype in ("float32", "bfloat16"):  # its own base passes, whatever dtype it is loaded in
        with adapter_applied(load_model(base, dtype).eval(), path):
            pass

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "1 + 2 = 3"}) + "\n" for _ in range(4)))
    result = CliRunner().invoke(app, ["eval", other, "--adapter", str(path), "--data", str(data)])
    assert result.exit_code == 2 and "made for another base model" in result.output, result.output
    cli("eval", other, "--adapter", path, "--data", data, "--force")
    result = CliRunner().invoke(app, ["generate", other, "--adapter", str(path), "--prompt", "1 +",
                                      "--max-new-tokens", "2"])
    assert result.exit_code == 2 and "made for another base model" in result.output, result.output


@pytest.mark.slow
def test_adapter_apply_refuses_another_base(adapters, tiny_model_dir, tmp_path):
    other = tiny_model_dir("llama", seed=1)
    result = CliRunner().invoke(app, ["adapter", "apply", other, "--adapter", str(adapters["s2ft"]),
                                      "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "made for another base model" in result.output, result.output
    assert not (tmp_path / "m").exists()
    cli("adapter", "apply", other, "--adapter", adapters["s2ft"], "--out", tmp_path / "m", "--force")
    cli("adapter", "apply", tiny_model_dir("llama"), "--adapter", adapters["s2ft"], "--out", tmp_path / "m2")


@pytest.mark.slow
def test_lora_config_is_exactly_peft_and_old_adapters_still_load(adapters, tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel

    path = adapters["lora"]
    peft_cfg = json.loads((path / CONFIG_NAME).read_text())
    assert set(peft_cfg) <= set(LoraConfig.__dataclass_fields__) | {"peft_type"}, \
        set(peft_cfg) - set(LoraConfig.__dataclass_fields__)
    meta = json.loads((path / METADATA_NAME).read_text())
    assert meta["method"] == "lora" and meta["base_model"] == tiny_model_dir("llama") and "format_version" in meta
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(load_model(tiny_model_dir("llama")), str(path))
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)], [str(w.message) for w in caught]

    # An adapter written before the split: sparseft's keys inside adapter_config.json, no metadata file.
    old = tmp_path / "old"
    shutil.copytree(path, old)
    (old / CONFIG_NAME).write_text(json.dumps({**peft_cfg, **{k: v for k, v in meta.items()
                                                             if k != "base_fingerprint"}}))
    (old / METADATA_NAME).unlink()
    base = load_model(tiny_model_dir("llama")).eval()
    with adapter_applied(base, path) as a:
        new_logits = _probe(a, base.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the old file's extra keys, as it always did
        with adapter_applied(base, old) as a:
            torch.testing.assert_close(_probe(a, base.config.vocab_size), new_logits)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_methods_never_import_the_trainer():
    """Nothing of the engine, loop, optimizer or checkpoints; the loss functions (sparseft.train.loss: the default
    Method.compute_loss and SquareHead's task term) are plain functions of a model and a batch."""
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in _imports(p)
                                                     if m.startswith("sparseft.train") and m != "sparseft.train.loss")
                 for p in (PACKAGE / "methods").rglob("*.py")}
    assert not {p: m for p, m in offenders.items() if m}, offenders


def test_applying_and_serving_know_no_method_by_name():
    from sparseft.methods import method_names

    for rel in ("export/apply.py", "infer/run.py", "export/run.py"):
        strings = {n.value for n in ast.walk(ast.parse((PACKAGE / rel).read_text()))
                   if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not strings & set(method_names()), f"{rel} names a method: {strings & set(method_names())}"


def test_a_new_method_applies_its_adapter_through_the_protocol(tmp_path, tiny_model_dir):
    """A method registered here (one class, no other file touched) is applied by adapter_applied."""
    from contextlib import contextmanager
    from typing import Literal

    from sparseft.export.adapter_files import write_adapter
    from sparseft.methods import Method, MethodConfig, register
    from sparseft.methods import base as registry

    class ScaleConfig(MethodConfig):
        name: Literal["test_scale"] = "test_scale"

    @register
    class Scale(Method):
        config_cls = ScaleConfig

        @classmethod
        @contextmanager
        def apply_adapter(cls, model, path):
            w = model.lm_head.weight
            saved = w.detach().clone()
            with torch.no_grad():
                w.mul_(2.0)
            try:
                yield model
            finally:
                with torch.no_grad():
                    w.copy_(saved)

    try:
        write_adapter(tmp_path / "a", {}, {"method": "test_scale", "base_model": "x"})
        model = load_model(tiny_model_dir("llama")).eval()
        before = _probe(model, model.config.vocab_size)
        with adapter_applied(model, tmp_path / "a") as adapted:
            torch.testing.assert_close(_probe(adapted, model.config.vocab_size), 2 * before)
        assert torch.equal(_probe(model, model.config.vocab_size), before)
    finally:
        registry._REGISTRY.pop("test_scale", None)


def test_lamda_gathers_through_the_context(tiny_model_dir):
    """LaMDA reads and writes B through MethodContext.full_parameters (the engine's gather under ZeRO-3)."""
    from sparseft.methods import MethodContext, build_method
    from sparseft.methods.base import whole_parameters
    from sparseft.recipe import validate_recipe_data
    from sparseft.train.optim import Engine

    calls = []

    def gather(params, modify=False):
        calls.append((len(list(params)), modify))
        return whole_parameters(params, modify)

    recipe = validate_recipe_data({"model": {"path": "unused"}, "data": {"train": {"path": "t.jsonl"}},
                                   "train": {"max_steps": 4, "lr": 1e-2},
                                   "method": {"name": "lamda", "r": 2, "projections": ["q"],
                                              "freeze_b": {"start": 0.25, "end": 0.5}}})
    method = build_method(recipe.method)
    model = load_model(tiny_model_dir("llama"))
    ctx = MethodContext(recipe=recipe, log=lambda s: None, full_parameters=gather)
    model = method.prepare(model, method.select(model, ctx), ctx)
    engine = Engine(model, method.optimizer_param_groups(model, 0.0), recipe.train)
    for step in range(4):
        method.on_step_start(step, model, engine.optimizer)
        loss, _ = method.compute_loss(model, random_batches(model.config.vocab_size, 1)[0])
        engine.backward(loss)
        engine.step()
        method.on_step_end(step, model, engine.optimizer)
    layers = model.config.num_hidden_layers
    # Step 2 freezes both columns of every layer's B at once: one gather of all of them; the optimizer holds them
    # itself here, so nothing is pinned and the write-back gathers none.
    assert (2 * layers, False) in calls and (0, True) in calls, calls
