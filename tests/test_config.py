import json

import pytest

from hf_decoupleq import DecoupleQConfig
from hf_decoupleq.errors import DecoupleQConfigError


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("bits", 5, "bits=5"),
        ("bits", 1, "[2, 3, 4, 8]"),
        ("group_size", 0, "group_size=0"),
        ("group_size", -2, "-1 for per-channel"),
        ("method", "awq", "'awq'"),
        ("damp", 0.0, "damp=0.0"),
        ("rounds", -1, "rounds=-1"),
        ("num_samples", 0, "num_samples=0"),
        ("seq_len", 1.5, "seq_len=1.5"),
        ("symmetric", "yes", "symmetric='yes'"),
        ("blockwise_lr", -1e-3, "blockwise_lr"),
        ("e2e_lr", 0.0, "or None for the bit width's default"),
        ("e2e_samples", 0, "or None for 1.5 x num_samples"),
        ("e2e_samples", 96.0, "e2e_samples=96.0"),
        ("dataset", None, "dataset=None"),
        ("batch_size", "fast", "'auto'"),
        ("batch_size", 0, "batch_size=0"),
        ("batch_size", 2.0, "batch_size=2.0"),
        ("calibration_dtype", "int8", "'auto'"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(field, value, needle):
    with pytest.raises(DecoupleQConfigError) as err:
        DecoupleQConfig(**{field: value})
    assert needle in str(err.value)
    assert f"DecoupleQConfig.{field}" in str(err.value)


def test_unknown_option_is_refused():
    with pytest.raises(DecoupleQConfigError, match="bitz"):
        DecoupleQConfig(bitz=2)


def test_to_dict_is_json_safe_and_round_trips(tiny_tokenizer):
    cfg = DecoupleQConfig(bits=3, group_size=128, dataset=["some text", "more text"], tokenizer=tiny_tokenizer)
    d = cfg.to_dict()
    text = json.dumps(d)  # no tokenizer or dataset objects
    assert d["quant_method"] == "decoupleq"
    assert d["dataset"] == "<list of 2 strings>"
    assert isinstance(d["tokenizer"], (str, type(None)))
    back = DecoupleQConfig.from_dict(json.loads(text))
    assert back.to_dict() == d


def test_defaults_follow_the_paper():
    cfg = DecoupleQConfig()
    assert (cfg.bits, cfg.group_size, cfg.rounds, cfg.damp, cfg.num_samples, cfg.seq_len) == (2, 64, 3, 0.01, 128, 2048)
    assert cfg.blockwise and cfg.true_sequential and cfg.act_order and not cfg.symmetric
    assert cfg.effective_modules_to_not_convert == ["lm_head"]


def test_incoherence_is_on_by_default_but_old_checkpoint_configs_read_as_plain():
    assert DecoupleQConfig().incoherence is True
    d = DecoupleQConfig(incoherence=False).to_dict()
    assert DecoupleQConfig.from_dict(d).incoherence is False
    d.pop("incoherence")  # a config.json written before the option existed
    assert DecoupleQConfig.from_dict(d).incoherence is False
    assert DecoupleQConfig.from_dict({**d, "incoherence": True}).incoherence is True


def test_newer_format_version_refused():
    with pytest.raises(DecoupleQConfigError, match="upgrade"):
        DecoupleQConfig(format_version=10**6)


def test_batch_size_and_calibration_dtype_default_to_auto():
    cfg = DecoupleQConfig()
    assert (cfg.batch_size, cfg.calibration_dtype) == ("auto", "auto")
    assert DecoupleQConfig(batch_size="AUTO", calibration_dtype="Auto").to_dict()["batch_size"] == "auto"
    assert DecoupleQConfig(calibration_dtype="model").calibration_dtype is None
    back = DecoupleQConfig.from_dict(DecoupleQConfig().to_dict())
    assert (back.batch_size, back.calibration_dtype) == ("auto", "auto")
    explicit = DecoupleQConfig(batch_size=8, calibration_dtype="bfloat16")
    assert explicit.result_fingerprint(batch_size=1, calibration_dtype=None) == explicit.result_fingerprint()
    fp = DecoupleQConfig().result_fingerprint(batch_size=8, calibration_dtype="bfloat16")
    assert (fp["batch_size"], fp["calibration_dtype"]) == (8, "bfloat16")
    with pytest.raises(ValueError, match="tokenizer"):
        DecoupleQConfig().result_fingerprint(tokenizer="x")


def test_e2e_samples_default_is_one_and_a_half_times_num_samples():
    assert DecoupleQConfig().effective_e2e_samples == 192
    assert DecoupleQConfig(num_samples=5).effective_e2e_samples == 7
    assert DecoupleQConfig(num_samples=5, e2e_samples=3).effective_e2e_samples == 3
    # Not a result field: the stage runs after the last block, so a resume directory stays valid across it.
    assert "e2e_samples" not in DecoupleQConfig().result_fingerprint(batch_size=1, calibration_dtype=None)
