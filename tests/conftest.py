"""Shared fixtures. Kernel tests run the Triton kernels through the interpreter when there is no GPU;
TRITON_INTERPRET must be set before triton decorates any kernel, so it is set here, first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_hardware: resolve the 'auto' calibration settings from this machine (see _fixed_hardware)"
    )


@pytest.fixture(autouse=True)
def _fixed_hardware(request, monkeypatch):
    """Resolve `batch_size="auto"` / `calibration_dtype="auto"` (the defaults) as on a machine without native bf16
    matmuls whose free memory cannot be read: float32 calibration, batch 1. The suite's numbers then do not depend on
    the CPU it runs on. Tests of the resolution substitute their own probes; `@pytest.mark.real_hardware` tests see
    the machine's."""
    if request.node.get_closest_marker("real_hardware"):
        return
    from hf_decoupleq import hardware

    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    monkeypatch.setattr(hardware, "free_memory_bytes", lambda device: None)


WIKI_VALID = SHARED_DATA / "wikitext2" / "wiki.valid.tokens"
WIKI_TEST = SHARED_DATA / "wikitext2" / "wiki.test.raw"


def small_config(**overrides):
    """A fast DecoupleQConfig for the tiny models' end-to-end tests (4 windows of 32 tokens, 1 block-wise epoch)."""
    from hf_decoupleq import DecoupleQConfig

    base = {
        "bits": 2,
        "group_size": 16,
        "dataset": str(WIKI_VALID),
        "num_samples": 4,
        "seq_len": 32,
        "blockwise_epochs": 1,
        "blockwise_lr": 1e-4,
        "rounds": 2,
    }
    return DecoupleQConfig(**{**base, **overrides})


def assert_reloads_identically(quantized, path, test_ids) -> set[str]:
    """Save `quantized` to `path` and reload it: nothing missing or unexpected, the same packed modules, and exactly
    the same logits on `test_ids`. Returns the names of the packed modules."""
    from transformers import AutoModelForCausalLM

    from hf_decoupleq import DecoupleQLinear

    packed = {n for n, m in quantized.named_modules() if isinstance(m, DecoupleQLinear)}
    quantized.save_pretrained(path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    assert {n for n, m in reloaded.named_modules() if isinstance(m, DecoupleQLinear)} == packed
    with torch.no_grad():
        assert torch.equal(quantized(test_ids).logits, reloaded(test_ids).logits)
    return packed


def assert_same_predictions(model, reloaded, tokenizer, prompt: str = "the game was released in") -> None:
    """`reloaded` gives exactly `model`'s logits on `prompt` and the same 8 greedy tokens."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    gen_a = model.generate(ids, max_new_tokens=8, do_sample=False)
    gen_b = reloaded.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(gen_a, gen_b)


def build_small_llama(vocab_size: int = 43, bos: int | None = 1, **overrides):
    """A seeded random Llama of hidden size 32 (2 layers, 4 heads, 2 KV heads), as constructed (train mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=bos,
        eos_token_id=2,
        pad_token_id=0,
        **overrides,
    )
    return LlamaForCausalLM(cfg)


def build_tiny_tokenizer(text: str, vocab_size: int = 128):
    """A word-level tokenizer trained offline on `text` (no Hub access needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_tiny_model(arch: str = "llama", vocab_size: int = 128, seed: int = 0):
    """A tiny random causal LM (2 blocks, hidden 64) of the given family."""
    import transformers

    torch.manual_seed(seed)
    common = {"vocab_size": vocab_size, "hidden_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 256}
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **common
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(
            intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **common
        )
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "opt":
        cfg = transformers.OPTConfig(
            vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
            max_position_embeddings=256, word_embed_proj_dim=64,
        )
        model = transformers.OPTForCausalLM(cfg)
    else:  # pragma: no cover
        raise ValueError(arch)
    return model.eval()


@pytest.fixture(scope="session")
def wiki_text(shared_data) -> str:
    return (shared_data / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_tokenizer(wiki_text):
    return build_tiny_tokenizer(wiki_text[:200_000])


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    """Directories holding saved tiny fp32 models (with tokenizer), keyed by architecture."""
    cache = {}

    def get(arch: str = "llama"):
        if arch not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            build_tiny_model(arch, vocab_size=len(tiny_tokenizer)).save_pretrained(path)
            tiny_tokenizer.save_pretrained(path)
            cache[arch] = path
        return cache[arch]

    return get
