"""The "auto" calibration settings (the defaults): what they resolve to on given hardware, that explicit values win,
that the run records the resolved values, and that resuming sees the resolved values, not "auto"."""

import shutil
import subprocess

import pytest
import torch
from conftest import build_tiny_model
from conftest import small_config as _small_config

import hf_decoupleq
from hf_decoupleq import hardware
from hf_decoupleq.errors import DecoupleQCheckpointError
from hf_decoupleq.nn.linear import DecoupleQLinear

GIB = 1 << 30
# Token ids as calibration data (the tiny model's vocabulary is 128): no tokenizer needed.
IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def small_config(**overrides):
    return _small_config(**{"dataset": IDS, "rounds": 1, **overrides})


def fake_hardware(monkeypatch, *, bf16: bool, free: int | None):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: bf16)
    monkeypatch.setattr(hardware, "free_memory_bytes", lambda device: free)


def packed_state(model):
    return {
        name: [t.clone() for t in (m.qweight, m.scales, m.zeros)]
        for name, m in model.named_modules()
        if isinstance(m, DecoupleQLinear)
    }


def quantize_tiny(config, seed=0):
    model = build_tiny_model("llama", seed=seed)
    hf_decoupleq.quantize(model, config)
    return model, config.quantization_stats


@pytest.mark.real_hardware
def test_cpu_flags_agree_with_lscpu():
    if shutil.which("lscpu") is None:
        pytest.skip("no lscpu")
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, env={"LC_ALL": "C"}).stdout
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags:")), None)
    if flags is None:
        pytest.skip("lscpu lists no flags here")
    assert hardware.cpu_flags() == frozenset(flags)
    expected = "avx512_bf16" in flags or "amx_bf16" in flags
    assert hardware.native_bf16(torch.device("cpu")) is expected


