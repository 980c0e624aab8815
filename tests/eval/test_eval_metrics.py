"""Each metric against values computed by hand, on a bigram stub model whose log-probabilities are known exactly."""

from __future__ import annotations

import math

import pytest
import torch

from sparseft.errors import UserError
from sparseft.eval import exact_match as em
from sparseft.eval.exact_match import build_items, exact_match, extract_answer
from sparseft.eval.runner import run_task
from sparseft.eval.tasks import validate_task
from sparseft.infer.generate import Sampling, generate
from tests.eval.evallib import V, bigram, char_tokenizer, cid, write_jsonl

ARITH = [{"prompt": "3 + 4 =", "completion": " 7"}, {"prompt": "1 + 1 =", "completion": " 2"},
         {"prompt": "5 + 2 =", "completion": " 7"}, {"prompt": "9 + 9 =", "completion": " 18"}]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def task(**spec):
    return validate_task(spec, "t")


def test_perplexity_uniform_and_one_known_bigram(tmp_path, tok):
    data = write_jsonl(tmp_path / "a.jsonl", ARITH[:2])  # answers " 7" and " 2": 3 loss tokens each with EOS
    m = run_task(task(metric="perplexity", data=data, form="completion"), bigram({}), tok)
    assert m["tokens"] == 6
    assert m["loss"] == pytest.approx(math.log(V)) and m["perplexity"] == pytest.approx(V)
    # p(" " | "=") = e^2 / (e^2 + V - 1); the other two tokens of each answer stay uniform.
    m = run_task(task(metric="perplexity", data=data, form="completion"), bigram({("=", " "): 2.0}), tok)
    p_space = math.exp(2) / (math.exp(2) + V - 1)
    assert m["loss"] == pytest.approx((-math.log(p_space) + 2 * math.log(V)) / 3)


def test_perplexity_text_form_and_limit(tmp_path, tok):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "ab"}, {"text": "abc"}])
    m = run_task(task(metric="perplexity", data=data, limit=1), bigram({("a", "b"): 3.0}), tok)
    # "ab</s>": b after a (p = e^3 / (e^3 + V - 1)), then </s> after b (uniform).
    p_b = math.exp(3) / (math.exp(3) + V - 1)
    assert m["tokens"] == 2
    assert m["loss"] == pytest.approx((-math.log(p_b) + math.log(V)) / 2)


# After "=" the stub always says " 7" and stops: right on two of the four sums.
SAYS_7 = {("=", " "): 50.0, (" ", "7"): 50.0, ("7", "</s>"): 50.0}


@pytest.mark.parametrize("rule,pattern", [("last_number", None), ("stripped", None), ("regex", r"(\d+)")])
def test_exact_match(tmp_path, tok, rule, pattern):
    data = write_jsonl(tmp_path / "a.jsonl", ARITH)
    spec = dict(metric="exact_match", data=data, answer=rule, batch_size=3, generation={"max_new_tokens": 5})
    if pattern:
        spec["pattern"] = pattern
    samples = []
    m = run_task(task(**spec), bigram(SAYS_7), tok, samples=samples)
    assert (m["exact_match"], m["correct"], m["n"]) == (0.5, 2, 4)
    assert [s["generated"] for s in samples] == [" 7"] * 4
    assert [s["correct"] for s in samples] == [True, False, True, False]


def test_exact_match_stop_string_and_length(tmp_path, tok):
    data = write_jsonl(tmp_path / "a.jsonl", ARITH[:1])
    # " 7:7:7..." never ends: the stop string ":" cuts it to " 7"; without it max_new_tokens ends it at " 7:7".
    loop = {("=", " "): 50.0, (" ", "7"): 50.0, ("7", ":"): 50.0, (":", "7"): 50.0}
    samples = []
    for stop in ([":"], []):
        run_task(task(metric="exact_match", data=data, generation={"max_new_tokens": 4, "stop": stop}), bigram(loop),
                 tok, samples=samples)
    assert [s["generated"] for s in samples] == [" 7", " 7:7"]
    assert [s["correct"] for s in samples] == [True, False]


