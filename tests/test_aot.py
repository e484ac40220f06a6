"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90 on a machine without a GPU.

Runs the CI subset of ``python -m hf_decoupleq.kernels.aot`` (every decode configuration at 3 bits on both targets,
one prefill tile, the dequantize kernel, the widest Hadamard block) in a fresh process without the interpreter, and
fails on a compile error or on a decode configuration that spills registers. The full sweep is
``examples/benchmarks/aot_sweep.sh``."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.isfile(get_ptxas(90).path) and os.path.isfile(get_ptxas(80).path)
    except Exception:  # noqa: BLE001  (no NVIDIA backend in this triton build)
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not available")
def test_ci_subset_compiles_without_decode_spills(tmp_path):
    from hf_decoupleq.kernels.aot import ci_jobs
    from hf_decoupleq.kernels.configs import DECODE_BLOCK_N, decode_configs

    report = tmp_path / "report.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "hf_decoupleq.kernels.aot", "--subset", "ci", "--jobs", "2", "--json", str(report)]
    proc = subprocess.run(
        [*cmd, "--fail-on-decode-spills"], capture_output=True, text=True, env=env, cwd=tmp_path, check=False
    )
    records = [json.loads(line) for line in report.read_text().splitlines()]
    failed = [r for r in records if not r["ok"]]
    assert not failed, failed[0]["error"][-2000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert len(records) == len(ci_jobs())
    assert {(r["kernel"], r["arch"]) for r in records} >= {("gemv", 80), ("gemv", 90)}
    assert {r["kernel"] for r in records} == {"gemm", "gemv", "dequant", "hadamard"}
    for r in records:
        assert 0 < r["registers"] <= 255 and r["fits_shared"]
    decode = [r for r in records if r["kernel"] == "gemv"]
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in decode)
    # Every decode candidate that tuning may pick at g = 128 compiled, for one token and for a full tile.
    for block_n in DECODE_BLOCK_N:
        for m in (1, 16):
            got = {r["config"] for r in decode if r["group_size"] == 128 and r["BLOCK_N"] == block_n and r["M"] == m}
            assert got == {c.label() for c in decode_configs(block_n, 128)}
    summary = json.loads(proc.stdout)
    assert summary["compilations"] == len(records) and summary["failed"] == 0
