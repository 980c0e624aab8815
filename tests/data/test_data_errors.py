"""Malformed data: every problem is a UserError naming the key and file, and the row and field where there is one."""

from __future__ import annotations

import copy

import pytest

from sparseft.data import build_datasets, load_examples
from sparseft.errors import UserError
from sparseft.recipe import DataFile, DataSection

INSTR = {"instruction": "Add the numbers.", "input": "3 4", "output": "7"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _chat(*messages):
    return {"messages": list(messages)}


# (case id, train file name, its rows (a list) or raw text (a str), data section options, fragments of the message);
# "{path}" in a fragment is the train file's path.
CASES = [
    ("bad-json-line", "t.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c\n', {},
     ["data.train.path={path} line 3: not valid JSON"]),
    ("row-not-an-object", "t.jsonl", '{"text": "a"}\n["b"]\n', {},
     ["data.train.path={path} row 2: expected a JSON object"]),
    ("missing-field", "t.jsonl", [INSTR, {"instruction": "x"}], {"format": "instruction"},
     ["data.train.path={path} row 2: field 'output' is missing", "'instruction'"]),
    ("missing-renamed-column", "t.jsonl", [INSTR], {"format": "instruction", "fields": {"output": "answer"}},
     ["{path} row 1: column 'answer' (field 'output', renamed in data.fields) is missing"]),
    ("csv-missing-column", "t.csv", [{"prompt": "a", "answer": "b"}], {"format": "completion"},
     ["data.train.path={path} row 1: field 'completion' is missing; the row has 'prompt', 'answer'"]),
    ("wrong-type", "t.jsonl", [INSTR, dict(INSTR, output=7)], {"format": "instruction"},
     ["{path} row 2: field 'output' must be text, got int 7"]),
    ("null-in-parquet", "t.parquet", [INSTR, dict(INSTR, instruction=None)], {"format": "instruction"},
     ["{path} row 2: field 'instruction' must be text, got null"]),
    ("text-not-text", "t.json", [{"text": ["a"]}], {}, ["{path} row 1: field 'text' must be text, got list"]),
    ("unknown-role", "t.jsonl", [CHAT, _chat({"role": "user", "content": "a"}, {"role": "bot", "content": "b"})],
     {"format": "chat"}, ["{path} row 2: field 'messages' message 2: unknown role 'bot'"]),
    ("messages-not-a-list", "t.jsonl", [{"messages": {"role": "user"}}], {"format": "chat"},
     ["{path} row 1: field 'messages' must be a list of {role, content} objects, got dict"]),
    ("message-not-an-object", "t.jsonl", [_chat("hi")], {"format": "chat"},
     ["{path} row 1: field 'messages' message 1 must be a {role, content} object, got str"]),
    ("content-missing", "t.jsonl", [_chat({"role": "user"})], {"format": "chat"},
     ["{path} row 1: field 'messages' message 1: 'content' must be text, got nothing"]),
    ("no-assistant-turn", "t.jsonl", [CHAT, CHAT, _chat({"role": "user", "content": "hi"})], {"format": "chat"},
     ["{path} row 3: field 'messages' has no assistant message"]),
    ("chat-in-csv", "t.csv", [{"messages": "[]"}], {"format": "chat"},
     ["{path} row 1: field 'messages' must be a list", "keep chat data in .jsonl"]),
    ("missing-file", "absent.jsonl", None, {}, ["data.train.path={path}: no such file"]),
    ("unknown-extension", "t.txt", "hello\n", {}, ["data.train.path={path}: unknown file type '.txt'", ".parquet"]),
    ("empty-file", "t.jsonl", "", {}, ["data.train.path={path}: the file is empty"]),
    ("only-blank-lines", "t.jsonl", "\n\n", {}, ["data.train.path={path}: the file has no rows"]),
    ("csv-header-only", "t.csv", "text\n", {}, ["data.train.path={path}: the file has no rows"]),
    ("json-not-a-list", "t.json", '{"text": "a"}', {}, ["data.train.path={path}: expected a list of objects"]),
    ("json-invalid", "t.json", '[{"text": "a"},', {}, ["data.train.path={path}: not valid JSON"]),
    ("not-parquet", "t.parquet", "not parquet at all", {}, ["data.train.path={path}: could not read as parquet"]),
    ("not-utf8", "t.jsonl", b'{"text": "caf\xe9"}\n', {}, ["data.train.path={path}: not UTF-8 text"]),
    ("both-validation-keys", "t.jsonl", [{"text": "a"}] * 4, {"val_fraction": 0.25, "validation": "v.jsonl"},
     ["data.validation.path=v.jsonl and data.val_fraction=0.25 are both set"]),
    ("val-fraction-leaves-nothing", "t.jsonl", [{"text": "a"}], {"val_fraction": 0.5},
     ["data.val_fraction=0.5: holds out 1 of the 1 rows of data.train.path={path}"]),
    ("unknown-renamed-field", "t.jsonl", [INSTR], {"format": "instruction", "fields": {"outptu": "answer"}},
     ["data.fields.outptu: not a field of the instruction form", "output"]),
    ("bad-prompt-template", "t.jsonl", [INSTR], {"format": "instruction", "prompt_template": "{instruction} {x}"},
     ["data.prompt_template: unknown placeholder(s) 'x'"]),
    ("nothing-left-after-truncation", "t.jsonl", [INSTR], {"format": "instruction", "max_length": 4},
     ["data.train.path={path}: none of its 1 rows has a loss token left after truncation to 4 tokens"]),
]


@pytest.mark.parametrize("name, content, options, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_data_is_a_user_error(tmp_path, write, tok, name, content, options, fragments):
    path = tmp_path / name
    if isinstance(content, list):
        write(name, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    if "validation" in options:
        options = dict(options, validation=DataFile(path=options["validation"]))
    cfg = DataSection(train=DataFile(path=str(path)), **options)
    with pytest.raises(UserError) as err:
        build_datasets(cfg, tok, seed=0)
    for fragment in fragments:
        assert fragment.replace("{path}", str(path)) in str(err.value)


def test_validation_file_errors_name_its_key(write, tok):
    cfg = DataSection(train=DataFile(path=write("t.jsonl", [{"text": "a"}])),
                      validation=DataFile(path=write("v.jsonl", [{"text": "a"}, {"txt": "b"}])))
    with pytest.raises(UserError, match=r"data.validation.path=\S+v.jsonl row 2: field 'text' is missing"):
        build_datasets(cfg, tok, seed=0)


def test_eval_file_errors_name_the_option(write, tok):
    path = write("e.jsonl", [{"prompt": "a", "completion": 1}])
    with pytest.raises(UserError, match=r"--data=\S+e.jsonl row 1: field 'completion' must be text, got int"):
        load_examples(path, "completion", tok, 64)
    with pytest.raises(UserError, match="data.format='dialogue': unknown data form"):
        load_examples(path, "dialogue", tok, 64)


def test_chat_needs_a_chat_template(write, tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    cfg = DataSection(train=DataFile(path=write("t.jsonl", [CHAT])), format="chat")
    with pytest.raises(UserError, match="the tokenizer has no chat template"):
        build_datasets(cfg, plain, seed=0)
