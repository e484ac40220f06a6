"""Quantize a model while loading it, then save the packed checkpoint (weights, config, tokenizer, model card).

    python examples/quantize_on_load.py --model HuggingFaceTB/SmolLM2-135M --output smollm2-w2g64 --dataset wikitext2

Passing a `DecoupleQConfig` as `quantization_config` makes `from_pretrained` load the full-precision weights,
calibrate on `--dataset`, and replace every linear layer of every decoder block with a packed `DecoupleQLinear`.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_decoupleq  # noqa: F401  (registers quant_method "decoupleq" with transformers)
from hf_decoupleq import DecoupleQConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hub id or local folder of a full-precision causal LM")
    p.add_argument("--output", required=True, help="folder to save the quantized model to")
    p.add_argument("--dataset", default="wikitext2", help="'wikitext2', 'c4', 'pile', 'self' or a local text file")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration window")
    args = p.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = DecoupleQConfig(
        bits=args.bits,
        group_size=args.group_size,
        dataset=args.dataset,
        tokenizer=tokenizer,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config, dtype=torch.float32)
    model.save_pretrained(args.output)  # packed safetensors + config.json + README.md model card
    tokenizer.save_pretrained(args.output)
    print(f"saved the W{args.bits} g{args.group_size} model to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