def test_few_shot_prompt_is_shots_then_prompt(tmp_path, tok):
    data = write_jsonl(tmp_path / "a.jsonl", ARITH[:1])
    t = task(metric="exact_match", data=data, few_shot={"examples": [{"prompt": "1 + 2 =", "completion": " 3"}],
                                                          "separator": "?"})
    [item] = build_items(t, tok)
    assert tok.decode(item.prompt_ids) == "1 + 2 = 3?3 + 4 ="
    assert item.reference == "7"


def test_extract_answer_rules():
    assert extract_answer("  so 1,200 then 25.50 ", "last_number") == "25.5"
    assert extract_answer("x 10.0", "last_number") == "10"
    assert extract_answer("-3 and 4", "first_number") == "-3"
    assert extract_answer("none", "last_number") is None
    assert extract_answer("\n a b \n c", "first_line") == "a b"
    assert extract_answer(" Paris \n", "stripped") == "Paris"
    assert extract_answer("answer: B.", "regex", r"answer: (\w)") == "B"
    assert extract_answer("no", "regex", r"answer: (\w)") is None
    assert extract_answer("so answer: B.", "regex", r"answer: \w") == "answer: B"  # no group: the whole match
    assert extract_answer(" \n \n", "first_line") == ""


def test_multiple_choice_by_sum_per_token_and_per_char(tmp_path, tok):
    # Query "q", delimiter " ": choice "a" scores " a", choice "bb" scores " bb". Every choice shares log p(" " | q).
    pairs = {(" ", "a"): 3.0, (" ", "b"): 3.4, ("b", "b"): 2.5}
    lp = torch.log_softmax(bigram(pairs).table, dim=-1)
    space = float(lp[cid("q"), cid(" ")])
    a = space + float(lp[cid(" "), cid("a")])
    bb = space + float(lp[cid(" "), cid("b")]) + float(lp[cid("b"), cid("b")])
    assert a > bb and a / 2 < bb / 3 and a / 1 < bb / 2  # the sum prefers "a"; per token and per character "bb"
    rows = [{"query": "q", "choices": ["a", "bb"], "gold": 0}, {"query": "q", "choices": ["bb", "a"], "gold": "a"},
            {"query": "q", "choices": ["a", "bb"], "gold": 1}]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    expected = {"none": (2, [a, bb]), "tokens": (1, [a / 2, bb / 3]), "chars": (1, [a / 1, bb / 2])}
    for normalize, (correct, scores) in expected.items():
        samples = []
        m = run_task(task(metric="multiple_choice", data=data, normalize=normalize, batch_size=4), bigram(pairs), tok,
                     samples=samples)
        assert (m["correct"], m["n"]) == (correct, 3) and m["accuracy"] == pytest.approx(correct / 3)
        assert samples[0]["scores"] == pytest.approx(scores, abs=1e-5)


def test_sampling_is_seeded_per_prompt_and_batch_invariant(tok):
    model = bigram({})  # uniform: every draw is random
    prompts = [[cid("a")], [cid("b"), cid("c")], [cid("d")]]
    s = Sampling(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)
    one = generate(model, tok, prompts, s, batch_size=3)
    assert [g.token_ids for g in one] == [g.token_ids for g in generate(model, tok, prompts, s, batch_size=1)]
    other = generate(model, tok, prompts, Sampling(max_new_tokens=5, temperature=1.0, seed=4), batch_size=3)
    assert [g.token_ids for g in one] != [g.token_ids for g in other]


def test_cut_prompts_are_counted(tmp_path, tok):
    data = write_jsonl(tmp_path / "a.jsonl", ARITH)  # prompts of 7 characters
    m = run_task(task(metric="exact_match", data=data, max_length=6, generation={"max_new_tokens": 2}), bigram({}),
                 tok)
    assert (m["truncated"], m["n"]) == (4, 4)
    assert run_task(task(metric="exact_match", data=data, max_length=7, generation={"max_new_tokens": 2}),
                    bigram({}), tok)["truncated"] == 0
    rows = [{"query": "abcdef", "choices": ["a", "bb"], "gold": 0}, {"query": "ab", "choices": ["a", "bb"], "gold": 0}]
    mc = write_jsonl(tmp_path / "mc.jsonl", rows)
    # The longest continuation " bb" (3 tokens) leaves room for 5 - 3 + 1 = 3 context tokens: "abcdef" is cut.
    m = run_task(task(metric="multiple_choice", data=mc, max_length=5), bigram({}), tok)
    assert (m["truncated"], m["n"]) == (1, 2)


