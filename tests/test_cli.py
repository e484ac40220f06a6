"""The `decoupleq` command line on a tiny model: quantize -> eval -> generate, usage errors, one flag per config field."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, WIKI_TEST, WIKI_VALID
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_decoupleq  # noqa: F401  (registers "decoupleq")
from hf_decoupleq import DecoupleQConfig, DecoupleQLinear, cli


@pytest.fixture(scope="module")
def pushed():
    """What `--push-to-hub` sends: HfApi.create_repo / create_commit (the network boundary) record instead."""
    import huggingface_hub

    record = {"commits": []}

    def fake_create_repo(self, repo_id, **kwargs):
        record["private"] = kwargs.get("private")
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        record["commits"].append((repo_id, files))
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/1",
            commit_message="x",
            commit_description="",
            oid="1",
            pr_url=None,
        )

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
        mp.setattr(huggingface_hub.HfApi, "create_commit", fake_create_commit)
        yield record


@pytest.fixture(scope="module")
def quantized_dir(tiny_checkpoint, tmp_path_factory, pushed):
    """Quantize the tiny Llama through the CLI into a folder that already holds a stale model (so --overwrite),
    and push it."""
    out = tmp_path_factory.mktemp("cli-out")
    (out / "config.json").write_text(json.dumps({"stale": True}))
    argv = [
        "quantize",
        str(tiny_checkpoint("llama")),
        "--output",
        str(out),
        "--overwrite",
        "--bits",
        "2",
        "--group-size",
        "16",
        "--dataset",
        str(WIKI_VALID),
        "--num-samples",
        "4",
        "--seq-len",
        "32",
        "--rounds",
        "1",
        "--blockwise-epochs",
        "1",
        "--no-act-order",
        "--seed",
        "3",
        "--dtype",
        "float32",
        "--log-level",
        "warning",
        "--push-to-hub",
        "me/tiny-w2g16",
        "--private",
    ]
    assert cli.main(argv) == 0
    return out


def test_push_to_hub_uploads_the_output_folder_in_one_commit(quantized_dir, pushed):
    assert len(pushed["commits"]) == 1 and pushed["private"] is True
    repo, files = pushed["commits"][0]
    on_disk = {
        p.relative_to(quantized_dir).as_posix(): p.read_bytes() for p in quantized_dir.rglob("*") if p.is_file()
    }
    assert repo == "me/tiny-w2g16" and files == on_disk
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)


def reference_perplexity(model, ids: torch.Tensor, seq_len: int, n_windows: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows, in float64, written out independently of the library."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            x = ids[w * seq_len : (w + 1) * seq_len]
            logp = torch.log_softmax(model(x[None]).logits[0].double(), dim=-1)
            total -= logp[torch.arange(seq_len - 1), x[1:]].sum().item()
            count += seq_len - 1
    return math.exp(total / count)


def reference_greedy(model, ids: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy decoding by full recomputation and argmax (no KV cache, no `generate`)."""
    with torch.no_grad():
        for _ in range(n_new):
            nxt = model(ids[None]).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt[None]])
    return ids


