"""Ahead-of-time compilation of every kernel configuration for NVIDIA GPUs, without a GPU.

Each compilation is ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch,
32))`` with exactly the arguments a launch passes: the launchers' own ``kernel_args`` on meta-device tensors of a
Llama-7B layer (4096 x 4096), specialized the way Triton's runtime specializes them (16-byte aligned pointers,
integers divisible by 16, unit strides folded to constants). ``ptxas -v`` (the copy inside the triton wheel, run by
Triton's own compiler) reports registers, spills and the stack frame of each; the compiled metadata gives the shared
memory. Every record is one JSON line.

Usage::

    python -m hf_decoupleq.kernels.aot --arch 80,90 --json report.jsonl            # the full sweep
    python -m hf_decoupleq.kernels.aot --subset ci --jobs 2 --fail-on-decode-spills  # what CI runs

The full sweep is every autotune configuration of every kernel x bits 2/3/4 x group sizes 32/64/128 x fp16/bf16
activations (decode: both column tiles, one token and a full tile, one split and several; Hadamard: every block
size, one row and a full tile). It exits non-zero when a compilation fails (and, with
``--fail-on-decode-spills``, when a decode configuration spills registers).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from .configs import (
    DECODE_BLOCK_N,
    DEQUANT_CONFIG,
    GEMM_CONFIGS,
    MAX_DECODE_M,
    TileConfig,
    decode_configs,
    hadamard_launch,
)

logger = logging.getLogger(__name__)

__all__ = ["Job", "ci_jobs", "compile_job", "full_jobs", "main", "summarize"]

KERNELS = ("gemm", "gemv", "dequant", "hadamard")
DTYPES = ("fp16", "bf16")
# A Llama-7B projection: every dimension a multiple of 16, like the layers of common LLMs.
N_OUT, K_IN = 4096, 4096
PREFILL_M = 2048
# Shared memory one block may use (bytes): A100 (sm_80) and H100/H200 (sm_90).
MAX_SHARED = {80: 166912, 90: 232448}
HADAMARD_BLOCKS = tuple(2**i for i in range(1, 13))

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Job:
    """One compilation: a kernel, a target, an activation dtype and a configuration."""

    kernel: str
    arch: int
    dtype: str
    config: TileConfig
    bits: int | None = None
    group_size: int | None = None
    variant: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "arch": self.arch,
            "dtype": self.dtype,
            "bits": self.bits,
            "group_size": self.group_size,
            "config": self.config.label(),
            "num_warps": self.config.num_warps,
            "num_stages": self.config.num_stages,
            **self.variant,
        }


def _packed_jobs(archs, bits_list, groups, dtypes, kernels, splits=(1, 4)) -> list[Job]:
    jobs = []
    for arch, bits, g, dtype in itertools.product(archs, bits_list, groups, dtypes):
        common = {"arch": arch, "dtype": dtype, "bits": bits, "group_size": g}
        if "gemm" in kernels:
            jobs += [Job("gemm", config=c, **common) for c in GEMM_CONFIGS]
        if "gemv" in kernels:
            for bn, bm, split in itertools.product(DECODE_BLOCK_N, (1, MAX_DECODE_M), splits):
                for c in decode_configs(bn, g):
                    jobs.append(Job("gemv", config=c, variant={"BLOCK_N": bn, "M": bm, "SPLIT_K": split}, **common))
        if "dequant" in kernels:
            jobs.append(Job("dequant", config=DEQUANT_CONFIG, **common))
    return jobs


def _hadamard_jobs(archs, dtypes, blocks=HADAMARD_BLOCKS, rows=(1, PREFILL_M)) -> list[Job]:
    jobs = []
    for arch, dtype, b, m in itertools.product(archs, dtypes, blocks, rows):
        block_m, warps = hadamard_launch(m, b)
        cfg = TileConfig({"BLOCK_M": block_m}, warps, 1)
        jobs.append(Job("hadamard", arch, dtype, cfg, variant={"BLOCK": b, "M": m}))
    return jobs


def full_jobs(archs, bits_list=(2, 3, 4), groups=(32, 64, 128), dtypes=DTYPES, kernels=KERNELS) -> list[Job]:
    """Every configuration of the chosen kernels for every combination of the arguments."""
    jobs = _packed_jobs(archs, bits_list, groups, dtypes, kernels)
    if "hadamard" in kernels:
        jobs += _hadamard_jobs(archs, dtypes)
    return jobs


def ci_jobs() -> list[Job]:
    """A representative subset for CI: every decode configuration at 3 bits (the most registers) for sm_90 (g = 128,
    every candidate, several splits) and sm_80 (g = 32, one split), plus one prefill tile, the dequantize kernel and
    the widest Hadamard block."""
    jobs = _packed_jobs((90,), (3,), (128,), ("bf16",), ("gemv",), splits=(4,))
    jobs += _packed_jobs((80,), (3,), (32,), ("fp16",), ("gemv",), splits=(1,))
    jobs.append(Job("gemm", 90, "bf16", GEMM_CONFIGS[2], bits=3, group_size=32))
    jobs.append(Job("dequant", 80, "fp16", DEQUANT_CONFIG, bits=3, group_size=64))
    jobs += _hadamard_jobs((90,), ("bf16",), blocks=(4096,), rows=(1,))
    return jobs


# --------------------------------------------------------------------------------------------- compiling one job
def _kernel_and_args(job: Job) -> tuple[Any, dict[str, Any]]:
    """The JIT function and its full argument dict (runtime values and constexprs) for one job."""
    import torch

    from hf_decoupleq.format import num_groups, packed_rows

    from . import dequant, gemm, gemv, hadamard
    from ._common import PackedLayer
    from ._tiles import FORMAT_HEURISTICS

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[job.dtype]

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    if job.kernel == "hadamard":
        b, m = job.variant["BLOCK"], job.variant["M"]
        x = empty(m, 3 * b)  # an odd multiple of the block: its Hadamard block is b
        args = hadamard.kernel_args(x, empty(3 * b, dt=torch.int8), empty(m, 3 * b), b)
        return hadamard.KERNEL, {**args, **job.config.meta}
    groups = num_groups(K_IN, job.group_size)
    layer = PackedLayer.validate(
        empty(packed_rows(K_IN, job.bits), N_OUT, dt=torch.int32),
        empty(groups, N_OUT),
        empty(groups, N_OUT),
        job.bits,
        job.group_size,
        K_IN,
    )
    if job.kernel == "gemm":
        fn, args = gemm.KERNEL, gemm.kernel_args(empty(PREFILL_M, K_IN), layer, empty(PREFILL_M, N_OUT))
    elif job.kernel == "gemv":
        m, split = job.variant["M"], job.variant["SPLIT_K"]
        out = empty(split, m, N_OUT, dt=dtype if split == 1 else torch.float32)
        fn, args = gemv.KERNEL, gemv.kernel_args(empty(m, K_IN), layer, out, job.variant["BLOCK_N"])
    else:
        fn, args = dequant.KERNEL, dequant.kernel_args(layer, empty(N_OUT, K_IN))
    args.update(job.config.meta)
    args.update({name: rule(args) for name, rule in FORMAT_HEURISTICS.items() if name in fn.arg_names})
    return fn, args


def _specialize(fn: Any, args: dict[str, Any], backend: Any) -> tuple[dict, dict, dict]:
    """``signature``, ``constexprs`` and ``attrs`` as Triton's runtime derives them from these argument values."""
    from triton._C.libtriton import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = args[param.name]
        if param.is_constexpr:
            kind, attr = "constexpr", None
        else:
            kind, attr = native_specialize_impl(type(backend), value, False, True, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = value
        elif attr:
            attrs[(i,)] = backend.parse_attr(attr)
    return signature, constexprs, attrs


def _ptxas_stats(log: str, ptx: str, arch: int) -> dict[str, int]:
    """Registers, spills and stack frame from ``ptxas -v`` (Triton's log, or a run of the bundled ptxas)."""
    if not _REGS.search(log):
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"]
            log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs, spills = _REGS.search(log), _SPILLS.search(log)
    return {
        "registers": int(regs.group(1)),
        "stack_frame": int(spills.group(1)),
        "spill_stores": int(spills.group(2)),
        "spill_loads": int(spills.group(3)),
    }


def compile_job(job: Job) -> dict[str, Any]:
    """Compile one job; its record (``ok`` False with the error when the compilation fails)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    record = job.record()
    start = time.perf_counter()
    try:
        target = GPUTarget("cuda", job.arch, 32)
        fn, args = _kernel_and_args(job)
        signature, constexprs, attrs = _specialize(fn, args, make_backend(target))
        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v output to stdout
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(fn, signature, constexprs, attrs),
                target=target,
                options={"num_warps": job.config.num_warps, "num_stages": job.config.num_stages},
            )
        stats = _ptxas_stats(log.getvalue(), kernel.asm["ptx"], job.arch)
        shared = kernel.metadata.shared
        record.update(ok=True, shared=shared, fits_shared=shared <= MAX_SHARED.get(job.arch, shared), **stats)
    except Exception as e:  # noqa: BLE001  (a compile error is a result here, reported in the record)
        record.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
    record["compile_s"] = round(time.perf_counter() - start, 3)
    return record


# --------------------------------------------------------------------------------------------------- the sweep
def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, failures, register and shared-memory maxima and every spilling configuration, per kernel."""
    out: dict[str, Any] = {"compilations": len(records), "failed": sum(not r["ok"] for r in records), "kernels": {}}
    for name in sorted({r["kernel"] for r in records}):
        rs = [r for r in records if r["kernel"] == name]
        ok = [r for r in rs if r["ok"]]
        top = max(ok, key=lambda r: r["registers"], default=None)
        out["kernels"][name] = {
            "compilations": len(rs),
            "failed": len(rs) - len(ok),
            "archs": sorted({r["arch"] for r in rs}),
            "max_registers": top and top["registers"],
            "max_registers_at": top and {k: top[k] for k in ("arch", "dtype", "bits", "group_size", "config")},
            "max_shared": max((r["shared"] for r in ok), default=None),
            "over_shared_limit": sum(not r["fits_shared"] for r in ok),
            "with_spills": [
                {k: r.get(k) for k in ("arch", "dtype", "bits", "group_size", "config", "spill_stores", "M")}
                for r in ok
                if r["spill_stores"] or r["spill_loads"]
            ],
            "compile_s_total": round(sum(r["compile_s"] for r in rs), 1),
            "compile_s_max": max(r["compile_s"] for r in rs),
        }
    return out


def run_jobs(jobs: list[Job], workers: int, sink: Any = None) -> list[dict[str, Any]]:
    """Compile ``jobs`` in a process pool (each compilation is single-threaded Python plus ptxas); each record is
    also written to ``sink`` (a text file) as one JSON line as soon as it is done."""
    records = []
    with concurrent.futures.ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.map(compile_job, jobs, chunksize=2) if pool else map(compile_job, jobs)
        for record in results:
            records.append(record)
            if sink is not None:
                sink.write(json.dumps(record, sort_keys=True) + "\n")
                sink.flush()
    return records


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=_csv_ints, default=(80, 90), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--bits", type=_csv_ints, default=(2, 3, 4))
    parser.add_argument("--group-sizes", type=_csv_ints, default=(32, 64, 128))
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="activation dtypes: fp16,bf16")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"subset of {','.join(KERNELS)}")
    parser.add_argument("--subset", choices=["ci"], help="the representative CI subset instead of the full sweep")
    parser.add_argument("--json", help="write one JSON line per compilation to this file")
    parser.add_argument("--summary", help="write the summary (JSON) to this file as well as to stdout")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="parallel compilations")
    parser.add_argument("--fail-on-decode-spills", action="store_true", help="exit 1 if a decode config spills")
    parser.add_argument(
        "--cache-dir",
        help="compile into this Triton cache (default: a fresh temporary one, so that every job really compiles); "
        "'default' is Triton's own cache, which makes the sweep a parallel warm-up of later launches",
    )
    args = parser.parse_args(argv)

    # The kernels must be real JIT functions, not the interpreter's: refuse if they were imported under it.
    imported = any(f"{__package__}.{m}" in sys.modules for m in ("gemm", "gemv", "dequant", "hadamard", "_tiles"))
    if imported and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("the kernels were imported under TRITON_INTERPRET=1; run this in a fresh process")
    os.environ["TRITON_INTERPRET"] = "0"
    if args.subset == "ci":
        jobs = ci_jobs()
    else:
        kernels = tuple(args.kernels.split(","))
        jobs = full_jobs(args.arch, args.bits, args.group_sizes, tuple(args.dtypes.split(",")), kernels)
    # A fresh cache by default: every job really compiles (and ptxas reports on it).
    with tempfile.TemporaryDirectory(prefix="hf-decoupleq-aot-") as cache, contextlib.ExitStack() as stack:
        if args.cache_dir != "default":
            os.environ["TRITON_CACHE_DIR"] = args.cache_dir or cache
        sink = stack.enter_context(open(args.json, "w")) if args.json else None
        start = time.perf_counter()
        records = run_jobs(jobs, args.jobs, sink)
        wall = time.perf_counter() - start
    summary = {**summarize(records), "wall_s": round(wall, 1), "jobs": args.jobs, **_versions()}
    text = json.dumps(summary, indent=1, sort_keys=True)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(text + "\n")
    sys.stdout.write(text + "\n")  # the command's product (read by tests/test_aot.py and aot_sweep.sh)
    for r in records:
        if not r["ok"]:
            where = {k: v for k, v in r.items() if k != "error"}
            logger.error("FAILED %s: %s", json.dumps(where), r["error"][-500:])
    decode_spills = summary["kernels"].get("gemv", {}).get("with_spills", [])
    if summary["failed"] or (args.fail_on_decode_spills and decode_spills):
        return 1
    return 0


def _versions() -> dict[str, str]:
    import torch
    import triton

    return {"triton": triton.__version__, "torch": torch.__version__}


if __name__ == "__main__":
    sys.exit(main())