@pytest.mark.parametrize("text,rule,expected", [
    ("10", "last_number", "10"),  # integers keep their zeros: "10" is not "1"
    ("the answer is 100", "last_number", "100"),
    ("0", "first_number", "0"),
    ("-20 then 3", "first_number", "-20"),
    ("1,200", "first_number", "1200"),  # thousands separators are dropped
    ("x 12,345,678 y", "last_number", "12345678"),
    ("7.000", "last_number", "7"),  # trailing decimal zeros are dropped, then the point
    ("120.50", "last_number", "120.5"),
    ("3.0 and 40.", "first_number", "3"),
    ("x 40. y", "last_number", "40"),
    ("1,000.50", "first_number", "1000.5"),
    ("0.0", "first_number", "0"),
])
def test_numbers_read_by_hand(text, rule, expected):
    assert extract_answer(text, rule) == expected


def _says(answer: str) -> dict:
    """A stub that, after "=", says `answer` one character at a time and stops (characters must not repeat)."""
    chain = ["=", *answer, "</s>"]
    assert len(set(answer)) == len(answer)
    return {(a, b): 50.0 for a, b in zip(chain, chain[1:])}


@pytest.mark.parametrize("says,reference,correct", [
    (" 1", " 10", False),  # "10" must not read as "1"
    (" 10", " 10", True),
    (" 12", " 1,2", True),  # the reference's thousands separator is dropped
    (" 12", " 1.2", False),
    (" 4", " 4.0", True),
])
def test_exact_match_compares_numbers_not_digits(tmp_path, tok, says, reference, correct):
    data = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "3 + 4 =", "completion": reference}])
    spec = dict(metric="exact_match", data=data, answer="last_number", generation={"max_new_tokens": 5})
    samples = []
    m = run_task(task(**spec), bigram(_says(says)), tok, samples=samples)
    assert samples[0]["generated"] == says
    assert (m["correct"], samples[0]["correct"]) == (int(correct), correct), samples


def test_over_long_prompts_keep_their_end(tmp_path, tok):
    """A prompt longer than max_length loses its beginning: the tokens next to the answer are what it predicts from."""
    data = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "abcdefgh 1 + 2 =", "completion": " 3"},
                                              {"prompt": "9 =", "completion": " 9"}])
    t = task(metric="exact_match", data=data, max_length=7,
             few_shot={"examples": [{"prompt": "x =", "completion": " 1"}], "separator": "?"})
    long, short = build_items(t, tok)
    assert tok.decode(long.prompt_ids) == "1 + 2 ="  # the last 7 of "x = 1?abcdefgh 1 + 2 ="
    assert tok.decode(short.prompt_ids) == "= 1?9 ="
    assert len(long.prompt_ids) == len(short.prompt_ids) == 7
    assert (long.reference, short.reference) == ("3", "9")


def test_exact_match_generates_with_the_task_settings(tmp_path, tok):
    """Called on its own (it builds the items), exact_match samples with the task's settings: the texts are those of
    generate() with them, another seed gives others, and the score is the fraction of matching answers."""
    rows = [{"prompt": "1 + 1 =", "completion": " 2"}, {"prompt": "2 + 2 =", "completion": " 4"},
            {"prompt": "9 =", "completion": " 9"}]
    gen = {"max_new_tokens": 4, "temperature": 1.0, "top_p": 0.3, "seed": 5}
    t = task(metric="exact_match", data=write_jsonl(tmp_path / "a.jsonl", rows), generation=gen, batch_size=2)
    model = bigram({(" ", "9"): 1.0})  # nearly uniform: every draw is random
    samples = []
    m = exact_match(model, tok, t, samples=samples)
    prompts = [it.prompt_ids for it in build_items(t, tok)]
    expected = [g.text for g in generate(model, tok, prompts, Sampling(**gen), batch_size=3)]
    assert [s["generated"] for s in samples] == expected
    assert expected != [g.text for g in generate(model, tok, prompts, Sampling(**{**gen, "seed": 6}))]
    assert expected != [g.text for g in generate(model, tok, prompts, Sampling(**{**gen, "top_p": 1.0}))]
    assert [s["prediction"] for s in samples] == [e.strip() for e in expected]
    assert [s["reference"] for s in samples] == ["2", "4", "9"]
    correct = sum(e.strip() == r for e, r in zip(expected, ["2", "4", "9"]))
    assert [s["correct"] for s in samples] == [e.strip() == r for e, r in zip(expected, ["2", "4", "9"])]
    assert (m["correct"], m["n"], m["exact_match"]) == (correct, 3, correct / 3)


