"""lm-evaluation-harness bridge: the in-memory model (with any adapter in effect) as a harness LM.

    pip install 'sparseft[harness]'
    sparseft eval runs/s2ft --harness-task hellaswag                       # a harness task (downloads its data)
    sparseft eval base/ --adapter a/ --harness-task my_tasks/arith.yaml    # a task YAML of your own, local data

A YAML path is loaded from its directory (lm-eval's `include_path`) and run by the `task:` name inside it. Requests
are tokenised as lm-eval's HFLM tokenises them (sparseft's native multiple choice does the same, see choice.py):
BOS where the tokenizer adds one, context and continuation together then split, an empty context replaced by BOS
(else EOS). Log-likelihoods share each context's forward across its continuations; rolling log-likelihoods use
disjoint windows of the model's context length (perplexity.py). Results come back as {metric: value} with
`<metric>_stderr` beside each, the harness's filter appended after a colon when it is not "none"
(`exact_match:strict-match`), and `n` (rows scored).
"""

from __future__ import annotations

from dataclasses import dataclass
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


def make_lm(model: Any, tokenizer: Any, batch_size: int = 8, max_length: int | None = None):
    """A harness `LM` scoring with `model` as it is now (fused or PEFT-wrapped adapters included). `max_length`
    defaults to the model's context length, read from its config as lm-eval's HFLM reads it."""
    from lm_eval.api.model import LM
    from lm_eval.models.utils import resolve_max_length

    from sparseft.data import pad_token_id
    from sparseft.data.example import tokenize
    from sparseft.eval.choice import encode_pair, fit, score_choices, text_ids
    from sparseft.eval.perplexity import Document, document_nll
    from sparseft.infer.generate import Sampling, generate

    if max_length is None:
        max_length = resolve_max_length(getattr(model, "config", None), tokenizer)
    pad = pad_token_id(tokenizer)
    # What an empty context starts from, and the first token of every rolling document: BOS, else EOS (lm-eval's).
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    class SparseftLM(LM):
        max_length: int
        batch_size: int

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # context -> [(request, continuation)]
            for i, r in enumerate(requests):
                context, cont = r.args[0], r.args[1]
                ctx_ids, cont_ids = ([prefix], tokenize(tokenizer, cont)) if context == "" \
                    else encode_pair(tokenizer, context, cont)
                groups.setdefault(tuple(ctx_ids), []).append((i, cont_ids))
            keys = list(groups)
            scored = score_choices(model, [(fit(list(k), [c for _, c in groups[k]], max_length),
                                            [c for _, c in groups[k]]) for k in keys], batch_size, pad)
            out: list = [None] * len(requests)
            for k, results in zip(keys, scored):
                for (i, _), result in zip(groups[k], results):
                    out[i] = result
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            docs = [Document(ids, ids, 0, 0) for ids in ([prefix] + tokenize(tokenizer, r.args[0]) for r in requests)]
            nll, _ = document_nll(model, docs, max_length, None, batch_size, pad)
            return [-float(x) for x in nll]

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            # Every request may carry its own settings: requests with the same ones share batches, longest first.
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
                prompts.append((text_ids(tokenizer, context) if context else [prefix])[-max_length:])
            texts = [""] * len(requests)
            for sampling, rows in by_settings.items():
                rows = sorted(rows, key=lambda i: -len(prompts[i]))
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

    lm = SparseftLM()
    lm.max_length, lm.batch_size = max_length, batch_size
    return lm


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
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue  # "N/A" where the harness computed no standard error
        if metric == "sample_len":  # the number of rows scored
            out["n"] = int(value)
            continue
        out[metric if filt in ("", "none") else f"{metric}:{filt}"] = float(value)
    return out


@dataclass(frozen=True)
class HarnessOptions:
    """What `sparseft eval` passes through to lm-eval's `simple_evaluate`."""

    batch_size: int = 8
    limit: int | None = None  # rows per task at most
    num_fewshot: int | None = None  # None: each task's own
    apply_chat_template: bool = False
    bootstrap_iters: int = 1000  # standard errors of bootstrapped metrics (perplexities); 0 leaves them out


def run_harness(model: Any, tokenizer: Any, items: Sequence[str],
                options: HarnessOptions = HarnessOptions()) -> list[tuple[str, dict[str, float]]]:
    """Run harness tasks (names or YAML paths) on the in-memory model: [(task, metrics)] in the harness's order."""
    require_harness()
    import lm_eval
    from lm_eval.tasks import TaskManager

    names, include = _task_names(items)
    # lm-eval's own thousands of task files take ~40 s to index on a small machine: only when a task is named.
    manager = TaskManager(include_path=include or None, include_defaults=len(include) < len(items))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"--harness-task {unknown[0]}: not a harness task (`lm-eval ls tasks` lists them; a task "
                        "of your own is given as the path of its YAML file)")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        out = lm_eval.simple_evaluate(model=make_lm(model, tokenizer, options.batch_size), tasks=names,
                                      task_manager=manager, limit=options.limit, num_fewshot=options.num_fewshot,
                                      apply_chat_template=options.apply_chat_template,
                                      bootstrap_iters=options.bootstrap_iters, log_samples=False)
    except (ConnectionError, FileNotFoundError) as e:  # a data set it could not fetch or find
        raise UserError(f"--harness-task {', '.join(items)}: the harness could not load a data set: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (named tasks download theirs from "
                        "the Hugging Face hub; offline, write a task YAML whose data files are local)") from None
    finally:
        model.train(was_training)
    return [(task, _metrics(res)) for task, res in (out or {}).get("results", {}).items()]
