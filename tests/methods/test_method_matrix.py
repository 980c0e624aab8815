"""Every registered method on a tiny GQA model: prepare, train a few steps, export merged (and the adapter where the
method has one), reload with plain transformers, same outputs. A new method is covered by registering it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparseft.export.apply import adapter_applied
from sparseft.methods import MethodContext, build_method, method_names
from sparseft.models import load_model
from sparseft.recipe import validate_recipe_data
from sparseft.train.optim import Engine
from tests.helpers import random_batches

# Small settings where a method's defaults are sized for real models; every other method runs on its defaults.
# squarehead: the test's lr (1e-2, AdamW) moves every weight of this random 64-wide model by half its scale in one step,
# so the block outputs leave the teacher's far behind and the SquareHead term (weight 1) outgrows the CE drop within 4
# steps; at lr 1e-3 the defaults fall steadily. A smaller distillation weight keeps this test about the protocol.
SMALL = {"lora": {"r": 4}, "s2ft": {"heads": {"count": 1}}, "squarehead": {"loss": {"squarehead": 0.1}}}


def _batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batches(vocab, 1, batch=4, seed=seed)[0]


@pytest.mark.parametrize("name", method_names())
def test_method_matrix(name, tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("mistral")
    recipe = validate_recipe_data({
        "model": {"path": base_dir}, "data": {"train": {"path": "unused.jsonl"}},
        "method": {"name": name, **SMALL.get(name, {})},
        "train": {"max_steps": 4, "lr": 1e-2, "output_dir": str(tmp_path / "run")},
    })
    torch.manual_seed(0)
    model = load_model(base_dir)
    batch = _batch(model.config.vocab_size)
    method = build_method(recipe.method)
    ctx = MethodContext(recipe=recipe, calibration_batches=lambda n: iter([batch] * n), log=lambda s: None)
    model = method.prepare(model, method.select(model, ctx), ctx)
    model.train()
    trainable = method.trainable_parameters(model)
    assert trainable, "a method must train something"
    before = {n: p.detach().clone() for n, p in trainable.items()}
    engine = Engine(model, method.optimizer_param_groups(model, 0.0), recipe.train)

    losses = []
    for step in range(recipe.train.max_steps):
        method.on_step_start(step, model, engine.optimizer)
        loss, _ = method.compute_loss(model, batch)
        engine.backward(loss)
        engine.step()
        method.on_step_end(step, model, engine.optimizer)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    changed = [n for n, p in trainable.items() if not torch.equal(p.detach(), before[n])]
    assert changed, "no trainable parameter changed"

    model.eval()
    probe = _batch(model.config.vocab_size, seed=1)["input_ids"]
    with torch.no_grad():
        trained_logits = model(input_ids=probe).logits
    if method.has_adapter:
        method.save_adapter(model, tmp_path / "adapter", base_dir)
        with adapter_applied(load_model(base_dir).eval(), tmp_path / "adapter") as adapted, torch.no_grad():
            torch.testing.assert_close(adapted(input_ids=probe).logits, trained_logits, rtol=1e-5, atol=1e-5)
    method.merged(model).save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged) is type(load_model(base_dir)), "the merged model is a plain transformers model"
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, trained_logits, rtol=1e-5, atol=1e-5)