def test_one_row_scores_zero_or_one(tmp_path, tok):
    data = write_jsonl(tmp_path / "a.jsonl", ARITH[:1])
    for says, score in ((" 7", 1.0), (" 6", 0.0)):
        m = run_task(task(metric="exact_match", data=data), bigram(_says(says)), tok)
        assert (m["exact_match"], m["n"]) == (score, 1)


def test_renamed_fields(tmp_path, tok):
    data = write_jsonl(tmp_path / "a.jsonl", [{"q": "3 + 4 =", "a": " 7"}])
    [item] = build_items(task(metric="exact_match", data=data, fields={"prompt": "q", "completion": "a"}), tok)
    assert tok.decode(item.prompt_ids) == "3 + 4 =" and item.reference == "7"


def test_instruction_form_items(tmp_path, tok):
    """The prompt is the task's template filled with the row's instruction and input (renamed fields too), the
    reference the row's output read by the rule; few-shot examples come first, each with its answer and separator."""
    rows = [{"ins": "add", "inp": "3 4", "out": " 7"}, {"ins": "neg", "out": " 0"}]
    t = task(metric="exact_match", data=write_jsonl(tmp_path / "i.jsonl", rows), form="instruction",
             prompt_template="q {instruction} {input}=", fields={"instruction": "ins", "input": "inp", "output": "out"},
             few_shot={"examples": [{"ins": "one", "out": " 1"}, {"ins": "two", "out": " 2"}], "separator": "?"})
    items = build_items(t, tok)
    assert [tok.decode(it.prompt_ids) for it in items] == ["q one = 1?q two = 2?q add 3 4=", "q one = 1?q two = 2?q neg ="]
    assert [it.reference for it in items] == ["7", "0"]


def test_chat_form_items(tmp_path, tok):
    """The context is the conversation before its last assistant turn (few-shot conversations first, each closed by
    its answer), rendered with the chat template and the generation prompt; the reference is that last turn."""
    chat_tok = char_tokenizer()
    chat_tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}?{% endfor %}"
                              "{% if add_generation_prompt %}a:{% endif %}")
    rows = [{"msgs": [{"role": "user", "content": "1 + 1"}, {"role": "assistant", "content": "2"},
                      {"role": "user", "content": "2 + 2"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "ok"}]}]
    shot = {"msgs": [{"role": "user", "content": "0 + 0"}, {"role": "assistant", "content": "0"}]}
    t = task(metric="exact_match", data=write_jsonl(tmp_path / "c.jsonl", rows), form="chat",
             fields={"messages": "msgs"}, few_shot={"examples": [shot, shot]})
    [item] = build_items(t, chat_tok)
    assert chat_tok.decode(item.prompt_ids) == "u:0 + 0?a:0?u:0 + 0?a:0?u:1 + 1?a:2?u:2 + 2?a:"
    assert item.reference == "4"


def _chat_tok(template: str = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}?{% endfor %}"
                                "{% if add_generation_prompt %}a:{% endif %}"):
    t = char_tokenizer()
    t.chat_template = template
    return t


