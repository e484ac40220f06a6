"""The end-to-end stage (hf_decoupleq.e2e): loss against a float64 reference, frozen codes, keep-or-revert."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model, small_config

from hf_decoupleq import DecoupleQLinear, quantize
from hf_decoupleq.e2e import _kl, _parts, capture_teacher, end_to_end_supported, train_end_to_end

CPU = torch.device("cpu")


def _windows(n=6, t=24, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def _quantized_pair(**overrides):
    fp = build_tiny_model("llama")
    q = copy.deepcopy(fp)
    cfg = small_config(dataset=_windows(8, 32), method="rtn", blockwise=False, e2e_samples=4, **overrides)
    quantize(q, cfg)
    return fp, q


def _state(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _kl64(fp, q, windows) -> float:
    """Mean per-token KL(fp || q) of the models' full logits, in float64 (the independent reference)."""
    with torch.no_grad():
        lt = fp(windows).logits.double()
        ls = q(windows).logits.double()
    p = F.log_softmax(lt, -1)
    return float((p.exp() * (p - F.log_softmax(ls, -1))).sum(-1).mean())


def test_loss_matches_float64_kl_of_the_logits():
    fp, q = _quantized_pair()
    windows = _windows()
    teacher = capture_teacher(fp, windows, batch_size=4, compute_dtype=None, device=CPU)
    assert [h.shape[0] for h in teacher.hidden] == [4, 2]
    decoder, head = _parts(q)
    with torch.no_grad():
        ours = float(_kl(decoder(input_ids=windows, use_cache=False).last_hidden_state,
                         torch.cat(teacher.hidden), head, chunk=7))
    ref = _kl64(fp, q, windows)
    assert ref > 1e-4
    assert abs(ours - ref) <= 1e-4 * ref + 1e-7


