"""`export --merged OUT --format compressed-tensors`: bitmask for unstructured SquareHead, sparse-24 for 2:4; the
files decompress to exactly the dense export's weights, with compressed-tensors' bit unpacking and with
compressed-tensors 0.14's own decompressor (the last release that shipped the sparse compressors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sparseft.cli import app
from sparseft.export.compressed import load_compressed_state
from tests.helpers import cli, write_recipe

LEGACY = Path(sys.prefix) / "ct-legacy"  # compressed-tensors 0.14, installed beside the venv by the Makefile

REFERENCE = """
import json, sys, torch
from compressed_tensors import ModelCompressor
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
for out in sys.argv[1:]:
    compressor = ModelCompressor.from_pretrained(out)
    config = AutoConfig.from_pretrained(out)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    compressor.decompress(out, model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out + "/reference.safetensors")
    print(json.dumps({"format": compressor.sparsity_config.format}))
"""

CASES = [("llama", {"sparsity": 0.6}, "sparse-bitmask"), ("qwen3", {"pattern": "2:4"}, "sparse-24-bitmask")]


@pytest.mark.slow
def test_compressed_export_gives_the_same_weights(tmp_path, tiny_model_dir):
    exports = []
    for arch, method, fmt in CASES:
        work = tmp_path / arch
        work.mkdir()
        recipe = write_recipe(work, tiny_model_dir(arch), {"name": "squarehead", "pruner": "magnitude", **method},
                              train={"max_steps": 1})
        cli("train", recipe)
        cli("export", work / "run", "--merged", work / "dense")
        cli("export", work / "run", "--merged", work / "ct", "--format", "compressed-tensors")
        dense_dir, ct_dir = work / "dense", work / "ct"
        dense = load_file(str(dense_dir / "model.safetensors"))
        cfg = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
        assert cfg["quant_method"] == "compressed-tensors" and cfg["sparsity_config"]["format"] == fmt
        targets = cfg["sparsity_config"]["targets"]
        assert targets and all(".layers." in t for t in targets)
        raw = load_file(str(ct_dir / "model.safetensors"))
        assert not any(k.endswith(".weight") and k[: -len(".weight")] in targets for k in raw)
        ours = load_compressed_state(ct_dir)
        assert ours.keys() == dense.keys()
        for k in dense:
            assert torch.equal(ours[k], dense[k]), k
        desc = json.loads((ct_dir / "sparseft_export.json").read_text())["weights"]
        assert desc["weights_bytes"] < 0.9 * (dense_dir / "model.safetensors").stat().st_size
        assert (ct_dir / "tokenizer.json").is_file() and (ct_dir / "sparsity.json").is_file()
        exports.append((ct_dir, dense, fmt))

    if not LEGACY.is_dir():
        pytest.skip(f"{LEGACY}: compressed-tensors 0.14 not installed (make install puts it there)")
    env = {**os.environ, "PYTHONPATH": str(LEGACY)}
    proc = subprocess.run([sys.executable, "-c", REFERENCE, *(str(d) for d, _, _ in exports)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    formats = [json.loads(line)["format"] for line in proc.stdout.splitlines() if line.startswith("{")]
    assert formats == [fmt for _, _, fmt in exports]
    for ct_dir, dense, _ in exports:
        ref = load_file(str(ct_dir / "reference.safetensors"))
        for k in dense:  # every tensor; a tied head is the embedding there
            assert torch.equal(ref[k], dense[k]), k


def test_nothing_sparse_is_refused(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir("llama"), train={"max_steps": 1})
    cli("train", recipe)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--merged", str(tmp_path / "out"),
                                      "--format", "compressed-tensors"])
    assert result.exit_code == 2, result.output
    assert "nothing to compress" in result.output and not (tmp_path / "out").exists()
