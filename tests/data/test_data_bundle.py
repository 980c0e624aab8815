"""Train/validation examples from a recipe's data section, the counts, and files encoded for evaluation."""

from __future__ import annotations

from sparseft.data import build_datasets, load_examples
from sparseft.recipe import DataFile, DataSection

ROWS = [{"prompt": f"Question {i}: what is {i} + 1? Answer:", "completion": f" {i + 1}"} for i in range(20)]


def _section(path, **kw) -> DataSection:
    return DataSection(train=DataFile(path=path), format="completion", **kw)


def test_train_only(write, tok):
    bundle = build_datasets(_section(write("t.jsonl", ROWS)), tok, seed=0)
    assert len(bundle.train) == 20 and bundle.validation is None and bundle.validation_stats is None
    assert bundle.stats.rows == 20 and bundle.stats.examples == 20 and bundle.stats.truncated == 0
    assert bundle.stats.tokens == sum(len(ex.input_ids) for ex in bundle.train)


def test_val_fraction_is_a_seeded_disjoint_split(write, tok):
    cfg = _section(write("t.jsonl", ROWS), val_fraction=0.25)
    a, b, c = (build_datasets(cfg, tok, seed=s) for s in (0, 0, 1))
    assert len(a.train) == 15 and len(a.validation) == 5
    ids = lambda exs: [tuple(ex.input_ids) for ex in exs]  # noqa: E731
    assert ids(a.train) == ids(b.train) and ids(a.validation) == ids(b.validation)
    assert ids(a.validation) != ids(c.validation)
    assert not set(ids(a.train)) & set(ids(a.validation))
    everything = build_datasets(_section(cfg.train.path), tok, 0).train
    assert sorted(ids(a.train) + ids(a.validation)) == sorted(ids(everything))
    assert a.validation_stats.rows == 5 and a.stats.rows == 15


def test_validation_file(write, tok):
    cfg = _section(write("t.jsonl", ROWS[:15]), validation=DataFile(path=write("v.csv", ROWS[15:])))
    bundle = build_datasets(cfg, tok, seed=0)
    assert len(bundle.train) == 15 and len(bundle.validation) == 5


def test_truncation_and_drops_are_counted(write, tok):
    rows = [{"prompt": "x", "completion": " 1"}, {"prompt": "x " * 40, "completion": " 2"},
            {"prompt": "x", "completion": " 2" * 40}]
    bundle = build_datasets(_section(write("t.jsonl", rows), max_length=16), tok, seed=0)
    s = bundle.stats
    assert (s.rows, s.examples, s.truncated, s.dropped) == (3, 2, 1, 1)
    assert max(len(ex.input_ids) for ex in bundle.train) == 16
    assert bundle.summary().startswith("train: 3 rows, 2 examples, 1 truncated to 16 tokens, 1 dropped (no loss tokens")


def test_load_examples_for_evaluation(write, tok, loss_text):
    rows = [{"q": "Add the numbers.", "a": "7"}]
    examples, stats = load_examples(write("e.parquet", rows), "instruction", tok, 512,
                                    fields={"instruction": "q", "output": "a"})
    assert len(examples) == 1 and stats.examples == 1 and loss_text(examples[0]) == "7</s>"