def test_loss_gradient_matches_float64_autograd():
    """The loss forms its own gradient (softmax(student) - softmax(teacher)); it must equal autograd's in float64."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True).double()
    s = torch.randn(3, 10, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(3, 10, 16, dtype=torch.float64, generator=g)
    (ours,) = torch.autograd.grad(_kl(s, t, head, chunk=7), s)
    log_p_s = F.log_softmax(head(s.reshape(-1, 16)), -1)
    log_p_t = F.log_softmax(head(t.reshape(-1, 16)), -1)
    (ref,) = torch.autograd.grad((log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean(), s)
    assert float(ref.abs().max()) > 1e-3
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-8)


def test_training_lowers_kl_keeps_codes_and_format():
    fp, q = _quantized_pair()
    windows = _windows(8, 32)
    before_state = _state(q)
    dtypes = {n: t.dtype for n, t in q.state_dict().items()}
    kl_before = _kl64(fp, q, windows)
    teacher = capture_teacher(fp, windows, batch_size=4, compute_dtype=None, device=CPU)
    stats = train_end_to_end(
        q, windows, teacher, epochs=6, lr=3e-4, norm_lr=3e-4, train_norms=True, compute_dtype=None, device=CPU,
        seed=0, check_windows=8,
    )
    assert stats["kept"] and stats["kl_after"] < stats["kl_before"]
    kl_after = _kl64(fp, q, windows)
    assert kl_after < 0.9 * kl_before
    after_state = q.state_dict()
    assert set(after_state) == set(before_state)  # same tensors: the packed format is unchanged
    for name, t in after_state.items():
        assert t.dtype == dtypes[name], name
        if name.endswith(("qweight", "hadamard_signs")):
            assert torch.equal(t, before_state[name]), name
    assert any(not torch.equal(after_state[n], before_state[n]) for n in after_state if n.endswith("scales"))
    for m in q.modules():
        if isinstance(m, DecoupleQLinear):
            assert "scales" in m._buffers and "zeros" in m._buffers
    assert all(p.requires_grad for p in q.parameters())  # the flags from before the stage (all True here)


def test_worse_result_is_reverted():
    fp, q = _quantized_pair()
    windows = _windows(8, 32)
    before = _state(q)
    teacher = capture_teacher(fp, windows, batch_size=8, compute_dtype=None, device=CPU)
    stats = train_end_to_end(  # a step size that wrecks the scales
        q, windows, teacher, epochs=1, lr=10.0, norm_lr=10.0, train_norms=True, compute_dtype=None, device=CPU,
        seed=0, check_windows=8,
    )
    assert not stats["kept"]
    after = q.state_dict()
    for name, t in before.items():
        assert torch.equal(after[name], t), name


def test_unsupported_models_say_why():
    _, q = _quantized_pair()
    assert end_to_end_supported(q) is None
    assert "decoder" in end_to_end_supported(q.model)


def test_pipeline_runs_the_stage_and_the_result_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    fp = build_tiny_model("llama")
    windows = _windows(8, 32)
    off = copy.deepcopy(fp)
    quantize(off, small_config(dataset=windows, num_samples=8, e2e_epochs=0))
    on = copy.deepcopy(fp)
    cfg = small_config(dataset=windows, num_samples=8, e2e_epochs=4)  # the default, relative e2e_lr
    quantize(on, cfg)
    stats = cfg.quantization_stats["e2e"]
    assert stats["steps"] == 32 and stats["kl_after"] < stats["kl_before"] and stats["kept"]
    assert "e2e" not in off.config.quantization_config.quantization_stats
    # The stage starts from exactly the model the pipeline produces without it: its "before" KL is that model's.
    assert abs(stats["kl_before"] - _kl64(fp, off, windows)) <= 1e-4 * stats["kl_before"]
    assert _kl64(fp, on, windows) < _kl64(fp, off, windows)
    for name, t in on.state_dict().items():
        if name.endswith("qweight"):
            assert torch.equal(t, off.state_dict()[name]), name
    on.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(windows).logits, on(windows).logits)


def test_stage_trains_on_more_windows_drawn_from_the_data(tiny_tokenizer):
    """e2e_samples=None (1.5 x num_samples): the stage draws 6 windows from the text for num_samples=4; the block-wise
    stages keep their 4, and the stage's loss is the float64 KL over exactly the 6 (every one a check window)."""
    from conftest import WIKI_VALID

    from hf_decoupleq.calibration.data import get_calibration_windows

    fp = build_tiny_model("llama", vocab_size=len(tiny_tokenizer))
    off = copy.deepcopy(fp)
    quantize(off, small_config(e2e_epochs=0), tokenizer=tiny_tokenizer)
    on = copy.deepcopy(fp)
    cfg = small_config(e2e_epochs=1)
    quantize(on, cfg, tokenizer=tiny_tokenizer)
    stats = cfg.quantization_stats
    assert stats["calibration_tokens"] == 4 * 32
    assert stats["e2e"]["windows"] == 6 and stats["e2e"]["steps"] == 6
    windows = get_calibration_windows(str(WIKI_VALID), tiny_tokenizer, num_samples=6, seq_len=32, seed=0)
    assert len(set(map(tuple, windows.tolist()))) == 6
    kl = stats["e2e"]["kl_before"]
    assert abs(kl - _kl64(fp, off, windows)) <= 1e-3 * kl
    # Not the KL over the block-wise stages' 4 windows alone (the first 4 of the 6).
    assert abs(kl - _kl64(fp, off, windows[:4])) > 1e-2 * kl
    # Same block-wise stages: the codes of both runs agree.
    for name, t in on.state_dict().items():
        if name.endswith("qweight"):
            assert torch.equal(t, off.state_dict()[name]), name


