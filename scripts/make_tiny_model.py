"""Build a small causal LM from config, with a byte-level BPE tokenizer trained in-process, into a local directory.

    python scripts/make_tiny_model.py --out demo/tiny-llama --arch llama --hidden 128 --layers 4

Nothing is downloaded; the directory is a plain Hugging Face model that every sparseft command (and transformers) loads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparseft.models.loader import quiet_libraries
from sparseft.models.tiny import ARCH_CONFIGS, build_tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="llama", choices=sorted(ARCH_CONFIGS))
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=None, help="default: 3 x hidden")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512, help="tokenizer vocabulary")
    ap.add_argument("--model-vocab", type=int, default=None, help="embedding rows, if larger than the tokenizer's")
    ap.add_argument("--corpus", nargs="*", default=[], help="jsonl files whose text the tokenizer is trained on")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    quiet_libraries()

    corpus = []
    for f in args.corpus:
        for line in Path(f).read_text().splitlines():
            if line.strip():
                corpus.extend(str(v) for v in json.loads(line).values())
    out = build_tiny_model(
        args.out, args.arch, corpus=corpus, seed=args.seed, vocab_size=args.vocab, model_vocab_size=args.model_vocab,
        hidden_size=args.hidden,
        num_layers=args.layers, intermediate_size=args.intermediate or 3 * args.hidden,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
