"""The chat form: render a conversation with the tokenizer's chat template and put only assistant turns in the loss.

Assistant turns are located by rendering growing prefixes of the conversation: the text an assistant turn adds is
what `render(messages[:i + 1])` has beyond `render(messages[:i], add_generation_prompt=True)`. Each piece of text is
tokenised on its own, so turn boundaries are exact. Within a turn the loss runs through the template's last special
token (the end-of-turn token, e.g. "</s>" or "<|im_end|>"); text the template puts after it (often a newline) is context
only.
"""

from __future__ import annotations

from typing import Any

from sparseft.data.example import IGNORE, field_name, get_field, tokenize
from sparseft.errors import UserError

ROLES = ("system", "user", "assistant")


def get_messages(row: dict, fields: dict[str, str] | None, where: str) -> list[dict[str, str]]:
    """The row's conversation as [{role, content}], checked; other keys of a message are ignored."""
    value = get_field(row, "messages", fields, where)
    name = field_name("messages", fields)
    hint = " (a .csv cell is text: keep chat data in .jsonl, .json or .parquet)" if isinstance(value, str) else ""
    if not isinstance(value, list):
        raise UserError(f"{where}: {name} must be a list of {{role, content}} objects, "
                        f"got {type(value).__name__}{hint}")
    if not value:
        raise UserError(f"{where}: {name} is an empty list")
    messages = []
    for j, m in enumerate(value, start=1):
        if not isinstance(m, dict):
            raise UserError(f"{where}: {name} message {j} must be a {{role, content}} object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{where}: {name} message {j}: unknown role {role!r} (known: {', '.join(ROLES)})")
        if not isinstance(content, str):
            got = "nothing" if content is None else type(content).__name__
            raise UserError(f"{where}: {name} message {j}: 'content' must be text, got {got}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: {name} has no assistant message, so nothing to learn from")
    return messages


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, where: str) -> str:
    if not messages:  # templates refuse empty conversations; nothing comes before a leading assistant turn
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's raise_exception (e.g. roles must alternate) and template bugs
        raise UserError(f"{where}: the tokenizer's chat template rejected the conversation: {e}") from None


def chat_pieces(messages: list[dict], tokenizer: Any, where: str = "row") -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_turn) pieces whose concatenation is the whole render."""
    pieces: list[tuple[str, bool]] = []
    done = ""  # the render up to the end of the last assistant turn handled
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where)
        after = _render(tokenizer, messages[: i + 1], False, where)
        if not before.startswith(done) or not after.startswith(before):
            raise _not_incremental(where)
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    full = _render(tokenizer, messages, False, where)
    if not full.startswith(done):
        raise _not_incremental(where)
    pieces.append((full[len(done):], False))
    return [(text, loss) for text, loss in pieces if text]


def _not_incremental(where: str) -> UserError:
    return UserError(f"{where}: the tokenizer's chat template renders an earlier turn differently once later turns "
                     "follow, so assistant turns cannot be located; use a tokenizer whose template renders each turn "
                     "the same way (model.tokenizer)")


def special_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False))
    return ids


def encode_chat(messages: list[dict], tokenizer: Any, where: str = "row") -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation; labels are -100 outside assistant turns."""
    special = special_ids(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in chat_pieces(messages, tokenizer, where):
        piece = tokenize(tokenizer, text)
        n_loss = 0
        if is_assistant:
            # Through the last special token (the end of turn); a turn with none is all loss.
            ends = [k for k, t in enumerate(piece) if t in special]
            n_loss = ends[-1] + 1 if ends else len(piece)
        ids += piece
        labels += piece[:n_loss] + [IGNORE] * (len(piece) - n_loss)
    return ids, labels
