"""Perplexity of a model (quantized or not) on a text, with the standard non-overlapping-window protocol.

    python examples/evaluate.py --model smollm2-w2g64 --dataset wikitext2            # Hub test split
    python examples/evaluate.py --model smollm2-w2g64 --dataset wiki.test.raw        # a local file

Compare a quantized model with its source by running both through the same command.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_decoupleq  # noqa: F401  (registers quant_method "decoupleq" with transformers)
from hf_decoupleq.evaluation import perplexity


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder or Hub id of a causal LM")
    p.add_argument("--dataset", default="wikitext2", help="'wikitext2' or a local text file")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=40, help="score the first N windows (the usual protocol: 40)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, device_map=args.device)
    result = perplexity(model, tokenizer, args.dataset, seq_len=args.seq_len, max_windows=args.max_windows)
    print(f"perplexity {result.ppl:.4f} ({result.n_windows} windows of {args.seq_len} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
