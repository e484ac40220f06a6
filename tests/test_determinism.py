"""Determinism: the same inputs and settings give bit-identical packed tensors in separate processes (different hash
seeds) at the same thread count. A different thread count changes the summation order of float matrix products,
so bit-identity across thread counts is not claimed (on a hidden-512 Llama, 1 vs 2 threads changed about half of
the packed words); the result's quality does not depend on it, which is checked here (tiny random Llama, CPU)."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

WORKER = r"""
import json, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
sys.path.insert(0, sys.argv[2])
from test_determinism import quantize_and_digest
print(json.dumps(quantize_and_digest()))
"""


def quantize_and_digest() -> dict:
    """Quantize a tiny Llama (block-wise stage and incoherence on) and describe the result by sha256 per tensor."""
    import torch
    from conftest import build_tiny_model, small_config

    from hf_decoupleq import DecoupleQLinear, pipeline

    model = build_tiny_model("llama", vocab_size=128)
    data = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    config = small_config(dataset=data, seq_len=32)
    stats = pipeline.quantize_model(model, config)
    digests = {}
    for name, module in model.named_modules():
        if isinstance(module, DecoupleQLinear):
            for key, tensor in module.state_dict().items():
                raw = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                digests[f"{name}.{key}"] = hashlib.sha256(raw).hexdigest()
    return {"threads": torch.get_num_threads(), "digests": digests, "loss": stats["mean_layerwise_loss"],
            "packed_modules": config.packed_modules}


def run(threads: int, hash_seed: int) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "OMP_NUM_THREADS": str(threads)}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(threads), tests_dir], capture_output=True, text=True, env=env,
        cwd=tests_dir, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        here = quantize_and_digest()
    finally:
        torch.set_num_threads(before)
    return {"here, 2 threads": here, "other process, 2 threads": run(2, 1), "other process, 1 thread": run(1, 2)}


def test_same_inputs_give_identical_tensors_across_processes(runs):
    a, b = runs["here, 2 threads"], runs["other process, 2 threads"]
    assert a["threads"] == b["threads"] == 2
    assert len(a["digests"]) == 2 * 7 * 4  # qweight, scales, zeros, hadamard_signs per layer
    assert a["digests"] == b["digests"]
    assert a["packed_modules"] == b["packed_modules"]


def test_thread_count_does_not_change_the_result_beyond_rounding(runs):
    a, c = runs["here, 2 threads"], runs["other process, 1 thread"]
    assert c["threads"] == 1
    assert a["digests"].keys() == c["digests"].keys() and a["packed_modules"] == c["packed_modules"]
    assert c["loss"] == pytest.approx(a["loss"], rel=0.05)
