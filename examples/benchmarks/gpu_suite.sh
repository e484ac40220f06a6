#!/usr/bin/env bash
# GPU benchmark suite: kernels vs fp16 cuBLAS, SmolLM2 decode tokens/s (eager and torch.compile with a static
# cache), quantize-on-load with device_map="cuda", and the vLLM plugin when bench_vllm.py exists. One command, at
# most --budget seconds (default 480), one JSON record (default: examples/benchmarks/results/gpu_suite.json).
# Without CUDA it skips the GPU parts with a message, runs the rest on the CPU and exits 0.
# Details and flags: examples/benchmarks/gpu_suite.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python}" examples/benchmarks/gpu_suite.py "$@"
