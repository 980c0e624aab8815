"""lm-evaluation-harness bridge: the in-memory model (with any adapter in effect) as a harness LM.

    pip install 'sparseft[harness]'
    sparseft eval runs/s2ft --harness-task hellaswag                       # a harness task (downloads its data)
    sparseft eval base/ --adapter a/ --harness-task my_tasks/arith.yaml    # a task YAML of your own, local data

A YAML path is loaded from its directory (lm-eval's `include_path`) and run by the `task:` name inside it. Requests
are tokenised as sparseft tokenises training data: BOS where the tokenizer adds one, context and continuation each
on its own. Results come back as {metric: value}, the harness's filter appended after a colon when it is not "none"
(`exact_match:strict-match`), and `n` (rows scored); standard errors are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from sparseft.errors import UserError

INSTALL_HINT = "pip install 'sparseft[harness]' (or pip install lm-eval)"


def require_harness() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"--harness-task needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}") \
            from None


def make_lm(model: Any, tokenizer: Any, batch_size: int = 8, max_length: int = 2048):
    """A harness `LM` scoring with `model` as it is now (fused or PEFT-wrapped adapters included)."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from sparseft.data import pad_token_id
    from sparseft.data.example import bos_ids, tokenize
    from sparseft.eval.choice import continuation_logprobs
    from sparseft.infer.generate import Sampling, generate

    class SparseftLM(LM):
        def __init__(self):
            super().__init__()
            self.prefix = bos_ids(tokenizer) or [tokenizer.eos_token_id]  # what an empty context starts from

        def _context(self, text: str) -> list[int]:
            return bos_ids(tokenizer) + tokenize(tokenizer, text) if text else list(self.prefix)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = []
            for r in requests:
                context, cont = r.args[0], r.args[1]
                cont_ids = tokenize(tokenizer, cont)
                ctx_ids = self._context(context)[-(max_length - len(cont_ids)):]
                pairs.append((ctx_ids, cont_ids))
            return continuation_logprobs(model, pairs, batch_size, pad_token_id(tokenizer))

        def loglikelihood_rolling(self, requests) -> list[float]:
            out = []
            for r in requests:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    tokenize(tokenizer, r.args[0]), self.prefix[0], max_length, 1)]
                out.append(sum(s for s, _ in continuation_logprobs(model, windows, batch_size,
                                                                   pad_token_id(tokenizer))))
            return out

        def generate_until(self, requests) -> list[str]:
            # Every request may carry its own settings: requests with the same ones share batches.
            by_settings: dict[Sampling, list[int]] = {}
            prompts = []
            for i, r in enumerate(requests):
                context, kw = r.args[0], dict(r.args[1] or {})
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                sampling = Sampling(max_new_tokens=int(kw.get("max_gen_toks", 256)),
                                    temperature=float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0,
                                    top_p=float(kw.get("top_p") or 1.0), stop=tuple(until))
                by_settings.setdefault(sampling, []).append(i)
                prompts.append(self._context(context)[-max_length:])
            texts = [""] * len(requests)
            for sampling, rows in by_settings.items():
                done = generate(model, tokenizer, [prompts[i] for i in rows], sampling, batch_size=batch_size)
                for i, g in zip(rows, done):
                    texts[i] = g.text
            return texts

        @property
        def tokenizer_name(self) -> str:
            return getattr(tokenizer, "name_or_path", "sparseft").replace("/", "__")

        def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
            return tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)

    return SparseftLM()


def _task_names(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """(task names, include paths): a YAML file contributes its directory and its `task:` name."""
    import yaml

    names, include = [], []
    for item in items:
        p = Path(item)
        if p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise UserError(f"--harness-task {item}: no such file")

            class _Loose(yaml.SafeLoader):  # harness YAML uses tags such as !function; only `task` is read here
                pass

            _Loose.add_multi_constructor("", lambda loader, suffix, node: None)
            try:
                spec = yaml.load(p.read_text(), Loader=_Loose)
            except yaml.YAMLError as e:
                raise UserError(f"--harness-task {item}: not valid YAML: {e}") from None
            if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
                raise UserError(f"--harness-task {item}: a harness task YAML needs a `task:` name")
            names.append(spec["task"])
            if str(p.resolve().parent) not in include:
                include.append(str(p.resolve().parent))
        else:
            names.append(item)
    return names, include


def _metrics(task_result: dict) -> dict[str, float]:
    out = {}
    for key, value in task_result.items():
        metric, _, filt = key.partition(",")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or metric.endswith("_stderr"):
            continue
        if metric == "sample_len":  # the number of rows scored
            out["n"] = int(value)
            continue
        out[metric if filt in ("", "none") else f"{metric}:{filt}"] = float(value)
    return out


def run_harness(model: Any, tokenizer: Any, items: Sequence[str], batch_size: int = 8,
                limit: int | None = None) -> list[tuple[str, dict[str, float]]]:
    """Run harness tasks (names or YAML paths) on the in-memory model: [(task, metrics)] in the harness's order."""
    require_harness()
    import lm_eval
    from lm_eval.tasks import TaskManager

    names, include = _task_names(items)
    manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"--harness-task {unknown[0]}: not a harness task (`lm-eval ls tasks` lists them; a task "
                        "of your own is given as the path of its YAML file)")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        out = lm_eval.simple_evaluate(model=make_lm(model, tokenizer, batch_size), tasks=names, task_manager=manager,
                                      limit=limit, bootstrap_iters=0, log_samples=False)
    except (ConnectionError, FileNotFoundError) as e:  # a data set it could not fetch or find
        raise UserError(f"--harness-task {', '.join(items)}: the harness could not load a data set: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (named tasks download theirs from "
                        "the Hugging Face hub; offline, write a task YAML whose data files are local)") from None
    finally:
        model.train(was_training)
    return [(task, _metrics(res)) for task, res in (out or {}).get("results", {}).items()]
