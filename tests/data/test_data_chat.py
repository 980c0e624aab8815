"""The chat form: only assistant turns (content and end-of-turn token) count in the loss."""

from __future__ import annotations

import copy

import pytest

from sparseft.data import IGNORE, encode_example
from sparseft.data.chat import chat_pieces
from sparseft.errors import UserError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "what is 12 + 7?"},
    {"role": "assistant", "content": "19"},
    {"role": "user", "content": "and 3 + 4?"},
    {"role": "assistant", "content": "7"},
]


def test_two_turns_mask_everything_but_the_assistant_turns(tok, loss_text):
    ex = encode_example({"messages": CONVERSATION}, "chat", tok, 512)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert loss_text(ex) == "19</s>7</s>"
    # Exactly two spans in the loss, each the turn's content followed by the end-of-turn token.
    spans, current = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == ["19</s>", "7</s>"]


def test_the_role_header_and_the_newline_after_the_turn_stay_out_of_the_loss(tok):
    pieces = chat_pieces(CONVERSATION[1:3], tok)
    assert pieces == [("<|user|>\nwhat is 12 + 7?</s>\n<|assistant|>\n", False), ("19</s>\n", True)]
    ex = encode_example({"messages": CONVERSATION[1:3]}, "chat", tok, 512)
    assert ex.labels[-1] == IGNORE and tok.decode(ex.input_ids[-1:]) == "\n"


def test_a_trailing_user_turn_is_context_only(tok, loss_text):
    ex = encode_example({"messages": CONVERSATION[:4]}, "chat", tok, 512)
    assert loss_text(ex) == "19</s>"
    assert tok.decode(ex.input_ids).endswith("<|user|>\nand 3 + 4?</s>\n")


def test_renamed_messages_column_and_extra_message_keys(tok, loss_text):
    convo = [dict(m, name="x") for m in CONVERSATION]
    ex = encode_example({"conversation": convo}, "chat", tok, 512, fields={"messages": "conversation"})
    assert loss_text(ex) == "19</s>7</s>"


def test_truncation_in_the_first_turn_drops_the_example(tok):
    ex = encode_example({"messages": CONVERSATION}, "chat", tok, 6)
    assert ex.truncated and ex.n_loss_tokens == 0


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    odd = copy.deepcopy(tok)
    # Marks the last message differently, so a turn's text changes once another follows.
    odd.chat_template = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}<|{{ m['role'] }}|>\n"
                         "{{ m['content'] }}</s>\n{% endfor %}")
    with pytest.raises(UserError, match="row 2: the tokenizer's chat template renders an earlier turn differently"):
        encode_example({"messages": CONVERSATION}, "chat", odd, 512, where="row 2")


def test_a_chatml_template_with_a_default_system_prompt(tok):
    chatml = copy.deepcopy(tok)
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ex = encode_example({"messages": CONVERSATION[1:]}, "chat", chatml, 512)
    assert chatml.decode(ex.input_ids) == chatml.apply_chat_template(CONVERSATION[1:], tokenize=False)
    assert chatml.decode([t for t in ex.labels if t != IGNORE]) == "19<|im_end|>7<|im_end|>"
