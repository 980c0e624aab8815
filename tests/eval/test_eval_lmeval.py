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
from tests.eval.evallib import harness_mc_yaml, write_jsonl

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


# No delimiter: the choice glues onto the query's last word, so tokenising the pair together and splitting it gives
# other tokens than tokenising the choice alone.
GLUED = [
    {"query": "Sparse fine tun", "choices": ["ing trains heads", "e the model now"], "gold": 0},
    {"query": "The model learn", "choices": ["s the sums", "ed to add them"], "gold": 1},
]
TASKS = {"p_mc": (ROWS, " "), "p_glued": (GLUED, "")}


def _harness_lls(lm, folder):
    """{task: (per row, the log-likelihood of each choice), results} from lm-eval on the task files in `folder`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager, log_samples=True,
                                  bootstrap_iters=0)
    return {task: ([[r[0][0] for r in s["resps"]] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])],
                   out["results"][task]) for task in TASKS}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_loglikelihoods_match_lm_eval(tmp_path, tiny_model_dir, arch, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    path = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    data = {}
    for task, (rows, delimiter) in TASKS.items():
        data[task] = write_jsonl(tmp_path / f"{task}.jsonl", rows)
        harness_mc_yaml(tmp_path / f"{task}.yaml", data[task], delimiter)
    reference = _harness_lls(HFLM(pretrained=model, tokenizer=tok, batch_size=2), tmp_path)
    bridged = _harness_lls(make_lm(model, tok, batch_size=3), tmp_path)
    for task, (rows, delimiter) in TASKS.items():
        ref_lls, ref_metrics = reference[task]
        samples = []
        spec = {"metric": "multiple_choice", "data": data[task], "delimiter": delimiter, "batch_size": 2}
        native = multiple_choice(model, tok, validate_task(spec, task), samples=samples)
        for ours, bridge, ref in zip([s["loglikelihoods"] for s in samples], bridged[task][0], ref_lls, strict=True):
            assert ours == pytest.approx(ref, abs=1e-5) and bridge == pytest.approx(ref, abs=1e-5)
        assert native["acc"] == ref_metrics["acc,none"] and native["acc_norm"] == ref_metrics["acc_norm,none"]


@pytest.mark.parametrize("max_length,stride", [(5, 5), (5, 2), (5, 1), (8, 8), (40, 40)])
def test_rolling_windows_are_lm_evals(max_length, stride):
    from lm_eval.utils import get_rolling_token_windows

    for n in (1, 2, 5, 6, 17, 23):
        ids = list(range(100, 100 + n))
        ours = [(ids[lo:hi - 1], ids[first:hi]) for lo, first, hi in rolling_windows(n, max_length, stride)]
        ref = list(get_rolling_token_windows(ids[1:], ids[0], max_length, max_length - stride + 1))
        assert ours == ref, (n, ours, ref)
