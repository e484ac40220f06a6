"""CUDA kernel benchmark: fp16 cuBLAS (``x @ W^T``) vs the decoupleQ fused kernels on Llama layer shapes.

For every (N, K) layer shape and every M (tokens), prints the time, TFLOP/s, the effective GB/s (bytes of weights,
scales, zeros, activations and outputs that must move, divided by time) and the speedup over cuBLAS. M <= 16 runs
the split-K decode kernel, larger M the prefill kernel (both through ``torch.ops.hf_decoupleq.matmul``).

Usage::

    python examples/benchmarks/bench_kernels.py                 # W2 g64, Llama-7B and 70B shapes
    python examples/benchmarks/bench_kernels.py --bits 2 3 4 --group-size 128 --models 7b

Exits with a message when CUDA is not available.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

SHAPES = {
    # (out_features N, in_features K) of the attention / MLP linears
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
}
DEFAULT_M = (1, 4, 16, 128, 2048)


def _random_layer(n_out: int, k: int, bits: int, group_size: int, device: str):
    from hf_decoupleq.packing import num_groups, pack

    codes = torch.randint(0, 2**bits, (n_out, k), dtype=torch.uint8, device=device)
    n_groups = num_groups(k, group_size)
    scales = (torch.rand(n_groups, n_out, device=device) + 0.5).mul_(0.02 / 2**bits).half()
    zeros = (-scales.float() * (2**bits - 1) / 2).half()
    return pack(codes, bits), scales, zeros


def _bench_shape(n_out: int, k: int, bits: int, g: int, ms: list[int], rep: int, device: str) -> list[str]:
    import triton.testing
    from hf_decoupleq.kernels import reference

    qweight, scales, zeros = _random_layer(n_out, k, bits, g, device)
    w16 = reference.dequantize(qweight, scales, zeros, bits, g, k, dtype=torch.float16)
    packed_bytes = qweight.numel() * 4 + scales.numel() * 2 + zeros.numel() * 2
    lines = []
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        ours = functools.partial(torch.ops.hf_decoupleq.matmul, x, qweight, scales, zeros, bits, g, k)
        dense = functools.partial(torch.matmul, x, w16.T)
        y = ours()  # the first call autotunes
        ref = dense().float()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        t_ours = triton.testing.do_bench(ours, rep=rep) * 1e-3
        t_dense = triton.testing.do_bench(dense, rep=rep) * 1e-3
        flops = 2.0 * m * n_out * k
        io = (m * k + m * n_out) * 2
        lines.append(
            f"{bits:>4} {n_out:>6} {k:>6} {m:>5} | {t_dense * 1e6:>10.1f} {flops / t_dense / 1e12:>8.1f} "
            f"{(n_out * k * 2 + io) / t_dense / 1e9:>7.0f} | {t_ours * 1e6:>9.1f} "
            f"{flops / t_ours / 1e12:>8.1f} {(packed_bytes + io) / t_ours / 1e9:>7.0f} | "
            f"{t_dense / t_ours:>6.2f}x {err:>8.1e}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2], choices=[2, 3, 4, 8])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["7b", "70b"], choices=sorted(SHAPES))
    parser.add_argument("--m", type=int, nargs="+", default=list(DEFAULT_M))
    parser.add_argument("--rep", type=int, default=100, help="timing window in ms for triton.testing.do_bench")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure here.")
    try:
        import triton.testing
    except ImportError:
        sys.exit("bench_kernels.py needs triton (pip install triton)")

    import hf_decoupleq.kernels  # noqa: F401  (registers torch.ops.hf_decoupleq.*)

    from hf_decoupleq.packing import effective_group_size

    device = "cuda"
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    header = (
        f"{'bits':>4} {'N':>6} {'K':>6} {'M':>5} | {'cuBLAS us':>10} {'TFLOP/s':>8} {'GB/s':>7} | "
        f"{'ours us':>9} {'TFLOP/s':>8} {'GB/s':>7} | {'speedup':>7} {'rel.err':>8}"
    )
    for bits in args.bits:
        print(f"\nW{bits} group_size={args.group_size} (fp16 activations, fp32 accumulation)")
        print(header)
        for model in args.models:
            for n_out, k in SHAPES[model]:
                g = effective_group_size(k, args.group_size)
                for line in _bench_shape(n_out, k, bits, g, args.m, args.rep, device):
                    print(line)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
