"""Data forms (text, instruction, completion, chat): a row becomes token ids and labels, prompt tokens masked (-100).

Prompt and response are tokenised separately and their ids concatenated, so the loss boundary is exact whatever the
tokenizer merges across it. A BOS token starts an example only if the tokenizer adds one on its own (Llama does, Qwen
and GPT-2 do not); EOS ends every non-chat example, so the model learns to stop. Chat turns end with the template's own
end-of-turn token instead.
"""

from __future__ import annotations

import string
from typing import Any

from sparseft.data.chat import encode_chat, get_messages
from sparseft.data.example import IGNORE, Example, bos_ids, eos_ids, get_text, tokenize
from sparseft.errors import UserError

FORMS = ("text", "instruction", "completion", "chat")
# form -> (required fields, optional fields); `fields` renames map these canonical names to columns.
FORM_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text": (("text",), ()),
    "instruction": (("instruction", "output"), ("input",)),
    "completion": (("prompt", "completion"), ()),
    "chat": (("messages",), ()),
}

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def check_form(form: str, fields: dict[str, str] | None, prompt_template: str | None, tokenizer: Any = None,
               form_key: str = "data.format") -> None:
    """Check form options once, before any row: unknown form, unknown renamed field, bad template, no chat template."""
    if form not in FORMS:
        raise UserError(f"{form_key}={form!r}: unknown data form (known: {', '.join(FORMS)})")
    required, optional = FORM_FIELDS[form]
    for name in fields or {}:
        if name not in required + optional:
            raise UserError(f"data.fields.{name}: not a field of the {form} form (its fields: "
                            f"{', '.join(required + optional)}); rename as {{field: column_in_file}}")
    if prompt_template is not None:
        if form != "instruction":
            raise UserError(f"data.prompt_template: only used by the instruction form, but {form_key}={form!r}")
        _check_template(prompt_template)
    if form == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template, which the chat form needs; use a chat model's tokenizer "
                        "(model.tokenizer) or another data.format")


def _check_template(template: str) -> None:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise UserError(f"data.prompt_template: not a valid format string ({e}); write literal braces as {{{{ }}}}") \
            from None
    unknown = names - {"instruction", "input"}
    if unknown:
        raise UserError(f"data.prompt_template: unknown placeholder(s) {', '.join(sorted(map(repr, unknown)))}; only "
                        "{instruction} and {input} are filled (write literal braces as {{ }})")
    if "instruction" not in names:
        raise UserError("data.prompt_template: must contain {instruction}")


def instruction_prompt(instruction: str, input_text: str, prompt_template: str | None) -> str:
    """The instruction form's prompt: `prompt_template`, or Alpaca's (its no-input variant when input is empty)."""
    if prompt_template is not None:
        return prompt_template.format(instruction=instruction, input=input_text)
    template = ALPACA_PROMPT if input_text.strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input_text)


def encode_example(row: dict, form: str, tokenizer: Any, max_length: int, fields: dict[str, str] | None = None,
                   prompt_template: str | None = None, where: str = "row") -> Example:
    """Tokenise one row in `form`, truncated from the right to `max_length` tokens.

    `where` starts every error message (e.g. "data.train.path=x.jsonl row 3"). The caller drops examples left with no
    loss tokens (`n_loss_tokens == 0`).
    """
    if form == "text":
        ids = bos_ids(tokenizer) + tokenize(tokenizer, get_text(row, "text", fields, where)) + eos_ids(tokenizer)
        labels = list(ids)
    elif form == "chat":
        ids, labels = encode_chat(get_messages(row, fields, where), tokenizer, where)
    else:
        if form == "instruction":
            prompt = instruction_prompt(get_text(row, "instruction", fields, where),
                                        get_text(row, "input", fields, where, required=False), prompt_template)
            response = get_text(row, "output", fields, where)
        elif form == "completion":
            prompt = get_text(row, "prompt", fields, where)
            response = get_text(row, "completion", fields, where)
        else:
            raise UserError(f"{where}: unknown data form {form!r} (known: {', '.join(FORMS)})")
        prompt_ids = bos_ids(tokenizer) + tokenize(tokenizer, prompt)
        response_ids = tokenize(tokenizer, response) + eos_ids(tokenizer)
        ids = prompt_ids + response_ids
        labels = [IGNORE] * len(prompt_ids) + response_ids
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], truncated)
