"""Helpers for the SquareHead tests: a tiny Llama built from config, a learnable copy task, and a short training
loop through the method protocol (the trainer's own calls, without a run directory)."""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparseft.methods import MethodContext, build_method
from sparseft.recipe import validate_recipe_data
from sparseft.train.optim import Engine

VOCAB, HALF = 32, 8  # a sequence: HALF random tokens, then the same HALF tokens again


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).float()


def copy_batch(n: int, seed: int, pad_last: int = 0) -> dict[str, torch.Tensor]:
    """Copy task: the second half repeats the first, so only it can be predicted and only it is in the loss.
    `pad_last` rows end with 3 padding tokens (left out of the attention mask and the loss)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(3, VOCAB, (n, HALF), generator=g)
    ids = torch.cat([first, first], dim=1)  # (n, 2 * HALF)
    labels = ids.clone()
    labels[:, :HALF] = -100  # the random half cannot be predicted
    attn = torch.ones_like(ids)
    if pad_last:
        ids[-pad_last:, -3:] = 0
        attn[-pad_last:, -3:] = 0
        labels[-pad_last:, -3:] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def recipe_for(method: dict, steps: int, lr: float, **train):
    return validate_recipe_data({
        "model": {"path": "unused"}, "data": {"train": {"path": "unused.jsonl"}},
        "method": {"name": "squarehead", **method},
        "train": {"max_steps": steps, "lr": lr, "output_dir": "unused", "max_grad_norm": None, **train},
    })


def prepared(model, method: dict, batches: list[dict], steps: int = 1, lr: float = 1e-3, **train):
    """(method, prepared model, engine) for `model` (changed in place), calibrated on `batches`."""
    recipe = recipe_for(method, steps, lr, **train)
    m = build_method(recipe.method)
    ctx = MethodContext(recipe=recipe, calibration_batches=lambda n: iter((batches * n)[:n]), log=lambda s: None)
    model = m.prepare(model, m.select(model, ctx), ctx)
    model.train()
    engine = Engine(model, m.optimizer_param_groups(model, recipe.train.weight_decay), recipe.train)
    return m, model, engine


def train_steps(method, model, engine, batches: list[dict], steps: int, accum: int = 1, each_step=None) -> list[dict]:
    """The trainer's calls for `steps` optimizer steps, cycling through `batches`; returns each step's logs."""
    logs, i = [], 0
    for step in range(steps):
        method.on_step_start(step, model, engine.optimizer)
        terms: dict = {}
        for _ in range(accum):
            loss, t = method.compute_loss(model, batches[i % len(batches)])
            engine.backward(loss / accum)
            i += 1
            terms = t
        engine.step()
        terms.update(method.on_step_end(step, model, engine.optimizer))
        logs.append(terms)
        if each_step is not None:
            each_step(step)
    return logs


def train_dense(model, steps: int, lr: float = 3e-3, batch: int = 32, seed: int = 100) -> None:
    """Plain AdamW on fresh copy-task batches (the teacher's training)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        b = copy_batch(batch, seed + step)
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def heldout_loss(model, batches: list[dict]) -> float:
    was = model.training
    model.eval()
    losses = [float(model(**b).loss) for b in batches]
    model.train(was)
    return sum(losses) / len(losses)


def clone(model):
    return copy.deepcopy(model)
