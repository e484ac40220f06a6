"""Model card rendering: metadata parses, settings and numbers appear, the usage snippet is runnable Python."""

import ast
import json
import math
import re

import pytest
import torch
from huggingface_hub import ModelCard

from hf_decoupleq.errors import DecoupleQConfigError
from hf_decoupleq.evaluation import PerplexityResult
from hf_decoupleq.hub.card import render_model_card, template_text

NESTED = {
    "quant_method": "decoupleq",
    "bits": 2,
    "group_size": 64,
    "symmetric": False,
    "act_order": True,
    "rounds": 3,
    "damp": 0.01,
    "true_sequential": True,
    "format_version": 1,
    "some_future_option": {"x": 1},
    "blockwise": {"epochs": 4, "lr": 1e-5, "train_norms": True, "train_bias": False},
    "calibration": {"dataset": "c4", "num_samples": 128, "seq_len": 2048, "seed": 7},
}


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.DOTALL)


def _lines(card) -> set[str]:
    return {line.strip() for line in card.text.splitlines()}


def test_metadata_parses_back():
    card = render_model_card(NESTED, base_model="HuggingFaceTB/SmolLM2-135M", repo_id="me/smol-w2")
    reparsed = ModelCard(str(card))  # the YAML header survives a round trip through text
    for data in (card.data, reparsed.data):
        assert data.library_name == "transformers"
        assert data.pipeline_tag == "text-generation"
        assert data.base_model == "HuggingFaceTB/SmolLM2-135M"
        assert {"decoupleq", "2-bit", "quantized"} <= set(data.tags)
        assert data.datasets == ["allenai/c4"]
        assert data.to_dict()["base_model_relation"] == "quantized"


def test_settings_and_calibration_are_listed():
    lines = _lines(render_model_card(NESTED, base_model="org/base"))
    for expected in [
        "- Bits: 2",
        "- Group size: 64",
        "- Symmetric: no",
        "- Activation order (GPTQ rounding): yes",
        "- Alternation rounds: 3",
        "- Hessian dampening: 0.01",
        "- True-sequential: yes",
        "- Block-wise epochs: 4",
        "- Block-wise learning rate: 1e-05",
        "- Number of samples: 128",
        "- Sequence length (tokens): 2048",
        "- Seed: 7",
        "- Checkpoint format version: 1",
    ]:
        assert expected in lines, expected
    assert any(line.startswith("- Dataset: `c4`") for line in lines)
    assert not any("some_future_option" in line for line in lines)


def test_flat_config_and_config_objects():
    class Cfg:
        def to_dict(self):
            return {"bits": 3, "group_size": -1, "blockwise_epochs": 2, "dataset": "wikitext2", "num_samples": 16}

    lines = _lines(render_model_card(Cfg(), base_model=None))
    assert "- Bits: 3" in lines
    assert "- Group size: per-channel (one group per output row)" in lines
    assert "- Block-wise epochs: 2" in lines
    assert "- Number of samples: 16" in lines
    assert any(line.startswith("- Dataset: `wikitext2`") for line in lines)


def test_missing_keys_are_omitted():
    card = render_model_card({"bits": 4}, base_model=None)
    text = card.text
    assert "- Bits: 4" in _lines(card)
    for absent in ("Group size", "## Calibration data", "## Size", "## Evaluation", "Alternation rounds"):
        assert absent not in text
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert {"decoupleq", "4-bit", "quantized"} <= set(card.data.tags)


def test_blockwise_off_and_local_dataset_path_hidden():
    cfg = {"bits": 2, "blockwise": None, "calibration": {"dataset": "/home/alice/secret/calib.jsonl"}}
    card = render_model_card(cfg, base_model="org/base")
    assert "- Block-wise refinement: off" in _lines(card)
    assert "calib.jsonl" in card.text and "/home/alice" not in card.text
    assert card.data.datasets is None


def test_sizes_and_ratio():
    lines = _lines(
        render_model_card(NESTED, base_model="o/b", quantized_size_bytes=3 << 20, original_size_bytes=12 << 20)
    )
    assert "- Quantized checkpoint: 3.00 MiB (3,145,728 bytes)" in lines
    assert "- Original checkpoint: 12.00 MiB (12,582,912 bytes)" in lines
    assert "- Compression: 4.00x smaller" in lines
    lines = _lines(render_model_card(NESTED, base_model="o/b", quantized_size_bytes=1000))
    assert "- Quantized checkpoint: 1,000 bytes" in lines and not any("Compression" in line for line in lines)
    with pytest.raises(DecoupleQConfigError, match="quantized_size_bytes"):
        render_model_card(NESTED, base_model="o/b", quantized_size_bytes=-1)


def test_eval_table():
    res = PerplexityResult(ppl=9.4912, nll=2.2504, n_tokens=81880, n_windows=40)
    card = render_model_card(
        NESTED, base_model="o/b", eval_results={"WikiText-2 ppl, fp16": 5.68, "WikiText-2 W2": res, "a|b": 1}
    )
    lines = _lines(card)
    assert "| WikiText-2 ppl, fp16 | 5.68 |" in lines
    assert "| WikiText-2 W2 (ppl) | 9.49 |" in lines
    assert "| WikiText-2 W2 (n_windows) | 40 |" in lines
    assert "| a\\|b | 1 |" in lines