def test_stage_keeps_the_block_wise_windows_when_the_data_has_no_more(caplog):
    """Token ids holding only num_samples distinct windows: the stage trains on those, and says so."""
    import logging

    fp = build_tiny_model("llama")
    q = copy.deepcopy(fp)
    cfg = small_config(dataset=_windows(8, 32), num_samples=8, e2e_epochs=1 / 8)
    with caplog.at_level(logging.INFO, logger="hf_decoupleq"):
        quantize(q, cfg)
    assert cfg.quantization_stats["e2e"]["windows"] == 8
    assert "it trains on the 8 block-wise windows instead of e2e_samples=12" in caplog.text
    # Fewer than num_samples: the first e2e_samples of the block-wise windows (one step each for one epoch).
    cfg = small_config(dataset=_windows(8, 32), num_samples=8, e2e_samples=3, e2e_epochs=1)
    quantize(copy.deepcopy(fp), cfg)
    assert cfg.quantization_stats["e2e"]["windows"] == 3 and cfg.quantization_stats["e2e"]["steps"] == 3


def test_self_sampled_data_is_not_sampled_again_for_the_stage(caplog, tiny_tokenizer):
    import logging

    q = build_tiny_model("llama", vocab_size=len(tiny_tokenizer))
    cfg = small_config(dataset="self", e2e_epochs=1 / 4)
    with caplog.at_level(logging.INFO, logger="hf_decoupleq"):
        quantize(q, cfg, tokenizer=tiny_tokenizer)
    assert cfg.quantization_stats["e2e"]["windows"] == 4
    assert "dataset='self', so it trains on the 4 sampled windows (e2e_samples=6" in caplog.text


def test_relative_step_size_scales_with_each_layers_scales():
    """relative=True: Adam's first step moves each value by at most lr * mean|scales| of its own layer (a sign step)."""
    fp, q = _quantized_pair()
    windows = _windows(8, 32)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, DecoupleQLinear)}
    before = {n: (m.scales.detach().clone(), m.zeros.detach().clone()) for n, m in layers.items()}
    norms = {n: p for n, p in q.named_parameters() if "norm" in n}
    with torch.no_grad():  # norm weights of different magnitudes; one below the 0.01 floor
        for i, p in enumerate(norms.values()):
            p.mul_((0.5 + i) * torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) + 0.5)
        norms["model.layers.0.input_layernorm.weight"].mul_(1e-3)
    norms_before = {n: p.detach().clone() for n, p in norms.items()}
    teacher = capture_teacher(fp, windows, batch_size=4, compute_dtype=None, device=CPU)
    lr = 1e-3  # small enough that the one step lowers the check loss (otherwise the stage reverts it)
    stats = train_end_to_end(  # one step (of 8 windows), at the full step size (1-step warm-up)
        q, windows, teacher, epochs=1 / 8, lr=lr, norm_lr=1e-4, train_norms=True, compute_dtype=None, device=CPU,
        seed=0, check_windows=2, relative=True,
    )
    assert stats["steps"] == 1 and stats["kept"]
    mags = [float(s.abs().mean()) for s, _ in before.values()]
    # The layers' mean |scales| differ by far more than the tolerance below, so one step size for all would fail.
    assert max(mags) > 1.02 * min(mags)
    for name, m in layers.items():
        if name.startswith("model.layers.0.self_attn.") and not name.endswith("o_proj"):
            continue  # their input is ~1000x smaller (the tiny norm): gradients near Adam's eps
        s0, z0 = before[name]
        step = lr * float(s0.abs().mean())
        for new, old in ((m.scales, s0), (m.zeros, z0)):
            delta = (new.detach() - old).abs()
            # Adam's first update is lr * g / (|g| + eps): the group's step size wherever the gradient is not tiny
            # (tolerance: float32 rounding of values ~1000x the step).
            assert float(delta.max()) <= step * (1 + 1e-3), name
            assert float(delta.max()) >= step * (1 - 1e-3), name
    # Each norm weight likewise steps by norm_lr times its own mean magnitude, at least 0.01 of it.
    steps = []
    for name, p in norms.items():
        step = 1e-4 * max(float(norms_before[name].abs().mean()), 1e-2)
        steps.append(step)
        delta = float((p.detach() - norms_before[name]).abs().max())
        assert step * (1 - 1e-3) <= delta <= step * (1 + 1e-3), name
    assert min(steps) == pytest.approx(1e-6) and max(steps) > 2 * sorted(steps)[1]


