"""float32 ``x^T x`` on the CPU: PyTorch's default GEMM (MKL) vs oneDNN (``hf_decoupleq.solver.matmul.matmul_nt``).

The Hessian accumulation multiplies one calibration batch's layer inputs with themselves; this times that product
for SmolLM2-135M's layer widths (576, 1536) at the benchmark's batch of 8 x 512 tokens, and checks both results
against float64::

    python examples/benchmarks/bench_matmul.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_decoupleq.solver.matmul import matmul_nt


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="rows of x (default 8 windows x 512 tokens)")
    p.add_argument("--widths", default="576,1536", help="comma-separated layer input widths K")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, x: [{args.tokens}, K] float32")
    print("| K | default matmul (ms) | oneDNN matmul_nt (ms) | speed-up | max rel. error default / oneDNN |")
    print("|---:|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    for k in (int(w) for w in args.widths.split(",")):
        x = torch.randn(args.tokens, k, generator=g)
        xt = x.T.contiguous()
        ref = x.double().T @ x.double()
        scale = float(ref.abs().max())
        default = best_ms(lambda xt=xt: xt @ xt.T, args.repeat)
        onednn = best_ms(lambda xt=xt: matmul_nt(xt, xt), args.repeat)
        err_default = float(((xt @ xt.T).double() - ref).abs().max()) / scale
        err_onednn = float((matmul_nt(xt, xt).double() - ref).abs().max()) / scale
        print(f"| {k} | {default:.2f} | {onednn:.2f} | {default / onednn:.2f}x | {err_default:.1e} / {err_onednn:.1e} |")


if __name__ == "__main__":
    main()
