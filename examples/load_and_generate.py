"""Load a saved decoupleQ checkpoint and generate text.

    python examples/load_and_generate.py --model smollm2-w2g64 --prompt "The capital of France is"

`import hf_decoupleq` must come before `from_pretrained`: it registers the "decoupleq" quantization method, so that
transformers rebuilds the packed layers and reads the 2/3/4-bit codes instead of expecting full-precision weights.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_decoupleq  # noqa: F401  (registers quant_method "decoupleq" with transformers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder (or Hub id) of a decoupleQ-quantized model")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, device_map=args.device)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