_ONE_USER_TURN = ("{% if messages|length > 1 %}{{ raise_exception('one user turn only') }}{% endif %}"
                  "{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.mark.parametrize("form,bad,template", [
    ("completion", {"completion": " 1"}, None),  # no prompt
    ("completion", {"prompt": "1 ="}, None),  # no completion
    ("instruction", {"output": " 1"}, None),  # no instruction
    ("instruction", {"instruction": "a", "input": 5, "output": " 1"}, None),  # an input that is not text
    ("instruction", {"instruction": "a"}, None),  # no output
    ("chat", {"conversation": []}, None),  # no messages
    ("chat", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "1"}]}, _ONE_USER_TURN),  # the template refuses it
])
def test_a_bad_row_is_named_by_its_number(tmp_path, form, bad, template):
    """A row the form cannot read fails with a UserError that starts with the task, the file and the row's number
    (row 2 here, after a good row 1), or, for a few-shot example, its index."""
    good = {"completion": {"prompt": "1 =", "completion": " 1"},
            "instruction": {"instruction": "a", "output": " 1"},
            "chat": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"}]}}[form]
    tok = _chat_tok() if template is None else _chat_tok(template)
    data = write_jsonl(tmp_path / "a.jsonl", [good, bad])
    with pytest.raises(UserError) as e:
        build_items(task(metric="exact_match", data=data, form=form), tok)
    assert str(e.value).startswith(f"task t: data={data} row 2: "), str(e.value)
    shots = {"examples": [good, bad]}
    with pytest.raises(UserError) as e:
        build_items(task(metric="exact_match", data=write_jsonl(tmp_path / "b.jsonl", [good]), form=form,
                         few_shot=shots), tok)
    if template is None:  # a few-shot example is read like a row (a refused conversation fails at row 1)
        assert str(e.value).startswith("task t: few_shot.examples[1]: "), str(e.value)


def test_form_options_are_checked_before_any_row(tmp_path, tok):
    """A renamed field the form does not have, a prompt template outside the instruction form, and the chat form with
    a tokenizer that has no chat template are refused (naming the task), though every row could be read."""
    data = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1 =", "completion": " 1"}])
    with pytest.raises(UserError, match="data.fields.promt: not a field of the completion form"):
        build_items(task(metric="exact_match", data=data, fields={"promt": "q"}), tok)
    with pytest.raises(UserError, match="only used by the instruction form, but task t: form='completion'"):
        build_items(task(metric="exact_match", data=data, prompt_template="{instruction}"), tok)
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "1"}]}])
    with pytest.raises(UserError, match="no chat template, which the chat form needs"):
        build_items(task(metric="exact_match", data=chat, form="chat"), tok)


def test_exact_match_scores_the_items_it_is_given(tmp_path, tok):
    """Items built once (per tokenizer, reused for every adapter) are scored as given: the data file is not read
    again."""
    path = tmp_path / "a.jsonl"
    t = task(metric="exact_match", data=write_jsonl(path, ARITH))
    items = build_items(t, tok)[1:]
    path.unlink()
    m = exact_match(bigram(_says(" 7")), tok, t, items)
    assert (m["correct"], m["n"]) == (1, 3)  # " 7" is right for "5 + 2 =" only


def test_exact_match_batches_longest_prompts_first(tmp_path, tok, monkeypatch):
    """Prompts go to the generator longest first, in batches of the task's batch_size; each row still gets its own
    text, and the score and its standard error are those of the matching rows (2 of 5, by hand)."""
    rows = [{"prompt": "3 + 4 =", "completion": " 7"}, {"prompt": "1 =", "completion": " 1"},
            {"prompt": "12 + 30 =", "completion": " 42"}, {"prompt": "5 + 2 =", "completion": " 7"},
            {"prompt": "9 =", "completion": " 9"}]
    seen = []

    def spy(model, tokenizer, prompts, sampling, batch_size=8):
        seen.append(([len(p) for p in prompts], batch_size))
        return generate(model, tokenizer, prompts, sampling, batch_size=batch_size)

    monkeypatch.setattr(em, "generate", spy)
    samples = []
    m = exact_match(bigram(_says(" 7")), tok, task(metric="exact_match", data=write_jsonl(tmp_path / "a.jsonl", rows),
                                                   batch_size=2, generation={"max_new_tokens": 3}), samples=samples)
    [(lengths, batch_size)] = seen
    assert lengths == [9, 7, 7, 3, 3] and batch_size == 2
    assert [s["generated"] for s in samples] == [" 7"] * 5
    assert [s["correct"] for s in samples] == [True, False, False, True, False]
    assert (m["correct"], m["n"], m["exact_match"]) == (2, 5, 0.4)
    assert m["exact_match_stderr"] == pytest.approx(math.sqrt(0.4 * 0.6 / 4))
