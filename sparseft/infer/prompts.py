"""Prompts as token ids, built the way training built them: BOS where the tokenizer adds one, the text tokenised on
its own; or a conversation rendered with the tokenizer's chat template, ending with the assistant's turn opening."""

from __future__ import annotations

from typing import Any

from sparseft.data.example import bos_ids, tokenize
from sparseft.errors import UserError


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a plain prompt (as the completion form tokenises its prompt)."""
    return bos_ids(tokenizer) + tokenize(tokenizer, text)


def chat_prompt_ids(tokenizer: Any, messages: list[dict], where: str = "prompt") -> list[int]:
    """Token ids of a conversation rendered with the chat template and the generation prompt (the assistant's turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{where}: the tokenizer has no chat template; drop --chat or use a chat model's tokenizer")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja's raise_exception (e.g. roles must alternate) and template bugs
        raise UserError(f"{where}: the tokenizer's chat template rejected the conversation: {e}") from None
    return tokenize(tokenizer, text)
