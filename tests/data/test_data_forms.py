"""Each form's token ids and label mask on the tiny tokenizer."""

from __future__ import annotations

import copy

import pytest
from tokenizers import processors

from sparseft.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, IGNORE, encode_example

ROWS = {
    "text": {"text": "The quick brown fox."},
    "instruction": {"instruction": "Add the numbers.", "input": "3 4", "output": "7"},
    "completion": {"prompt": "Question: what is 12 + 7? Answer:", "completion": " 19"},
}


def test_text_form_puts_every_token_in_the_loss(tok, loss_text):
    ex = encode_example(ROWS["text"], "text", tok, 512)
    assert ex.labels == ex.input_ids
    assert tok.decode(ex.input_ids) == "The quick brown fox.</s>"
    assert ex.input_ids[-1] == tok.eos_token_id and not ex.truncated


@pytest.mark.parametrize("input_text, template", [("3 4", ALPACA_PROMPT), ("", ALPACA_PROMPT_NO_INPUT),
                                                  (None, ALPACA_PROMPT_NO_INPUT)])
def test_instruction_form_masks_the_alpaca_prompt(tok, loss_text, input_text, template):
    row = {"instruction": "Add the numbers.", "output": "7"}
    if input_text is not None:
        row["input"] = input_text
    ex = encode_example(row, "instruction", tok, 512)
    prompt = template.format(instruction="Add the numbers.", input=input_text or "")
    assert tok.decode(ex.input_ids) == prompt + "7</s>"
    assert loss_text(ex) == "7</s>"
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt and IGNORE not in ex.labels[n_prompt:]


def test_instruction_form_custom_template(tok, loss_text):
    ex = encode_example(ROWS["instruction"], "instruction", tok, 512, prompt_template="Q: {instruction} [{input}]\nA: ")
    assert tok.decode(ex.input_ids) == "Q: Add the numbers. [3 4]\nA: 7</s>"
    assert loss_text(ex) == "7</s>"


def test_completion_form_masks_the_prompt(tok, loss_text):
    ex = encode_example(ROWS["completion"], "completion", tok, 512)
    assert tok.decode(ex.input_ids) == "Question: what is 12 + 7? Answer: 19</s>"
    assert loss_text(ex) == " 19</s>"


def test_prompt_and_response_are_tokenised_separately(tok):
    # " the" is one token when tokenised whole; the loss boundary must stay where the prompt ends.
    assert len(tok(" the", add_special_tokens=False)["input_ids"]) == 1
    ex = encode_example({"prompt": " th", "completion": "e"}, "completion", tok, 512)
    prompt_ids = tok(" th", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == prompt_ids + tok("e", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.labels == [IGNORE] * len(prompt_ids) + ex.input_ids[len(prompt_ids):]


def test_renamed_fields(tok, loss_text):
    row = {"question": "Add the numbers.", "context": "3 4", "answer": "7"}
    fields = {"instruction": "question", "input": "context", "output": "answer"}
    ex = encode_example(row, "instruction", tok, 512, fields=fields)
    assert ex == encode_example(ROWS["instruction"], "instruction", tok, 512)
    ex = encode_example({"body": "hi"}, "text", tok, 512, fields={"text": "body"})
    assert loss_text(ex) == "hi</s>"


def test_truncation_keeps_the_left_and_flags_it(tok, loss_text):
    full = encode_example(ROWS["completion"], "completion", tok, 512)
    cut = encode_example(ROWS["completion"], "completion", tok, len(full.input_ids) - 1)
    assert cut.truncated and cut.input_ids == full.input_ids[:-1] and cut.labels == full.labels[:-1]
    assert loss_text(cut) == " 19"


def test_truncation_through_the_prompt_leaves_no_loss_tokens(tok):
    ex = encode_example(ROWS["instruction"], "instruction", tok, 8)
    assert ex.truncated and len(ex.input_ids) == 8 and ex.n_loss_tokens == 0


def test_a_tokenizer_that_adds_bos_gets_it_masked_in_the_prompt(tok, loss_text):
    bos_tok = copy.deepcopy(tok)
    bos_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert bos_tok("a")["input_ids"][0] == tok.bos_token_id
    ex = encode_example(ROWS["completion"], "completion", bos_tok, 512)
    assert ex.input_ids[0] == tok.bos_token_id and ex.labels[0] == IGNORE
    assert ex.input_ids.count(tok.bos_token_id) == 1 and loss_text(ex) == " 19</s>"
    ex = encode_example(ROWS["text"], "text", bos_tok, 512)
    assert tok.decode(ex.input_ids) == "<s>The quick brown fox.</s>"
