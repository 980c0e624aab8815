"""Evaluation speed, before and after: the demo's multiple-choice and exact-match tasks (and a 5-shot variant of the
multiple choice, whose contexts are longer) on a tiny Llama and on a ~130M-parameter Llama built from config (random
weights: speed does not depend on them). Each task is timed the plain way (every choice read whole with its context,
rows in file order) and the way `sparseft eval` runs it (longest first; each context read once, its KV cache shared
by its choices), in one run; the log-likelihoods of the two ways are checked to agree.

    .venv/bin/python scripts/bench_eval.py                       # one line a model and task with the ratio
    .venv/bin/python scripts/bench_eval.py --repeats 1 --limit 40  # quicker
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparseft.data import pad_token_id  # noqa: E402
from sparseft.eval.choice import build_items as choice_items, score_choices  # noqa: E402
from sparseft.eval.exact_match import build_items as em_items  # noqa: E402
from sparseft.eval.tasks import load_task, validate_task  # noqa: E402
from sparseft.infer.generate import Sampling, generate  # noqa: E402
from sparseft.models.tiny import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# ~130M parameters: 12 layers, hidden 768, 12 heads (4 kv heads), FFN 2048, vocabulary 32000 (untied).
MODEL_100M = dict(hidden_size=768, num_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, model_vocab_size=32000)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_choice(model, tok, task, repeats: int) -> tuple[float, float]:
    items = choice_items(task, tok)
    groups = [(it.context, it.continuations) for it in items]
    pad = pad_token_id(tok)
    plain = score_choices(model, groups, task.batch_size, pad, share=False, longest_first=False)
    fast = score_choices(model, groups, task.batch_size, pad)
    worst = max(abs(a[0] - b[0]) for p, f in zip(plain, fast) for a, b in zip(p, f))
    assert worst < 1e-3, f"the two ways disagree by {worst}"
    before = best_of(lambda: score_choices(model, groups, task.batch_size, pad, share=False, longest_first=False),
                     repeats)
    after = best_of(lambda: score_choices(model, groups, task.batch_size, pad), repeats)
    return before, after


def bench_em(model, tok, task, repeats: int) -> tuple[float, float]:
    items = em_items(task, tok)
    g = task.generation
    sampling = Sampling(max_new_tokens=g.max_new_tokens, stop=tuple(g.stop))
    prompts = [it.prompt_ids for it in items]
    longest_first = sorted(prompts, key=len, reverse=True)
    before = best_of(lambda: generate(model, tok, prompts, sampling, batch_size=task.batch_size), repeats)
    after = best_of(lambda: generate(model, tok, longest_first, sampling, batch_size=task.batch_size), repeats)
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-100m", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="rows per task at most")
    args = parser.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    choice = load_task(REPO / "recipes/tasks/arith_choice.yaml")
    shots = validate_task({**choice.model_dump(exclude_none=True), "name": "arith_choice 5-shot", "max_length": 128,
                           "few_shot": {"path": choice.data, "n": 5, "separator": "\n"}}, "arith_choice 5-shot")
    em = load_task(REPO / "recipes/tasks/arith_em.yaml")
    choice, shots, em = (t.model_copy(update={"limit": args.limit}) for t in (choice, shots, em))
    models = {"tiny Llama": {}} | ({} if args.skip_100m else {"~130M Llama": MODEL_100M})
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in models.items():
            path = build_tiny_model(Path(tmp) / name.replace(" ", "_"), "llama", **overrides)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            tok = AutoTokenizer.from_pretrained(path)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            for task, fn in ((choice, bench_choice), (shots, bench_choice), (em, bench_em)):
                before, after = fn(model, tok, task, args.repeats)
                print(f"{name} ({params:.0f}M) {task.name}: before {before:.3f} s, after {after:.3f} s, "
                      f"{before / after:.2f}x", flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
