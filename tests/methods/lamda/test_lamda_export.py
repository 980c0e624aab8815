"""Export: merged == base + adapter bit for bit, the adapter file describes itself, and applying it reproduces the
trained model; the base comes back untouched afterwards."""

from __future__ import annotations

import json

import pytest
import torch

from sparseft.errors import UserError
from sparseft.export.apply import adapter_applied
from sparseft.methods.lamda.adapter import read_lamda_adapter
from sparseft.methods.lamda.layers import LamdaLinear, merged_weight
from tests.methods.lamda.lamda_testlib import lamda_layers, logits, prepared, train_steps


def by_formula(weight: torch.Tensor, scale: float, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """W + scale * (B S - B0 S0) A, in fp32 and rounded once to the weight's dtype, written out here rather than
    taken from sparseft (the adapter's file tensors, the README's formula)."""
    up = t["lamda_B"].float() @ t["lamda_S"].float()  # (d_out, r)
    if "lamda_start" in t:
        up = up - t["lamda_start"].float()
    return (weight.float() + scale * (up @ t["lamda_A"].float())).to(weight.dtype)


@pytest.mark.parametrize("init,allocation", [("zero", "uniform"), ("spectrum", "spectrum")])
def test_merged_equals_base_plus_adapter(load, tmp_path, init, allocation):
    p = prepared(load("qwen2"), r=4, init=init, rank_allocation=allocation, scale=0.5, projections=["q", "v", "down"],
                 freeze_b={"start": 0.0, "end": 0.5})
    train_steps(p.method, p.recipe, p.model, 4, weight_decay=0.01)
    ids = torch.randint(4, p.model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    trained = logits(p.model, ids)
    ranks = {n: m.rank for n, m in lamda_layers(p.model).items()}

    fields = p.method.save_adapter(p.model, tmp_path / "adapter", "base-model")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["method"] == "lamda" and cfg["base_model"] == "base-model" and cfg["format_version"] == 1
    assert cfg["ranks"] == ranks == fields["ranks"] and cfg["init"] == init and cfg["scale"] == 0.5
    assert cfg["num_parameters"] == sum(r * r + p.model.get_submodule(n).out_features * r for n, r in ranks.items())
    scale, modules = read_lamda_adapter(tmp_path / "adapter")
    assert ("lamda_start" in next(iter(modules.values()))) == (init == "spectrum")

    base = load("qwen2")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    with adapter_applied(base.eval(), tmp_path / "adapter") as adapted:
        torch.testing.assert_close(logits(adapted, ids), trained, rtol=1e-5, atol=1e-5)
    for k, v in base.state_dict().items():  # the wrappers are gone and nothing was written into the base
        assert torch.equal(v, base_state[k]), k

    merged = p.method.merged(p.model)
    assert not lamda_layers(merged)
    merged_state = merged.state_dict()
    for k, v in base_state.items():
        path = k.removesuffix(".weight")
        expected = by_formula(v, scale, modules[path]) if path in modules else v
        assert torch.equal(merged_state[k], expected), k  # merged == base + adapter, bit for bit
        if path in modules:
            assert not torch.equal(expected, v), f"{k}: training changed nothing, the check would be empty"
    torch.testing.assert_close(logits(merged, ids), trained, rtol=1e-5, atol=1e-5)


def test_bad_adapter_is_a_user_error(load, tmp_path):
    p = prepared(load("llama"), r=2, projections=["o"])
    p.method.save_adapter(p.model, tmp_path / "a", "base")
    other = load("qwen3")  # the same module paths, other shapes (head_dim 24)
    with pytest.raises(UserError, match=r"o_proj: LaMDA tensors .* do not fit rank 2"):
        with adapter_applied(other, tmp_path / "a"):
            pass
    assert not lamda_layers(other), "a failed apply leaves the model as it was"


@pytest.mark.parametrize("bad", ["lamda_A", "lamda_S", "lamda_B", "lamda_start"])
def test_a_layer_refuses_any_one_tensor_of_another_shape(bad):
    """Each of A (r, d_in), S (r, r), B (d_out, r) and B0 S0 (d_out, r) is checked on its own: an adapter whose B
    alone was cut for another layer is refused, not applied with a broadcast or a crash later (rank 2, 5 -> 3)."""
    good = {"lamda_A": torch.zeros(2, 5), "lamda_S": torch.zeros(2, 2), "lamda_B": torch.zeros(3, 2),
            "lamda_start": torch.zeros(3, 2)}
    LamdaLinear(torch.nn.Linear(5, 3), scale=1.0, **good)
    wrong = {"lamda_A": torch.zeros(2, 4), "lamda_S": torch.zeros(2, 3), "lamda_B": torch.zeros(4, 2),
             "lamda_start": torch.zeros(3, 3)}[bad]
    with pytest.raises(ValueError, match=r"do not fit rank 2"):
        LamdaLinear(torch.nn.Linear(5, 3), scale=1.0, **{**good, bad: wrong})


def test_merged_weight_is_rounded_once_to_the_base_dtype():
    """base + scale (B S - B0 S0) A summed in fp32 and rounded once to the base weight's dtype (bf16 here)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(48, 32, generator=g).to(torch.bfloat16)
    t = {"lamda_A": torch.randn(4, 32, generator=g), "lamda_S": torch.randn(4, 4, generator=g),
         "lamda_B": torch.randn(48, 4, generator=g), "lamda_start": torch.randn(48, 4, generator=g)}
    merged = merged_weight(base, 0.5, **t)
    assert merged.dtype == torch.bfloat16
    expected = base.float() + 0.5 * ((t["lamda_B"] @ t["lamda_S"] - t["lamda_start"]) @ t["lamda_A"])
    assert torch.equal(merged, expected.to(torch.bfloat16))
