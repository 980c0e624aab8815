"""The SVD start: A and B are the top singular vectors of W, and the prepared model computes exactly the base."""

from __future__ import annotations

import pytest
import torch

from sparseft.methods.lamda.layers import LamdaLinear, lamda_delta
from tests.methods.lamda.lamda_testlib import lamda_layers, logits, prepared


@pytest.mark.parametrize("init", ["zero", "spectrum"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_initial_model_equals_the_base(load, arch, init):
    base = load(arch)
    ids = torch.randint(4, base.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = logits(base, ids)
    model = prepared(load(arch), r=4, init=init, scale=2.0).model
    layers = lamda_layers(model)
    assert len(layers) == 7 * model.config.num_hidden_layers
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    for layer in layers.values():  # B S - B0 S0 is exactly zero at the start, whatever S0 is
        assert torch.count_nonzero(lamda_delta(layer.scale, **layer.adapter_tensors())) == 0


def test_start_is_the_top_of_the_svd(load):
    base = load("llama")
    w = base.model.layers[0].mlp.down_proj.weight.detach().clone()  # (64, 128)
    model = prepared(base, r=5, init="spectrum", scale=2.0).model
    layer = model.model.layers[0].mlp.down_proj
    a, b, s = layer.lamda_A, layer.lamda_B.detach(), layer.lamda_S.detach()
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(a @ a.T, torch.eye(5), atol=1e-5, rtol=0)  # orthonormal rows of V^T
    torch.testing.assert_close(b.T @ b, torch.eye(5), atol=1e-5, rtol=0)  # orthonormal columns of U
    torch.testing.assert_close(w @ a.T, b * sigma[:5], atol=1e-5, rtol=0)  # W v_i = sigma_i u_i
    torch.testing.assert_close(s, torch.diag(sigma[:5]) / 2.0)  # spectrum: S0 = diag(sigma) / scale
    # scale * B0 S0 A is W's best rank-5 approximation, the part the adapter path now carries.
    torch.testing.assert_close(2.0 * b @ s @ a, u[:, :5] @ torch.diag(sigma[:5]) @ vh[:5], atol=1e-5, rtol=0)
    assert not any(n.endswith("lamda_A") for n, _ in model.named_parameters()), "A is a buffer: it cannot train"


def test_zero_init_and_rank_errors(load):
    model = prepared(load("llama"), r=3).model
    layer = model.model.layers[1].self_attn.q_proj
    assert torch.count_nonzero(layer.lamda_S) == 0 and layer.lamda_start is None
    from sparseft.errors import UserError

    with pytest.raises(UserError, match=r"method.r=65: larger than .*largest possible rank 64"):
        prepared(load("llama"), r=65)


@pytest.mark.parametrize("start", [True, False], ids=["spectrum", "zero"])
def test_a_layer_puts_its_tensors_where_and_as_its_base_weight_is(start):
    """A, S, B and B0 S0 arrive as fp32 CPU tensors (an SVD, an adapter file); the layer holds them on its base
    weight's device in its dtype, and only S and B train. (A bf16 base on the `meta` device: a CPU-only machine
    cannot show a missed move.)"""
    base = torch.nn.Linear(5, 3).to(torch.bfloat16).to("meta")
    layer = LamdaLinear(base, torch.zeros(2, 5), torch.zeros(2, 2), torch.zeros(3, 2), scale=1.0,
                        lamda_start=torch.zeros(3, 2) if start else None)
    tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
    assert {n for n in tensors if not n.startswith("base_layer.")} == \
        {"lamda_A", "lamda_S", "lamda_B_cols.0", "lamda_B_cols.1"} | ({"lamda_start"} if start else set())
    for n, t in tensors.items():
        assert t.device.type == "meta" and t.dtype == torch.bfloat16, (n, t.device, t.dtype)
    # S and B's columns train; the base weight and bias are frozen (A and B0 S0 are buffers).
    trains = {n for n, q in layer.named_parameters() if q.requires_grad}
    assert trains == {"lamda_S", "lamda_B_cols.0", "lamda_B_cols.1"}