@pytest.mark.parametrize("repo_id", ["me/smol-w2", None, "odd\"name's"])
def test_usage_snippet_imports_plugin_first_and_compiles(repo_id):
    card = render_model_card(NESTED, base_model="o/b", repo_id=repo_id)
    blocks = _code_blocks(card.text, "python")
    assert len(blocks) == 1
    code = blocks[0]
    compile(code, "<model card usage>", "exec")
    lines = code.splitlines()
    plugin = next(i for i, line in enumerate(lines) if line.startswith("import hf_decoupleq"))
    assert plugin < min(i for i, line in enumerate(lines) if "from_pretrained" in line)
    # The model id in the snippet is exactly the repo id (or a placeholder when there is none).
    assigned = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Assign) and n.targets[0].id == "model_id"]
    assert ast.literal_eval(assigned[0].value) == (repo_id or "path/to/this-model")
    assert "silently loads random weights" in card.text


def test_template_is_package_data():
    text = template_text()
    assert text.startswith("---\n{{ card_data }}\n---")
    assert "{{ usage_code }}" in text


def test_template_falls_back_to_the_repository_folder(monkeypatch):
    import importlib.resources

    installed = template_text()

    def not_installed(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", not_installed)
    assert template_text() == installed


def test_bad_config_type():
    with pytest.raises(DecoupleQConfigError, match="quant_config"):
        render_model_card(42, base_model=None)


def _record(quantized=51.08, original=20.57, n_windows=40, seq_len=2048):
    from hf_decoupleq.evaluation import perplexity_record

    n_tokens = n_windows * (seq_len - 1)
    q = PerplexityResult(ppl=quantized, nll=math.log(quantized), n_tokens=n_tokens, n_windows=n_windows)
    o = None if original is None else PerplexityResult(original, math.log(original), n_tokens, n_windows)
    return perplexity_record(q, o, dataset="wikitext2 (test split)", seq_len=seq_len, command="decoupleq quantize x")


def test_quality_section_carries_the_figures_and_their_protocol():
    card = render_model_card(NESTED, base_model="o/b", eval_results={"perplexity": _record(), "other": 3.5})
    text = card.text
    section = text.split("## Quality", 1)[1].split("\n## ", 1)[0]
    assert "Perplexity on `wikitext2 (test split)`: **51.08** quantized, 20.57 for the original model" in section
    assert f"({51.08 / 20.57:.2f}x)" in section
    assert "40 non-overlapping windows of 2048 tokens" in section and f"over {40 * 2047} predicted tokens" in section
    assert "Measured by `decoupleq quantize x`." in section
    # The record is not flattened into the evaluation table; plain numbers still are.
    assert "| other | 3.50 |" in _lines(card) and "(protocol)" not in text
    # Sections come in the template's order.
    assert text.index("## Quantization settings") < text.index("## Quality") < text.index("## Evaluation") < text.index("## Usage")


def test_quality_section_without_original_and_absent_without_record():
    text = render_model_card(NESTED, base_model="o/b", eval_results={"ppl": _record(original=None)}).text
    assert "**51.08** quantized." in text and "original model" not in text
    assert "## Quality" not in render_model_card(NESTED, base_model="o/b", eval_results={"x": 1.0}).text


def test_perplexity_record_refuses_results_on_different_text():
    from hf_decoupleq.evaluation import perplexity_record

    a, b = PerplexityResult(10.0, 2.3, 300, 3), PerplexityResult(9.0, 2.2, 200, 2)
    with pytest.raises(DecoupleQConfigError, match="different text"):
        perplexity_record(a, b, dataset="d", seq_len=101)


def _reference_ppl(model, ids, seq_len, windows):
    """exp(mean NLL) of the first `windows` non-overlapping windows, each scored alone, in float64."""
    nll = 0.0
    with torch.no_grad():
        for w in range(windows):
            x = ids[seq_len * w : seq_len * (w + 1)]
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
            nll -= logp[torch.arange(seq_len - 1), x[1:]].sum().item()
    return math.exp(nll / (windows * (seq_len - 1)))


def test_cli_eval_dataset_writes_measured_quality_and_tied_size_into_the_card(tiny_checkpoint, tmp_path):
    from conftest import WIKI_TEST, WIKI_VALID
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_decoupleq import cli

    src, out = tiny_checkpoint("qwen2"), tmp_path / "q"  # Qwen2 ties its embeddings and lm_head
    argv = ["quantize", str(src), "-o", str(out), "--group-size", "16", "--dataset", str(WIKI_VALID),
            "--num-samples", "4", "--seq-len", "32", "--rounds", "1", "--blockwise-epochs", "0",
            "--eval-dataset", str(WIKI_TEST), "--eval-seq-len", "32", "--eval-windows", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(WIKI_TEST.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    original = _reference_ppl(AutoModelForCausalLM.from_pretrained(src), ids, 32, 2)
    quantized = _reference_ppl(AutoModelForCausalLM.from_pretrained(out), ids, 32, 2)
    stats = json.loads((out / "config.json").read_text())["quantization_config"]["quantization_stats"]
    record = stats["eval"]["perplexity"]
    assert (record["original"], record["quantized"]) == pytest.approx((original, quantized), rel=1e-4)
    assert record["dataset"] == "wiki.test.raw" and "/" not in record["command"]
    card = (out / "README.md").read_text()
    assert f"**{quantized:.2f}** quantized, {original:.2f} for the original model" in card
    assert "2 non-overlapping windows of 32 tokens" in card
    # The original size is what its checkpoint stores: every tensor of the safetensors file, the tied one once.
    stored = sum(t.numel() * t.element_size() for t in load_file(src / "model.safetensors").values())
    line = next(line for line in card.splitlines() if line.startswith("- Original checkpoint:"))
    assert line.endswith(f"({stored:,} bytes)")
    assert stats["original_size_bytes"] == stored
