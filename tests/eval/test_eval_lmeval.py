"""sparseft's log-likelihoods against lm-evaluation-harness itself: its HFLM scores the same local multiple-choice
task on the same in-memory model; native multiple choice and the bridge give the same numbers. Rolling windows are
lm-eval's windows."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparseft.eval.choice import multiple_choice
from sparseft.eval.harness import make_lm
from sparseft.eval.perplexity import rolling_windows
from sparseft.eval.tasks import validate_task
from tests.eval.evallib import write_jsonl

# Contexts of several lengths (left padding in a batch), choices of one to many tokens, a context ending in a space
# (moved to the continuation by lm-eval's pair encoding), a choice that starts with a space.
ROWS = [
    {"query": "3 + 4 =", "choices": ["7", "8", "seventy seven"], "gold": 0},
    {"query": "The sum of 12 and 30 is", "choices": ["42", "forty two", " 4 2"], "gold": 1},
    {"query": "1 + 1 = ", "choices": ["2", "11"], "gold": 0},
    {"query": "Sparse fine tuning trains a few heads and channels: 9 + 9 =", "choices": ["18", "81", "1"],
     "gold": 2},
    {"query": "a", "choices": ["b", "bb b", "ab"], "gold": 0},
]


def _harness_yaml(tmp_path, data):
    path = tmp_path / "p_mc.yaml"
    path.write_text(f"""task: p_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""")
    return path


def _harness_lls(lm, yaml_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(yaml_path.parent), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["p_mc"], task_manager=manager, log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"]["p_mc"], key=lambda s: s["doc_id"])
    return [[r[0][0] for r in s["resps"]] for s in samples], out["results"]["p_mc"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_loglikelihoods_match_lm_eval(tmp_path, tiny_model_dir, arch, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    path = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    data = write_jsonl(tmp_path / "mc.jsonl", ROWS)
    yaml_path = _harness_yaml(tmp_path, data)
    reference, ref_metrics = _harness_lls(HFLM(pretrained=model, tokenizer=tok, batch_size=2), yaml_path)

    samples = []
    native = multiple_choice(model, tok, validate_task({"metric": "multiple_choice", "data": data, "batch_size": 2},
                                                       "mc"), samples=samples)
    for ours, ref in zip([s["loglikelihoods"] for s in samples], reference, strict=True):
        assert ours == pytest.approx(ref, abs=1e-5)
    assert native["acc"] == ref_metrics["acc,none"] and native["acc_norm"] == ref_metrics["acc_norm,none"]

    bridged, _ = _harness_lls(make_lm(model, tok, batch_size=3), yaml_path)
    for ours, ref in zip(bridged, reference, strict=True):
        assert ours == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("max_length,stride", [(5, 5), (5, 2), (5, 1), (8, 8), (40, 40)])
def test_rolling_windows_are_lm_evals(max_length, stride):
    from lm_eval.utils import get_rolling_token_windows

    for n in (1, 2, 5, 6, 17, 23):
        ids = list(range(100, 100 + n))
        ours = [(ids[lo:hi - 1], ids[first:hi]) for lo, first, hi in rolling_windows(n, max_length, stride)]
        ref = list(get_rolling_token_windows(ids[1:], ids[0], max_length, max_length - stride + 1))
        assert ours == ref, (n, ours, ref)
