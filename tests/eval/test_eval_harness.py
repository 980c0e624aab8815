"""The lm-evaluation-harness bridge on local task files (skipped when lm-eval is not installed): the harness, driving
sparseft's in-memory model with an adapter, agrees with sparseft's own exact match and multiple choice."""

from __future__ import annotations

import pytest

from sparseft.eval.runner import evaluate
from sparseft.eval.tasks import load_task

pytest.importorskip("lm_eval")


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_harness_local_tasks_match_sparseft_metrics(tmp_path, s2ft_pair, arith_tasks, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    em = load_task(arith_tasks.em)
    mc = load_task(arith_tasks.mc)
    gen = _write(tmp_path / "gen.yaml", f"""task: h_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {arith_tasks.data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
generation_kwargs: {{until: ["</s>"], max_gen_toks: {em.generation.max_new_tokens}}}
filter_list:
  - name: strip
    filter: [{{function: regex, regex_pattern: "^\\\\s*(.*?)\\\\s*$"}}, {{function: take_first}}]
metric_list: [{{metric: exact_match}}]
""")
    choice = _write(tmp_path / "mc.yaml", f"""task: h_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {mc.data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list: [{{metric: acc}}]
""")
    results = evaluate(s2ft_pair.base, [em, mc.model_copy(update={"normalize": "none"})],
                       adapters=s2ft_pair.adapters[:1], harness_tasks=[gen, choice])
    by_task = {r.task: r.metrics for r in results}
    assert by_task["h_mc"]["n"] == by_task["mc"]["n"] == 12
    assert by_task["h_mc"]["acc"] == pytest.approx(by_task["mc"]["accuracy"])
    assert by_task["h_gen"]["exact_match:strip"] == pytest.approx(by_task["em"]["exact_match"])