@pytest.mark.parametrize(
    ("bits", "e2e_lr", "lr"),
    [(2, 1e-3, 1e-3), (2, None, 1.5e-3), (3, None, 1.5e-3), (4, None, 3e-4), (4, 1e-3, 1e-3)],
)
def test_pipeline_steps_are_relative_to_each_layers_scales(bits, e2e_lr, lr):
    """The pipeline's stage uses relative steps: one step moves each layer's scales by e2e_lr * its mean |scale|;
    e2e_lr=None (the default) is 1.5e-3 below 4 bits and 3e-4 from 4 bits on."""
    fp = build_tiny_model("llama")
    windows = _windows(8, 32)
    off = copy.deepcopy(fp)
    quantize(off, small_config(dataset=windows, num_samples=8, e2e_epochs=0, bits=bits))
    on = copy.deepcopy(fp)
    cfg = small_config(dataset=windows, num_samples=8, e2e_epochs=1 / 8, e2e_lr=e2e_lr, bits=bits)
    quantize(on, cfg)
    stats = cfg.quantization_stats["e2e"]
    assert stats["steps"] == 1 and stats["kept"] and stats["lr"] == lr
    before = {n: m for n, m in off.named_modules() if isinstance(m, DecoupleQLinear)}
    mags = []
    for name, m in on.named_modules():
        if isinstance(m, DecoupleQLinear):
            s0 = before[name].scales
            step = lr * float(s0.abs().mean())
            mags.append(step)
            delta = float((m.scales - s0).abs().max())
            assert step * (1 - 1e-3) <= delta <= step * (1 + 1e-3), name
    assert max(mags) > 1.02 * min(mags)


def test_symmetric_skips_the_stage(caplog):
    """symmetric ties each zero to its scale (-scales * 2^(bits-1)); the stage would train zeros on their own, so it
    is skipped and every layer stays symmetric."""
    import logging

    fp = build_tiny_model("llama")
    windows = _windows(8, 32)
    q = copy.deepcopy(fp)
    cfg = small_config(dataset=windows, num_samples=8, e2e_epochs=1, symmetric=True)
    with caplog.at_level(logging.INFO, logger="hf_decoupleq"):
        quantize(q, cfg)
    assert "e2e" not in cfg.quantization_stats
    assert "end-to-end stage skipped: symmetric=True" in caplog.text
    layers = [m for m in q.modules() if isinstance(m, DecoupleQLinear)]
    assert layers
    for m in layers:
        torch.testing.assert_close(m.zeros, -m.scales * 2 ** (m.bits - 1), rtol=0, atol=0)


def test_integer_zero_keeps_every_zero_an_integer_code_times_its_scale(caplog):
    """integer_zero promises zeros ``-scales * z_int`` with integer ``z_int`` in the code range: the block-wise stage
    trains the scales with each group's ``z_int`` kept, and the end-to-end stage (which trains zeros on their own) is
    skipped."""
    import logging

    fp = build_tiny_model("llama")
    q = copy.deepcopy(fp)
    cfg = small_config(dataset=_windows(8, 32), num_samples=8, e2e_epochs=1, integer_zero=True, blockwise_lr=1e-3)
    with caplog.at_level(logging.INFO, logger="hf_decoupleq"):
        quantize(q, cfg)
    assert "e2e" not in cfg.quantization_stats
    assert "end-to-end stage skipped: integer_zero=True" in caplog.text
    blocks = cfg.quantization_stats["blocks"]
    assert all(b["blockwise_final_mse"] < b["blockwise_initial_mse"] for b in blocks)
    layers = [m for m in q.modules() if isinstance(m, DecoupleQLinear)]
    assert layers
    for m in layers:
        z_int = (-m.zeros.double() / m.scales.double())
        torch.testing.assert_close(z_int, z_int.round(), rtol=0, atol=1e-5)
        assert float(z_int.min()) > -0.5 and float(z_int.max()) < 2**m.bits - 0.5