def test_quantize_writes_packed_model_tokenizer_and_card(quantized_dir, capsys):
    cfg = json.loads((quantized_dir / "config.json").read_text())
    q = cfg["quantization_config"]
    # The flags reached the config: every value given on the command line, the library default elsewhere.
    assert (q["quant_method"], q["bits"], q["group_size"], q["act_order"], q["seed"]) == ("decoupleq", 2, 16, False, 3)
    assert (q["num_samples"], q["seq_len"], q["rounds"], q["blockwise_epochs"]) == (4, 32, 1, 1)
    assert q["damp"] == DecoupleQConfig().damp
    assert (quantized_dir / "tokenizer.json").is_file()
    assert "import hf_decoupleq" in (quantized_dir / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(quantized_dir)
    packed = [m for m in model.modules() if isinstance(m, DecoupleQLinear)]
    assert len(packed) == 2 * 7 and all(m.bits == 2 and m.group_size == 16 for m in packed)


def test_eval_prints_the_perplexity(quantized_dir, capsys):
    rc = cli.main(
        [
            "eval",
            str(quantized_dir),
            "--dataset",
            str(WIKI_TEST),
            "--seq-len",
            "32",
            "--max-windows",
            "3",
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    printed = float(out.split("perplexity ")[1].split()[0])
    tok = AutoTokenizer.from_pretrained(quantized_dir)
    ids = tok(WIKI_TEST.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    ref = reference_perplexity(AutoModelForCausalLM.from_pretrained(quantized_dir), ids, 32, 3)
    assert printed == pytest.approx(ref, rel=1e-4)


def test_generate_prints_the_greedy_continuation(quantized_dir, capsys):
    prompt = "the game was released in"
    rc = cli.main(
        ["generate", str(quantized_dir), "--prompt", prompt, "--max-new-tokens", "6", "--log-level", "error"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    tok = AutoTokenizer.from_pretrained(quantized_dir)
    ids = tok(prompt, return_tensors="pt").input_ids[0]
    ref = reference_greedy(AutoModelForCausalLM.from_pretrained(quantized_dir), ids, 6)
    assert out.rstrip("\n") == tok.decode(ref[len(ids) :], skip_special_tokens=True)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Usage errors must be found before any model is loaded: loading fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the usage error was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--bits", "5"], "bits=5"),
        (["--group-size", "0"], "group_size=0"),
        (["--damp", "2"], "damp=2"),
        (["--method", "awq"], "'awq'"),
        (["--group-size", "sixty"], "'sixty'"),
        (["--dataset", "no/such/calib.txt"], "no/such/calib.txt"),
        (["--dataset", str(WIKI_VALID.parent)], "folder"),
        (["--dataset", str(REPO / "pyproject.toml")], "pyproject.toml"),
        (["--device", "bogus"], "bogus"),
        (["--frobnicate"], "--frobnicate"),
    ],
)
def test_quantize_usage_errors_exit_2_with_one_line(
    extra, expected, tiny_checkpoint, tmp_path, capsys, no_model_loading
):
    argv = [
        "quantize",
        str(tiny_checkpoint("llama")),
        "--output",
        str(tmp_path / "out"),
        "--dataset",
        str(WIKI_VALID),
        *extra,
    ]
    capsys.readouterr()  # drop what building the session's tiny checkpoint printed
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("decoupleq: error: ") and expected in lines[0], captured.err
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("marker", ["config.json", "model.safetensors"])
def test_existing_output_is_not_overwritten_without_flag(marker, tiny_checkpoint, tmp_path, capsys, no_model_loading):
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_bytes(b"keep me")
    argv = ["quantize", str(tiny_checkpoint("llama")), "-o", str(out), "--dataset", str(WIKI_VALID)]
    capsys.readouterr()  # drop what building the session's tiny checkpoint printed
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--overwrite" in lines[0] and str(out) in lines[0]
    assert (out / marker).read_bytes() == b"keep me" and [p.name for p in out.iterdir()] == [marker]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["frobnicate"], "frobnicate"),
        ([], "COMMAND"),
        (["eval", "{model}", "--dataset", "missing.txt"], "missing.txt"),
        (["eval", "{model}"], "--dataset"),
        (["eval", "{model}", "--dataset", str(WIKI_TEST), "--seq-len", "1"], "--seq-len 1"),
        (["generate", "./no/such/dir", "--prompt", "hi"], "./no/such/dir"),
        (["generate", "missing.gguf", "--prompt", "hi"], "missing.gguf"),
        (["generate", "{model}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    ],
)
def test_other_usage_errors_exit_2_with_one_line(argv, expected, tiny_checkpoint, capsys, no_model_loading):
    argv = [a.replace("{model}", str(tiny_checkpoint("llama"))) for a in argv]
    capsys.readouterr()  # drop what building the session's tiny checkpoint printed
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("decoupleq: error: ") and expected in lines[0], lines


def test_other_failures_exit_1_and_debug_shows_the_traceback(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    argv = ["generate", str(broken), "--prompt", "hi", "--tokenizer", str(broken)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("decoupleq: error: ")
    assert cli.main([*argv, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("decoupleq: error: ")


def test_help_exits_0(capsys):
    assert cli.main(["quantize", "--help"]) == 0
    assert "--group-size" in capsys.readouterr().out


# A value other than the default for every field (the test fails if a field is added without one here).
NON_DEFAULT = {
    "bits": ("3", 3),
    "group_size": ("-1", -1),
    "rounds": ("5", 5),
    "damp": ("0.05", 0.05),
    "method": ("gptq", "gptq"),
    "blockwise_epochs": ("2", 2),
    "blockwise_lr": ("3e-4", 3e-4),
    "blockwise_weight_decay": ("0.1", 0.1),
    "blockwise_optimizer": ("adam", "adam"),
    "e2e_epochs": ("0.5", 0.5),
    "e2e_lr": ("1e-3", 1e-3),
    "e2e_samples": ("96", 96),
    "num_samples": ("7", 7),
    "seq_len": ("99", 99),
    "seed": ("11", 11),
    "modules_to_not_convert": (
        ["lm_head", "model.layers.0.mlp.down_proj"],
        ["lm_head", "model.layers.0.mlp.down_proj"],
    ),
    "dataset": ("self", "self"),
    "tokenizer": ("some/tokenizer", "some/tokenizer"),
    "batch_size": ("2", 2),
    "calibration_dtype": ("bfloat16", "bfloat16"),
    "checkpoint_dir": ("ckpt", "ckpt"),
    "device": ("cpu", "cpu"),
    # gguf_type needs --no-incoherence, and sets group_size (16 for q2_k) itself.
    "gguf_type": (["q2_k", "--no-incoherence"], "q2_k"),
    # The key is a regular expression; it may contain "=" (the last one splits).
    "gguf_layer_types": ([r"model\.layers\.[0-3]\.self_attn\.v_proj=q5_k", r"(?=x).*down_proj=Q5_K", "--gguf-type",
                          "q4_k", "--no-incoherence"],
                         {r"model\.layers\.[0-3]\.self_attn\.v_proj": "q5_k", r"(?=x).*down_proj": "q5_k"}),
}
# Fields a flag changes besides its own.
COUPLED = {"gguf_type": {"incoherence", "group_size"},
           "gguf_layer_types": {"gguf_type", "incoherence", "group_size", "bits"}}  # fmt: skip


def test_every_config_field_has_a_flag():
    fields = set(DecoupleQConfig._field_names())
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["quantize"]
    options = {opt for action in sub._actions for opt in action.option_strings}
    # The only fields without a flag are the three the library writes itself.
    assert set(cli.NOT_FLAGS) == {"format_version", "quantization_stats", "packed_modules"} <= fields
    for field in fields - set(cli.NOT_FLAGS):
        assert "--" + field.replace("_", "-") in options, field
    defaults = DecoupleQConfig()
    for field in fields - set(cli.NOT_FLAGS):
        flag = "--" + field.replace("_", "-")
        default = getattr(defaults, field)
        if isinstance(default, bool):
            argv, expected = ["--no-" + flag[2:] if default else flag], not default
        else:
            raw, expected = NON_DEFAULT[field]
            argv = [flag, *raw] if isinstance(raw, list) else [flag, raw]
        cfg = cli.config_from_args(parser.parse_args(["quantize", "m", "-o", "x", *argv]))
        value = getattr(cfg, field)
        assert value == expected and type(value) is type(expected), (field, value)
        # Every other field keeps the library default.
        for other in fields - {field, "tokenizer"} - COUPLED.get(field, set()):
            assert getattr(cfg, other) == getattr(defaults, other), (field, other)


def test_gguf_model_is_loaded_full_precision_then_quantized(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """A .gguf MODEL goes through from_pretrained(folder, gguf_file=name) and `hf_decoupleq.quantize`.

    Building a real GGUF file needs a tokenizer GGUF can describe, so the GGUF read itself is stood in for by the tiny
    checkpoint; what is checked is what the CLI asks transformers for and that the result is quantized and saved.
    """
    gguf = tmp_path / "src" / "tiny.Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    calls = []

    def fake_model(path, *args, gguf_file=None, quantization_config=None, **kwargs):
        calls.append(("model", path, gguf_file, quantization_config))
        return real_model(tiny_checkpoint("llama"), **kwargs)

    def fake_tok(path, *args, gguf_file=None, **kwargs):
        calls.append(("tokenizer", path, gguf_file, None))
        return real_tok(tiny_checkpoint("llama"))

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_tok)
    out = tmp_path / "out"
    argv = f"quantize {gguf} -o {out} --bits 4 --group-size 32 --num-samples 2 --seq-len 16 --no-blockwise"
    assert cli.main([*argv.split(), "--dataset", str(WIKI_VALID), "--log-level", "error"]) == 0
    # Loaded in full precision from the GGUF file (no quantize-on-load), tokenizer from the same file.
    assert calls == [
        ("tokenizer", str(gguf.parent), gguf.name, None),
        ("model", str(gguf.parent), gguf.name, None),
    ]
    monkeypatch.undo()
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["blockwise"]) == ("decoupleq", 4, 32, False)
    packed = [m for m in AutoModelForCausalLM.from_pretrained(out).modules() if isinstance(m, DecoupleQLinear)]
    assert len(packed) == 2 * 7 and all(m.bits == 4 for m in packed)
