#!/usr/bin/env bash
# Full ahead-of-time sweep of the Triton kernels for sm_80 and sm_90, on any machine (no GPU needed): every autotune
# configuration of the prefill, decode, dequantize and Hadamard kernels x bits 2/3/4 x group sizes 32/64/128 x
# fp16/bf16 activations, compiled with triton.compile for GPUTarget("cuda", 80|90, 32); ptxas -v gives registers,
# spills and stack per compilation. Writes examples/benchmarks/results/aot/report.jsonl (one line per compilation) and
# summary.json (counts, failures, maximum registers and shared memory, every spilling configuration).
# JOBS (default 2) parallel compilations; extra arguments go to `python -m hf_decoupleq.kernels.aot`.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=examples/benchmarks/results/aot
mkdir -p "$out"
exec nice -n 5 "${PYTHON:-python}" -m hf_decoupleq.kernels.aot --arch 80,90 --jobs "${JOBS:-2}" \
    --json "$out/report.jsonl" --summary "$out/summary.json" "$@"
