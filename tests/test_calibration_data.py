"""Calibration windows: sources, seeded sampling, errors, and data-free sampling from the model."""

import json

import pytest
import torch
from conftest import build_small_llama

from hf_decoupleq.calibration import data
from hf_decoupleq.calibration.data import get_calibration_windows, resolve_tokenizer, sample_windows
from hf_decoupleq.errors import DecoupleQDataError

WORDS = [f"w{i}" for i in range(40)]


def _tokenizer(with_bos: bool = True):
    """A word-level tokenizer built offline; prepends <s> when with_bos, like Llama's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>" if with_bos else None, eos_token="</s>"
    )


def _texts(n_docs: int = 6, words_per_doc: int = 30, seed: int = 1) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words_per_doc,), generator=g)) for _ in range(n_docs)
    ]


def _is_slice(window: torch.Tensor, seq: torch.Tensor) -> bool:
    """Brute force: does ``window`` occur contiguously in ``seq``?"""
    L = window.numel()
    return any(torch.equal(seq[s : s + L], window) for s in range(seq.numel() - L + 1))


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def test_text_windows_are_slices_of_the_single_tokenization(tok):
    texts = _texts()
    ref = tok("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    assert ref[0].item() == 1  # one BOS, at the very start: the text was tokenized once
    out = get_calibration_windows(texts, tok, num_samples=5, seq_len=16, seed=3)
    assert out.shape == (5, 16) and out.dtype == torch.long
    for w in out:
        assert _is_slice(w, ref)
    # BOS only at the start -> windows starting elsewhere carry no BOS.
    assert (out[:, 1:] != 1).all()


def test_same_seed_same_windows_other_seed_other_windows(tok):
    texts = _texts(n_docs=10)
    a = get_calibration_windows(texts, tok, num_samples=6, seq_len=12, seed=7)
    b = get_calibration_windows(texts, tok, num_samples=6, seq_len=12, seed=7)
    c = get_calibration_windows(texts, tok, num_samples=6, seq_len=12, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_windows_are_distinct_positions_when_enough_exist(tok):
    ids = torch.arange(100)
    out = sample_windows([ids], num_samples=50, seq_len=10, seed=0)
    starts = out[:, 0].tolist()
    assert len(set(starts)) == 50
    assert all(torch.equal(w, torch.arange(s, s + 10)) for w, s in zip(out, starts, strict=True))


def test_repeats_can_be_refused():
    rows = torch.arange(8 * 6).view(8, 6)
    with pytest.raises(DecoupleQDataError, match="8 distinct windows of 6 tokens, fewer than num_samples=9"):
        get_calibration_windows(rows, num_samples=9, seq_len=6, seed=0, allow_repeats=False)
    assert get_calibration_windows(rows, num_samples=9, seq_len=6, seed=0).shape == (9, 6)  # repeats by default
    out = get_calibration_windows(rows, num_samples=8, seq_len=6, seed=0, allow_repeats=False)
    assert sorted(map(tuple, out.tolist())) == sorted(map(tuple, rows.tolist()))


def test_a_larger_draw_from_a_file_starts_with_the_smaller_one(tok, tmp_path):
    """The end-to-end stage's e2e_samples windows begin with the block-wise stages' num_samples windows."""
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(_texts(n_docs=10)), encoding="utf-8")
    small = get_calibration_windows(str(path), tok, num_samples=6, seq_len=12, seed=3)
    large = get_calibration_windows(str(path), tok, num_samples=9, seq_len=12, seed=3, allow_repeats=False)
    assert torch.equal(large[:6], small)
    assert len(set(map(tuple, large.tolist()))) == 9


def test_tensor_rows_exactly_seq_len_are_each_used_once():
    rows = torch.arange(8 * 6).view(8, 6)
    out = get_calibration_windows(rows, num_samples=8, seq_len=6, seed=0)
    assert sorted(map(tuple, out.tolist())) == sorted(map(tuple, rows.tolist()))


def test_tensor_rows_longer_than_window_never_cross_rows():
    rows = torch.arange(4 * 20).view(4, 20)
    out = get_calibration_windows(rows, num_samples=30, seq_len=7, seed=5)
    for w in out:
        r = w[0].item() // 20
        assert torch.equal(w, rows[r, w[0].item() % 20 :][:7]) and w[-1].item() // 20 == r


def test_short_rows_are_concatenated():
    rows = [torch.arange(0, 3), torch.arange(3, 8), torch.arange(8, 12)]
    out = get_calibration_windows(rows, num_samples=4, seq_len=6, seed=2)
    flat = torch.arange(12)
    for w in out:
        assert _is_slice(w, flat)


def test_dict_and_batch_encoding_input_ids(tok):
    ids = torch.arange(60).view(2, 30)
    a = get_calibration_windows({"input_ids": ids}, num_samples=3, seq_len=10, seed=4)
    b = get_calibration_windows(ids, num_samples=3, seq_len=10, seed=4)
    enc = tok(_texts(n_docs=2), return_tensors="pt")
    c = get_calibration_windows(enc, num_samples=3, seq_len=10, seed=4)
    d = get_calibration_windows(enc["input_ids"], num_samples=3, seq_len=10, seed=4)
    assert torch.equal(a, b) and torch.equal(c, d)


def test_int_lists_and_tokenized_dataset_column():
    import datasets

    rows = [list(range(15)), list(range(15, 30))]
    want = get_calibration_windows([torch.tensor(r) for r in rows], num_samples=5, seq_len=6, seed=3)
    assert torch.equal(get_calibration_windows(rows, num_samples=5, seq_len=6, seed=3), want)
    ds = datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * 15] * 2})
    assert torch.equal(get_calibration_windows(ds, num_samples=5, seq_len=6, seed=3), want)


@pytest.mark.parametrize("fmt", ["txt", "raw", "tokens", "jsonl", "json_records", "json_columns", "parquet"])
def test_local_files_match_in_memory_text(tok, tmp_path, fmt):
    texts = _texts(n_docs=3)
    if fmt in ("txt", "raw", "tokens"):
        path = tmp_path / f"data.{fmt}"
        path.write_text("\n\n".join(texts), encoding="utf-8")
    elif fmt == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)), encoding="utf-8")
    elif fmt == "json_records":
        path = tmp_path / "data.json"
        path.write_text(json.dumps([{"body": t} for t in texts]), encoding="utf-8")
    elif fmt == "json_columns":
        path = tmp_path / "data.json"
        path.write_text(json.dumps({"body": texts}), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "data.parquet"
        pq.write_table(pa.table({"body": texts, "n": list(range(len(texts)))}), path)
    got = get_calibration_windows(str(path), tok, num_samples=4, seq_len=8, seed=1, text_column="body")
    want = get_calibration_windows(texts, tok, num_samples=4, seq_len=8, seed=1)
    assert torch.equal(got, want)


def test_datasets_dataset_column(tok):
    import datasets

    texts = _texts(n_docs=4)
    ds = datasets.Dataset.from_dict({"content": texts, "x": list(range(4))})
    got = get_calibration_windows(ds, tok, num_samples=3, seq_len=8, seed=9, text_column="content")
    assert torch.equal(got, get_calibration_windows(texts, tok, num_samples=3, seq_len=8, seed=9))
    with pytest.raises(DecoupleQDataError, match="'text'.*content"):
        get_calibration_windows(ds, tok, num_samples=3, seq_len=8)


@pytest.mark.parametrize(
    "name, args, kwargs",
    [
        ("wikitext2", ("wikitext", "wikitext-2-raw-v1"), {"split": "train"}),
        ("c4", ("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"}),
        ("pile", ("mit-han-lab/pile-val-backup",), {"split": "validation"}),
    ],
)
def test_known_names_go_through_datasets_load_dataset(tok, monkeypatch, name, args, kwargs):
    import datasets

    # A single document, so the document order (shuffled for c4/pile) cannot change the windows.
    texts = [" ".join(_texts(n_docs=3))]
    calls = []

    def fake_load_dataset(*a, **kw):
        calls.append((a, kw))
        return datasets.Dataset.from_dict({"text": texts})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = get_calibration_windows(name, tok, num_samples=4, seq_len=10, seed=2)
    assert calls == [(args, kwargs)]
    assert torch.equal(got, get_calibration_windows(texts, tok, num_samples=4, seq_len=10, seed=2))


def test_document_collections_use_every_document_when_small(tok, monkeypatch):
    import datasets

    # Each document is one repeated word, so a window's words tell which documents it came from.
    texts = [" ".join([w] * 12) for w in WORDS[:5]]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"text": texts}))
    out = get_calibration_windows("pile", tok, num_samples=40, seq_len=12, seed=0)
    seen = {tok.convert_ids_to_tokens(i) for i in out.flatten().tolist()}
    assert set(WORDS[:5]) <= seen <= set(WORDS[:5]) | {"<s>"}


def test_errors_name_the_problem(tok, tmp_path):
    with pytest.raises(DecoupleQDataError, match="empty"):
        get_calibration_windows([], tok, num_samples=1, seq_len=4)
    with pytest.raises(DecoupleQDataError, match="empty"):
        get_calibration_windows(["", "  "], tok, num_samples=1, seq_len=4)
    n = tok("w1 w2 w3", return_tensors="pt")["input_ids"].numel()
    with pytest.raises(DecoupleQDataError, match=rf"{n} tokens.*seq_len=50"):
        get_calibration_windows(["w1 w2 w3"], tok, num_samples=1, seq_len=50)
    missing = tmp_path / "nope.txt"
    with pytest.raises(DecoupleQDataError, match="nope.txt"):
        get_calibration_windows(str(missing), tok, num_samples=1, seq_len=4)
    with pytest.raises(DecoupleQDataError, match="nope.txt"):
        get_calibration_windows(str(missing), None, num_samples=1, seq_len=4)
    with pytest.raises(DecoupleQDataError, match="wikitext2.*c4.*pile"):
        get_calibration_windows("wikitext103", tok, num_samples=1, seq_len=4)
    bad_ext = tmp_path / "data.csv"
    bad_ext.write_text("a,b\n")
    with pytest.raises(DecoupleQDataError, match=r"\.csv.*\.txt.*\.parquet"):
        get_calibration_windows(str(bad_ext), tok, num_samples=1, seq_len=4)
    with pytest.raises(DecoupleQDataError, match="tokenizer"):
        get_calibration_windows(["w1 w2"], None, num_samples=1, seq_len=1)
    with pytest.raises(DecoupleQDataError, match="model"):
        get_calibration_windows("self", tok, num_samples=1, seq_len=4)


def test_unresolvable_tokenizer_name(tmp_path):
    name = str(tmp_path / "no_such_tokenizer")
    with pytest.raises(DecoupleQDataError, match="no_such_tokenizer"):
        resolve_tokenizer(name)
    with pytest.raises(DecoupleQDataError, match="no_such_tokenizer"):
        get_calibration_windows(["w1 w2 w3"], name, num_samples=1, seq_len=2)


def test_tokenizer_folder_is_loaded(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    texts = _texts()
    got = get_calibration_windows(texts, str(tmp_path / "tok"), num_samples=3, seq_len=8, seed=0)
    assert torch.equal(got, get_calibration_windows(texts, tok, num_samples=3, seq_len=8, seed=0))


# ---- data-free: sampled from the model itself ----


def _tiny_llama(vocab_size: int = 43, bos: int | None = 1):
    return build_small_llama(vocab_size, bos).eval()


def _greedy_reference(model, first: torch.Tensor, length: int) -> torch.Tensor:
    """Greedy decoding without a KV cache: a full forward pass per new token."""
    ids = first
    with torch.no_grad():
        while ids.shape[1] < length:
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_self_sampling_starts_at_bos_and_is_seeded(tok):
    model = _tiny_llama()
    model.train()
    a = get_calibration_windows("self", tok, num_samples=5, seq_len=9, seed=1, model=model, generation_batch_size=2)
    b = get_calibration_windows("self", tok, num_samples=5, seq_len=9, seed=1, model=model, generation_batch_size=2)
    c = get_calibration_windows("self", tok, num_samples=5, seq_len=9, seed=2, model=model, generation_batch_size=2)
    assert a.shape == (5, 9) and a.dtype == torch.long
    assert (a[:, 0] == tok.bos_token_id).all()
    assert ((a >= 0) & (a < model.config.vocab_size)).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training  # the training flag is restored


def test_self_sampling_top1_equals_uncached_greedy_decoding(tok):
    model = _tiny_llama()
    got = get_calibration_windows("self", tok, num_samples=2, seq_len=12, seed=0, model=model, top_k=1)
    ref = _greedy_reference(model, torch.full((1, 1), tok.bos_token_id), 12)
    assert torch.equal(got, ref.expand(2, -1))


def test_self_sampling_top_k_restricts_to_the_k_most_likely(tok):
    model = _tiny_llama()
    k = 3
    out = get_calibration_windows("self", tok, num_samples=3, seq_len=8, seed=4, model=model, top_k=k)
    with torch.no_grad():
        logits = model(input_ids=out, use_cache=False).logits
    allowed = logits[:, :-1].topk(k, dim=-1).indices
    assert (allowed == out[:, 1:, None]).any(-1).all()


def test_self_sampling_without_bos_uses_a_seeded_random_first_token():
    model = _tiny_llama(bos=None)
    tok = _tokenizer(with_bos=False)
    a = get_calibration_windows("self", tok, num_samples=6, seq_len=4, seed=3, model=model)
    b = get_calibration_windows("self", tok, num_samples=6, seq_len=4, seed=3, model=model)
    assert torch.equal(a, b)
    assert len(set(a[:, 0].tolist())) > 1


def test_self_sampling_passes_the_cache_as_the_model_expects(tok):
    """transformers 5.24 takes the KV cache as `cache` and warns on `past_key_values` at every call."""
    import inspect
    import warnings

    model = _tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = get_calibration_windows("self", tok, num_samples=2, seq_len=6, seed=0, model=model)
    assert out.shape == (2, 6)
    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert data._cache_argument(model) == expected


def test_self_sampling_batches_as_many_sequences_as_the_cache_budget_allows(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _tiny_llama()  # 2 layers, 2 KV heads of 8 dims, float32: 256 bytes of cache per token
    assert data._generation_batch_size(model, num_samples=100, seq_len=64) == 32
    assert data._generation_batch_size(model, num_samples=5, seq_len=64) == 5
    big = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    # 1 layer, 1 KV head of 8 dims, float32: 64 bytes per token; a 4 GiB budget then holds 2**26 / seq_len sequences.
    assert data._generation_batch_size(big, num_samples=100, seq_len=2**24) == 4
    assert data._generation_batch_size(big, num_samples=100, seq_len=2**27) == 1
    # The default batch gives the same windows as sampling all of them at once, explicitly.
    a = get_calibration_windows("self", tok, num_samples=5, seq_len=7, seed=3, model=model)
    b = get_calibration_windows("self", tok, num_samples=5, seq_len=7, seed=3, model=model, generation_batch_size=5)
    assert torch.equal(a, b)
