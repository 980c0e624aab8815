"""Malformed input of every kind thrown at the real CLI: recipes (every key given a wrong value), overrides, YAML, data
rows in every form and file type, task files, adapters, hostfiles and paths. Each must end with exit code 2 and one
message naming the key, file or row, and no traceback. The test prints how many inputs it threw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sparseft.cli import app
from sparseft.recipe import explain
from tests.helpers import write_recipe

pytestmark = pytest.mark.slow
NOT_SCALAR = {"bad": {"x": 1}}
# Keys whose type admits the generic wrong value, with one that is wrong for them.
SPECIAL = {"distributed.config": "no-such-config.json", "data.fields": {"output": 7}, "model.tokenizer": "./nope",
           "train.output_dir": ["a", "b"]}


def recipe_cases(base: dict) -> list[tuple[str, dict, list[str], list[str]]]:
    """(id, recipe dict, overrides, what the message names)."""
    out = []
    for key, _, _ in explain():
        if "[" in key:  # a method key: `method.rank  [lora]`
            name, tag = key.split()[0], key.split("[")[1].rstrip("]")
            recipe = {**base, "method": {"name": tag, name.split(".", 1)[1]: NOT_SCALAR}}
            out.append((f"{tag}:{name}", recipe, [], [name]))
            continue
        recipe = json.loads(json.dumps(base))
        section, *rest = key.split(".")
        node = recipe.setdefault(section, {})
        for part in rest[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[rest[-1]] = SPECIAL.get(key, NOT_SCALAR)
        out.append((key, recipe, [], [key]))
    overrides = [
        ("train.lr=abc", "train.lr"), ("train.max_steps=-3", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.nope=1", "train.nope"), ("nope=1", "nope"), ("=3", "'=3'"), ("train.lr", "'train.lr'"),
        ("train.output_dir=${nowhere}", "nowhere"), ("train.betas=[1]", "train.betas"), ("method.name=lorra", "lorra"),
        ("method.r=8", "method.r"), ("data.format=tsv", "data.format"),
        ("train.on_nonfinite=maybe", "train.on_nonfinite"),
        ("train.max_skipped_steps=0", "train.max_skipped_steps"), ("model.dtype=float8", "model.dtype"),
        ("train.schedule=exp", "train.schedule"), ("data.max_length=0", "data.max_length"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"), ("train.save_every=-1", "train.save_every"),
        ("data.val_fraction=1", "data.val_fraction"), ("train.lr=[1,2]", "train.lr"), ("model={a: 1}", "model"),
        ("train.micro_batch_size=0", "train.micro_batch_size"), ("train.optimizer=adam", "train.optimizer"),
        ("data.train.path=x.txt", "data.train.path"), ("model.path=./no-such-model", "model.path"),
    ]
    out += [(f"override {o}", base, [o], [needle]) for o, needle in overrides]
    return out


YAML_TEXTS = [
    ("unclosed", "model: [unclosed\n"), ("a list", "- a\n- b\n"), ("a scalar", "42\n"), ("empty", ""),
    ("tab indent", "model:\n\tpath: x\n"), ("binary", "\x00\x01\x02"), ("bad alias", "model: *nope\n"),
    ("only comments", "# nothing\n"), ("missing sections", "model: {path: x}\n"), ("null method", "method: null\n"),
]

INSTR = {"instruction": "Add.", "input": "3 4", "output": "7"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
GOOD = {"text": {"text": "one two"}, "instruction": INSTR, "chat": CHAT,
        "completion": {"prompt": "1 + 1 =", "completion": " 2"}}
FIELDS = {"text": ["text"], "instruction": ["instruction", "output"], "chat": ["messages"],
          "completion": ["prompt", "completion"]}
WRONG = [7, None, ["a"], {"a": 1}, True]


def data_cases() -> list[tuple[str, str, str, object, list[str]]]:
    """(id, form, file name, rows (list) or raw text, what the message names)."""
    out = []
    for form, good in GOOD.items():
        for field in FIELDS[form]:
            missing = {k: v for k, v in good.items() if k != field}
            out.append((f"{form}: no {field}", form, "t.jsonl", [good, missing], ["row 2", field]))
            for value in WRONG:
                out.append((f"{form}: {field}={value!r}", form, "t.jsonl", [good, good, {**good, field: value}],
                            ["row 3", field]))
        out.append((f"{form}: row not an object", form, "t.jsonl", json.dumps(good) + "\n[1, 2]\n", ["row 2"]))
        out.append((f"{form}: torn json line", form, "t.jsonl", json.dumps(good) + '\n{"te', ["line 2"]))
        out.append((f"{form}: json not a list", form, "t.json", json.dumps(good), ["t.json"]))
        out.append((f"{form}: empty file", form, "t.jsonl", "", ["t.jsonl", "empty"]))
        out.append((f"{form}: not parquet", form, "t.parquet", "nope", ["t.parquet"]))
    chat_bad = [
        [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}], [{"role": "user", "content": "x"}],
        ["hi"], [], [{"role": "assistant"}], [{"content": "x"}, {"role": "assistant", "content": "y"}],
    ]
    out += [(f"chat: messages {m!r}", "chat", "t.jsonl", [CHAT, {"messages": m}], ["row 2"]) for m in chat_bad]
    out.append(("csv: missing column", "completion", "t.csv", "prompt,answer\na,b\n", ["row 1", "completion"]))
    out.append(("csv: chat", "chat", "t.csv", "messages\n[]\n", ["row 1", "messages"]))
    out.append(("not utf-8", "text", "t.jsonl", b'{"text": "caf\xe9"}\n', ["UTF-8"]))
    out.append(("unknown suffix", "text", "t.txt", "hello\n", ["t.txt"]))
    return out


TASKS = [
    ("no metric", {"data": "d.jsonl"}, ["metric"]), ("unknown metric", {"metric": "bleu", "data": "d.jsonl"}, ["bleu"]),
    ("unknown key", {"metric": "perplexity", "data": "d.jsonl", "colour": "red"}, ["colour"]),
    ("no data", {"metric": "exact_match"}, ["data"]),
    ("bad form", {"metric": "perplexity", "data": "d.jsonl", "form": "essay"}, ["form"]),
    ("bad max_length", {"metric": "perplexity", "data": "d.jsonl", "max_length": -1}, ["max_length"]),
    ("bad batch_size", {"metric": "perplexity", "data": "d.jsonl", "batch_size": "big"}, ["batch_size"]),
    ("bad generation", {"metric": "exact_match", "data": "d.jsonl", "generation": {"max_new_tokens": 0}},
     ["max_new_tokens"]),
    ("bad answer", {"metric": "exact_match", "data": "d.jsonl", "answer": "vibes"}, ["answer"]),
    ("choices not a list", {"metric": "multiple_choice", "data": "d.jsonl", "choices": 3}, ["choices"]),
    ("data a list", {"metric": "perplexity", "data": [1]}, ["data"]),
]

HOSTFILES = [
    ("no slots", "worker-1\n", ["hosts:1"]), ("slots zero", "worker-1 slots=0\n", ["hosts:1"]),
    ("slots word", "worker-1 slots=many\n", ["hosts:1"]), ("three fields", "a slots=1 b\n", ["hosts:1"]),
    ("twice", "a slots=1\na slots=2\n", ["hosts:2", "twice"]), ("empty", "", ["lists no host"]),
    ("comments only", "# a\n\n", ["lists no host"]), ("negative", "a slots=-1\n", ["hosts:1"]),
    ("colon form", "a:2\n", ["hosts:1"]),
]


def _run(args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_fuzz_the_cli(tmp_path, tiny_model_dir, capsys):
    model = tiny_model_dir("llama")
    base_path = write_recipe(tmp_path, model, data={"validation": None}, train={"max_steps": 1})
    base = yaml.safe_load(base_path.read_text())
    cases: list[tuple[str, list, list[str]]] = []  # (id, CLI args, what the message names)

    for i, (cid, recipe, overrides, needles) in enumerate(recipe_cases(base)):
        path = tmp_path / f"r{i}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        cases.append((f"recipe {cid}", ["validate", path, *overrides], needles))
    for i, (cid, text) in enumerate(YAML_TEXTS):
        path = tmp_path / f"y{i}.yaml"
        path.write_text(text)
        cases.append((f"yaml {cid}", ["validate", path], [str(path)]))
    for i, (cid, form, name, rows, needles) in enumerate(data_cases()):
        d = tmp_path / f"d{i}"
        d.mkdir()
        f = d / name
        if isinstance(rows, list):
            _write_rows(f, rows)
        else:
            f.write_bytes(rows if isinstance(rows, bytes) else rows.encode())
        recipe = {**base, "data": {"train": {"path": str(f)}, "format": form, "max_length": 16},
                  "train": {**base["train"], "output_dir": str(d / "run")}}
        (d / "r.yaml").write_text(yaml.safe_dump(recipe))
        cases.append((f"data {cid}", ["train", d / "r.yaml"], [str(f), *needles]))
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD["completion"]) + "\n")
    for i, (cid, task, needles) in enumerate(TASKS):
        path = tmp_path / f"task{i}.yaml"
        path.write_text(yaml.safe_dump(task))
        cases.append((f"task {cid}", ["eval", model, "--task", path], [str(path), *needles]))
    for i, (cid, text, needles) in enumerate(HOSTFILES):
        path = tmp_path / f"hosts{i}"
        path.write_text(text)
        needles = [n.replace("hosts:", f"{path}:") for n in needles]
        cases.append((f"hostfile {cid}", ["train", base_path, "--hostfile", path], needles))
    cases += adapter_cases(tmp_path, model) + path_cases(tmp_path, model, base_path)

    failures = []
    for cid, args, needles in cases:
        result = _run(args)
        problem = _check(result, needles)
        if problem:
            failures.append(f"{cid}: {problem}")
    with capsys.disabled():
        print(f"\nfuzz: {len(cases)} malformed inputs, {len(cases) - len(failures)} gave exit 2 with one message")
    assert len(cases) >= 150
    assert not failures, "\n".join(failures)


def _write_rows(path: Path, rows: list) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))


def _check(result, needles: list[str]) -> str | None:
    out = result.output
    if result.exit_code != 2:
        return f"exit {result.exit_code}: {out[-600:]!r} {result.exception!r}"
    if "Traceback" in out:
        return "a traceback"
    if out.count("error:") != 1:
        return f"{out.count('error:')} messages: {out[-600:]!r}"
    missing = [n for n in needles if n not in out]
    return f"does not name {missing}: {out[-600:]!r}" if missing else None


def adapter_cases(tmp: Path, model: str) -> list:
    cases = []
    config = {"method": "s2ft", "format_version": 1, "base_model": model}
    variants = {
        "missing dir": None, "empty dir": {}, "config not json": {"adapter_config.json": "{nope"},
        "config a list": {"adapter_config.json": "[1]"},
        "no method": {"adapter_config.json": json.dumps({"format_version": 1})},
        "unknown method": {"adapter_config.json": json.dumps({"method": "magic", "format_version": 1})},
        "no weights": {"adapter_config.json": json.dumps(config)},
        "corrupt weights": {"adapter_config.json": json.dumps(config), "adapter_model.safetensors": "garbage"},
        "future format": {"adapter_config.json": json.dumps({**config, "format_version": 99})},
    }
    for i, (cid, files) in enumerate(variants.items()):
        d = tmp / f"adapter{i}"
        if files is not None:
            d.mkdir()
            for name, text in files.items():
                (d / name).write_text(text)
        cases.append((f"adapter {cid} (generate)", ["generate", model, "--adapter", d, "--prompt", "hi"], [str(d)]))
        cases.append((f"adapter {cid} (apply)", ["adapter", "apply", model, "--adapter", d, "--out", tmp / f"o{i}"],
                      [str(d)]))
    return cases


def path_cases(tmp: Path, model: str, recipe: Path) -> list:
    f = tmp / "plain-file"
    f.write_text("x")
    (tmp / "a-dir").mkdir()
    return [
        ("train: no recipe", ["train", tmp / "none.yaml"], ["none.yaml"]),
        ("train: recipe is a dir", ["train", tmp / "a-dir"], ["a-dir"]),
        ("validate: no recipe", ["validate", tmp / "none.yaml"], ["none.yaml"]),
        ("train: resume nothing", ["train", recipe, "--resume"], ["train.output_dir"]),
        ("train: output under a file", ["train", recipe, f"train.output_dir={f}/run"], [str(f)]),
        ("train: output is a file", ["train", recipe, f"train.output_dir={f}"], [str(f)]),
        ("export: no run", ["export", tmp / "none", "--merged", tmp / "m"], ["none"]),
        ("export: not a run", ["export", tmp / "a-dir", "--merged", tmp / "m"], ["a-dir"]),
        ("export: nothing asked", ["export", tmp / "a-dir"], ["--merged"]),
        ("eval: no model", ["eval", tmp / "none", "--data", tmp / "d.jsonl"], ["none"]),
        ("eval: model is a file", ["eval", f, "--data", tmp / "d.jsonl"], [str(f)]),
        ("eval: no data", ["eval", model, "--data", tmp / "none.jsonl"], ["none.jsonl"]),
        ("eval: no task", ["eval", model, "--task", tmp / "none.yaml"], ["none.yaml"]),
        ("eval: bad form", ["eval", model, "--data", tmp / "d.jsonl", "--form", "essay"], ["--form"]),
        ("eval: bad gate", ["eval", model, "--data", tmp / "d.jsonl", "--fail-under", "x"], ["--fail-under"]),
        ("eval: json under a file", ["eval", model, "--data", tmp / "d.jsonl", "--form", "completion", "--json",
                                     f / "out.json"], [str(f)]),
        ("eval: samples under a file", ["eval", model, "--data", tmp / "d.jsonl", "--form", "completion", "--samples",
                                        f / "s.jsonl"], [str(f)]),
        ("export: out under a file", ["export", tmp / "a-dir", "--merged", f / "m"], [str(f)]),
        ("generate: no prompts file", ["generate", model, "--prompts", tmp / "none.jsonl"], ["none.jsonl"]),
        ("generate: nothing", ["generate", model], ["--prompt"]),
        ("generate: out under a file", ["generate", model, "--prompt", "hi", "--out", f / "o.txt"], [str(f)]),
        ("recipes cp: unknown", ["recipes", "cp", "nope", tmp], ["nope"]),
        ("recipes cp: under a file", ["recipes", "cp", "s2ft", f / "x.yaml"], [str(f)]),
        ("hostfile: missing", ["train", recipe, "--hostfile", tmp / "none"], ["none"]),
        ("nproc zero", ["train", recipe, "--nproc", "0"], ["--nproc"]),
        ("bench: unknown method", ["bench", recipe, "--methods", "magic"], ["magic"]),
        ("adapter apply: no base", ["adapter", "apply", tmp / "none", "--adapter", tmp, "--out", tmp / "o", "--dtype",
                                    "float32"], ["none"]),
    ]
