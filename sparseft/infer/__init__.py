"""Inference: load any model form (base, run directory, merged, base + adapters) and generate from prompts.

    loaded = load_for_inference("runs/quickstart")
    ids = prompt_ids(loaded.tokenizer, "12 + 8 =")
    [out] = generate(loaded.model, loaded.tokenizer, [ids], Sampling(max_new_tokens=4))   # out.text == " 20"

`sparseft generate` (sparseft/infer/run.py) reads prompts from the command line or a jsonl file; evaluation's
exact-match tasks (sparseft/eval/) use the same `generate`.
"""

from sparseft.infer.generate import Generated, Sampling, generate
from sparseft.infer.loading import LoadedModel, load_for_inference
from sparseft.infer.prompts import chat_prompt_ids, prompt_ids

__all__ = ["Generated", "LoadedModel", "Sampling", "chat_prompt_ids", "generate", "load_for_inference", "prompt_ids"]
