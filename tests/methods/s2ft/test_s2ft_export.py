"""After training: merged model, adapter files, fusing / unfusing adapters on a base, mixed-adapter batches."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sparseft.errors import UserError
from sparseft.export.adapter_files import write_adapter
from sparseft.export.sparse_adapters import (apply_adapters, fuse, load_sparse_adapter, mixed_adapters, unfuse)
from sparseft.methods.s2ft.layers import SliceLinear
from sparseft.methods.s2ft.permute import expand
from sparseft.models.arch import ATTN_ROLES, ROLES, arch_of
from tests.helpers import random_batches
from tests.methods.s2ft.s2ft_testlib import context, logits, s2ft

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
IDS = torch.randint(4, 400, (3, 10), generator=torch.Generator().manual_seed(1))


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """trained(arch): S2FT on every projection, a few AdamW steps, then the adapter and the merged model."""
    cache = {}

    def make(arch: str):
        if arch in cache:
            return cache[arch]
        torch.manual_seed(0)
        base_dir = tiny_model_dir(arch)
        model = _load(base_dir)
        method = dict(projections=list(ROLES), heads={"count": 1}, channels={"count": 8}, seed=2)
        m = s2ft(**method)
        ctx = context(model, **method)
        selection = m.select(model, ctx)
        model = m.prepare(model, selection, ctx)
        opt = torch.optim.AdamW(m.trainable_parameters(model).values(), lr=1e-2)
        model.train()
        for batch in random_batches(model.config.vocab_size, 3, seed=5):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        trained_logits = logits(model, IDS)
        out = tmp_path_factory.mktemp(f"s2ft-{arch}") / "adapter"
        fields = m.save_adapter(model, out, base_dir)
        merged = m.merged(model)
        cache[arch] = SimpleNamespace(base_dir=base_dir, selection=selection, adapter=out, fields=fields,
                                      trained_logits=trained_logits, merged=merged)
        return cache[arch]

    return make


def _selected_region(spec, selection, layer, role, shape) -> torch.Tensor:
    units = selection["heads" if role in ATTN_ROLES else "channels"][str(layer)]
    mask = torch.zeros(shape, dtype=torch.bool)
    idx = expand(units, spec.unit_size(role))
    if role in ("o", "down"):
        mask[:, idx] = True
    else:
        mask[idx] = True
    return mask


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_changes_only_selected_slices(trained, arch, tmp_path):
    t = trained(arch)
    base = _load(t.base_dir)
    spec = arch_of(base)
    assert not any(isinstance(mod, SliceLinear) for mod in t.merged.modules())
    merged_sd, base_sd = t.merged.state_dict(), base.state_dict()
    assert merged_sd.keys() == base_sd.keys()
    region_params = {spec.proj_path(layer, role) + ".weight": (layer, role)
                     for layer in range(spec.num_layers) for role in ROLES}
    for name, w in merged_sd.items():
        if name not in region_params:
            assert torch.equal(w, base_sd[name]), name
            continue
        mask = _selected_region(spec, t.selection, *region_params[name], w.shape)
        assert torch.equal(w[~mask], base_sd[name][~mask]), name
        assert not torch.equal(w[mask], base_sd[name][mask]), name  # training moved the slice
    torch.testing.assert_close(logits(t.merged, IDS), t.trained_logits, atol=1e-5, rtol=0)
    # A plain transformers directory in the base layout.
    t.merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(_load(tmp_path / "merged"), IDS), t.trained_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_on_base_is_merged_bit_for_bit(trained, arch):
    t = trained(arch)
    cfg = json.loads((t.adapter / "adapter_config.json").read_text())
    assert cfg["method"] == "s2ft" and cfg["unit"] == "kv_group" and cfg["base_model"] == t.base_dir
    assert cfg["projections"] == list(ROLES) and cfg["layers"]["0"]["num_channels"] == 8
    tensors = load_file(str(t.adapter / "adapter_model.safetensors"))
    assert cfg["num_parameters"] == sum(v.numel() for k, v in tensors.items() if k.endswith(".delta"))
    assert tensors["model.layers.0.self_attn.o_proj.cols"].dtype == torch.int64

    base = _load(t.base_dir)
    original = {n: p.clone() for n, p in base.state_dict().items()}
    adapter = load_sparse_adapter(t.adapter, base)
    fuse(base, adapter)
    merged_sd = t.merged.state_dict()
    assert all(torch.equal(p, merged_sd[n]) for n, p in base.state_dict().items())
    unfuse(base, adapter)
    assert all(torch.equal(p, original[n]) for n, p in base.state_dict().items())
    assert not hasattr(base, "_sparseft_adapter_set")

    apply_adapters(base, [t.adapter])
    assert all(torch.equal(p, merged_sd[n]) for n, p in base.state_dict().items())


def _synthetic(path, base_dir, modules: dict):
    tensors = {}
    for name, (kind, idx, delta) in modules.items():
        tensors[f"{name}.delta"] = delta
        tensors[f"{name}.{kind}"] = torch.as_tensor(idx, dtype=torch.long)
    return write_adapter(path, tensors, {"method": "s2ft", "base_model": base_dir})


def test_overlapping_adapters_add_and_unfuse_exactly(load, tmp_path):
    base = load("mistral")
    o, q = "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj"
    g = torch.Generator().manual_seed(0)
    a = _synthetic(tmp_path / "a", "x", {o: ("cols", [1, 5], torch.randn(64, 2, generator=g)),
                                         q: ("rows", [0, 3], torch.randn(2, 64, generator=g))})
    b = _synthetic(tmp_path / "b", "x", {o: ("rows", [5, 9], torch.randn(2, 64, generator=g)),
                                         q: ("rows", [3, 7], torch.randn(2, 64, generator=g))})
    A, B = load_sparse_adapter(a, base), load_sparse_adapter(b, base)
    W = {n: base.get_submodule(n).weight.detach().clone() for n in (o, q)}

    def expected(*adapters):
        out = {n: w.clone() for n, w in W.items()}
        for ad in adapters:  # in fusing order, one rounding each, as fuse does
            for n, d in ad.modules.items():
                if d.kind == "rows":
                    out[n][d.indices] = out[n][d.indices] + d.delta
                else:
                    out[n][:, d.indices] = out[n][:, d.indices] + d.delta
        return out

    def current():
        return {n: base.get_submodule(n).weight.detach() for n in (o, q)}

    fuse(base, A)
    fuse(base, B)
    assert all(torch.equal(current()[n], w) for n, w in expected(A, B).items())
    w5 = W[o][5, 1] + A.modules[o].delta[5, 0] + B.modules[o].delta[0, 1]
    torch.testing.assert_close(current()[o][5, 1], w5)  # both adapters' deltas meet at (5, 1)
    unfuse(base, A)
    assert all(torch.equal(current()[n], w) for n, w in expected(B).items())
    fuse(base, A)
    assert all(torch.equal(current()[n], w) for n, w in expected(B, A).items())
    unfuse(base, B)
    unfuse(base, A)
    assert all(torch.equal(current()[n], w) for n, w in W.items())
    with pytest.raises(UserError, match="not fused"):
        unfuse(base, A)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_per_row_fused(trained, arch, tmp_path):
    t = trained(arch)
    base = _load(t.base_dir)
    spec = arch_of(base)
    g = torch.Generator().manual_seed(3)
    other = _synthetic(tmp_path / "b", t.base_dir, {
        spec.proj_path(0, "down"): ("cols", [2, 50], 0.5 * torch.randn(64, 2, generator=g)),
        spec.proj_path(1, "k"): ("rows", list(range(spec.head_dim)), 0.5 * torch.randn(spec.head_dim, 64, generator=g)),
    })
    adapters = [load_sparse_adapter(t.adapter, base), load_sparse_adapter(other, base)]
    row_adapter = [1, -1, 0]
    expected = []
    for row, which in enumerate(row_adapter):
        if which >= 0:
            fuse(base, adapters[which])
        expected.append(logits(base, IDS)[row])
        if which >= 0:
            unfuse(base, adapters[which])
    with mixed_adapters(base, adapters, torch.tensor(row_adapter)):
        mixed = logits(base, IDS)
    torch.testing.assert_close(mixed, torch.stack(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[2], t.trained_logits[2], atol=1e-5, rtol=0)
    assert not any(m._forward_hooks for m in base.modules())  # hooks removed on exit


def _corrupt(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(str(dst / "adapter_model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "adapter_model.safetensors"))
    if edit_config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit_config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_malformed_adapters(trained, tmp_path):
    t = trained("llama")
    base = _load(t.base_dir)
    o = "model.layers.0.self_attn.o_proj"
    cases = {
        "missing": (lambda ts: ts.pop(f"{o}.cols"), None, f"{o}.delta needs exactly one of"),
        "no-delta": (lambda ts: ts.pop(f"{o}.delta"), None, f"{o}.delta is missing"),
        "shape": (lambda ts: ts.update({f"{o}.delta": torch.zeros(64, 3)}), None, f"{o}.delta has shape"),
        "range": (lambda ts: ts[f"{o}.cols"].add_(1000), None, f"{o}.cols: index"),
        "float-idx": (lambda ts: ts.update({f"{o}.cols": ts[f"{o}.cols"].float()}), None, f"{o}.cols must be"),
        "module": (lambda ts: ts.update({"model.layers.9.mlp.up_proj.delta": torch.zeros(1, 64),
                                         "model.layers.9.mlp.up_proj.rows": torch.zeros(1, dtype=torch.long)}),
                   None, "no linear layer 'model.layers.9.mlp.up_proj'"),
        "stray": (lambda ts: ts.update({"lm_head.lora_A": torch.zeros(1)}), None, "unexpected tensor"),
        "method": (None, lambda c: c.update({"method": "lora"}), "made by method 'lora'"),
    }
    for name, (et, ec, message) in cases.items():
        bad = _corrupt(t.adapter, tmp_path / name, et, ec)
        with pytest.raises(UserError, match=message) as e:
            load_sparse_adapter(bad, base)
        assert str(bad) in str(e.value), name