@pytest.mark.real_hardware
@pytest.mark.parametrize(
    "flags,expected",
    [({"avx2", "avx512f"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_tile", "amx_bf16"}, True), (set(), False)],
)
def test_native_bf16_on_cpus(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.native_bf16(torch.device("cpu")) is expected
    assert hardware.auto_calibration_dtype({torch.float32}, torch.device("cpu")) == ("bfloat16" if expected else None)


@pytest.mark.real_hardware
@pytest.mark.parametrize("capability,expected", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_native_bf16_on_cuda(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert hardware.native_bf16(torch.device("cuda")) is expected


def test_auto_dtype_only_lowers_float32_models():
    cpu = torch.device("cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hardware, "native_bf16", lambda device: True)
        assert hardware.auto_calibration_dtype({torch.float32}, cpu) == "bfloat16"
        for weights in ({torch.bfloat16}, {torch.float16}, {torch.float32, torch.bfloat16}):
            assert hardware.auto_calibration_dtype(weights, cpu) is None
    assert hardware.auto_calibration_dtype({torch.float32}, cpu) is None  # the suite's fixture: no native bf16


@pytest.mark.real_hardware
def test_free_memory_reads_meminfo_or_psutil():
    free = hardware.free_memory_bytes(torch.device("cpu"))
    psutil = pytest.importorskip("psutil")
    # A second reader; the machine is shared, so allow the other processes some movement between the two reads.
    assert free == pytest.approx(psutil.virtual_memory().available, rel=0.2)


def test_auto_batch_size_is_the_largest_that_fits():
    cfg = build_tiny_model("llama").config
    per_window = hardware.activation_bytes_per_window(cfg, 64)
    # Independent arithmetic of the estimate from the config: hidden 64, MLP 128, 4 heads, float32.
    assert per_window == 4 * (64 * (16 * 64 + 6 * 128) + 2 * 4 * 64 * 64)
    kept = 3 * 100 * 64 * 64 * 4  # three float32 copies of the calibration activations [100, 64, hidden 64]
    for b in range(1, 8):
        # Exactly enough for b windows in half the memory left, and one byte less.
        free = kept + 2 * b * per_window
        assert hardware.auto_batch_size(cfg, num_samples=100, seq_len=64, free_bytes=free,
                                        activations_on_device=True) == b  # fmt: skip
        assert hardware.auto_batch_size(cfg, num_samples=100, seq_len=64, free_bytes=free - 2,
                                        activations_on_device=True) == max(b - 1, 1)  # fmt: skip
        # On a GPU the kept activations stay in host memory and do not count against the device's.
        assert hardware.auto_batch_size(cfg, num_samples=100, seq_len=64, free_bytes=2 * b * per_window,
                                        activations_on_device=False) == b  # fmt: skip
    huge = 1 << 50
    assert hardware.auto_batch_size(cfg, num_samples=100, seq_len=64, free_bytes=huge, activations_on_device=True) == 8
    assert hardware.auto_batch_size(cfg, num_samples=3, seq_len=64, free_bytes=huge, activations_on_device=True) == 3
    assert hardware.auto_batch_size(cfg, num_samples=100, seq_len=64, free_bytes=None, activations_on_device=True) == 1
    assert hardware.auto_batch_size(cfg, num_samples=100, seq_len=64, free_bytes=0, activations_on_device=True) == 1


def test_activation_estimate_grows_with_the_model():
    """SmolLM2-135M at 2048 tokens: hidden 576, MLP 1536, 9 heads (the config the quickstart's model has)."""
    from transformers import LlamaConfig

    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9)
    per_window = hardware.activation_bytes_per_window(smol, 2048)
    assert per_window == 4 * (2048 * (16 * 576 + 6 * 1536) + 2 * 9 * 2048 * 2048)
    # With 24 GiB free, 128 windows of 2048 tokens leave room for the cap of 8.
    assert hardware.auto_batch_size(smol, num_samples=128, seq_len=2048, free_bytes=24 * GIB,
                                    activations_on_device=True) == 8  # fmt: skip
    # With 2 GiB free only a couple of windows fit.
    small = hardware.auto_batch_size(smol, num_samples=128, seq_len=2048, free_bytes=2 * GIB,
                                     activations_on_device=True)  # fmt: skip
    assert small * per_window <= GIB < (small + 1) * per_window + 3 * 128 * 2048 * 576 * 4


@pytest.mark.parametrize(
    "bf16,free,expected",
    [(True, 64 * GIB, (4, "bfloat16")), (False, None, (1, None))],
)  # fmt: skip
def test_defaults_resolve_from_the_hardware_and_are_recorded(monkeypatch, bf16, free, expected):
    fake_hardware(monkeypatch, bf16=bf16, free=free)
    config = small_config(blockwise_epochs=0)  # the defaults; 4 windows: "auto" may take all of them in one batch
    _, stats = quantize_tiny(config)
    assert (stats["batch_size"], stats["calibration_dtype"]) == expected
    assert config.to_dict()["batch_size"] == "auto"  # the config keeps what was asked for


def test_explicit_settings_win_over_the_hardware(monkeypatch):
    fake_hardware(monkeypatch, bf16=True, free=64 * GIB)
    _, stats = quantize_tiny(small_config(batch_size=2, calibration_dtype=None, blockwise_epochs=0))
    assert (stats["batch_size"], stats["calibration_dtype"]) == (2, None)
    # A bf16 model is not autocast further, whatever the hardware.
    model = build_tiny_model("llama").to(torch.bfloat16)
    config = small_config(blockwise_epochs=0)
    hf_decoupleq.quantize(model, config)
    assert config.quantization_stats["calibration_dtype"] is None


def test_auto_gives_exactly_the_explicit_run_it_resolves_to(monkeypatch):
    fake_hardware(monkeypatch, bf16=True, free=64 * GIB)
    auto_model, stats = quantize_tiny(small_config(batch_size="auto", calibration_dtype="auto"))
    assert (stats["batch_size"], stats["calibration_dtype"]) == (4, "bfloat16")
    explicit_model, _ = quantize_tiny(small_config(batch_size=4, calibration_dtype="bfloat16"))
    a, b = packed_state(auto_model), packed_state(explicit_model)
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        assert all(torch.equal(x, y) for x, y in zip(a[name], b[name])), name


def test_resume_fingerprint_holds_the_resolved_values(monkeypatch, tmp_path):
    fake_hardware(monkeypatch, bf16=False, free=None)
    first, _ = quantize_tiny(small_config(checkpoint_dir=str(tmp_path), blockwise_epochs=0))
    # The explicit settings "auto" resolved to resume the same directory and give the same result...
    again, _ = quantize_tiny(small_config(checkpoint_dir=str(tmp_path), batch_size=1, calibration_dtype=None,
                                          blockwise_epochs=0))  # fmt: skip
    a, b = packed_state(first), packed_state(again)
    assert all(torch.equal(x, y) for name in a for x, y in zip(a[name], b[name]))
    # ...while "auto" resolving differently on other hardware is refused, naming the setting.
    fake_hardware(monkeypatch, bf16=True, free=None)
    config = small_config(checkpoint_dir=str(tmp_path), blockwise_epochs=0)
    with pytest.raises(DecoupleQCheckpointError, match="calibration_dtype"):
        quantize_tiny(config)
