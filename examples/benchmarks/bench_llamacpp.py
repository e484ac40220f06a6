"""This project's GGUF files vs llama.cpp's own, scored by llama.cpp's ``llama-perplexity`` on SmolLM2-135M.

Needs llama.cpp's tools (``examples/benchmarks/build_llamacpp.sh`` builds them into ``~/.cache/hf-decoupleq/llama.cpp``,
or pass ``--llama-cpp DIR``). Stages (each writes one JSON record per result to ``--results``, and reuses the files it
made in ``--work`` on a rerun):

``agreement``
    A W4 checkpoint of this project (``--agreement-config``, no incoherence) is exported exactly to Q4_1; its
    perplexity is computed twice on the same tokens: by ``llama-perplexity`` on the file, and by this project's model
    in PyTorch with llama-perplexity's protocol (chunks of ``-c`` tokens, the first token replaced by BOS if the
    vocabulary adds one, only the second half of each chunk scored). The tokens are the ones llama.cpp itself made:
    read from the header of the ``--kl-divergence-base`` file, so tokenization cannot differ.

``compare``
    For each ``--types`` entry: llama.cpp's file (``llama-quantize`` with an importance matrix from ``llama-imatrix``
    on ``wiki.valid.tokens``, starting from the F32 GGUF of the same fp32 model, token embeddings kept at F16) against
    this project's file with the same GGML type for every tensor (read from llama.cpp's file: where llama-quantize's
    mix differs from the checkpoint's ``gguf_type``, e.g. the Q5_K layers of ``Q4_K_S``, the checkpoint gets those
    layers' types through ``gguf_layer_types``), both scored by ``llama-perplexity -c 2048 --chunks N`` on
    ``wiki.test.raw``. The file sizes are recorded.

Every llama.cpp tool runs with ``--no-repack``: on CPUs that advertise AMX to a VM that does not enable it, ggml's AMX
path faults; without repacking, the plain CPU kernels run (the perplexity is the same, only speed differs).

This project's checkpoints for ``compare`` are made with ``DecoupleQConfig(gguf_type=...)`` (``--ours-*``): decoupleQ
solved inside the GGML block structure, exported exactly.

Example (the recorded runs)::

    python examples/benchmarks/bench_llamacpp.py agreement
    python examples/benchmarks/bench_llamacpp.py compare --types q2_k_pure q4_0 q3_k_s q4_k_s --num-samples 16 \
        --calib-seq-len 512 --imatrix-chunks 16 --chunks 10
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_CALIB_PATH, DEFAULT_EVAL_PATH, GGUF_NAME, gguf_folder, load_model, load_tokenizer

logger = logging.getLogger("bench_llamacpp")

DEFAULT_LLAMA_CPP = Path(
    os.environ.get("HF_DECOUPLEQ_LLAMA_CPP", Path.home() / ".cache" / "hf-decoupleq" / "llama.cpp")
)
REPO = Path(__file__).resolve().parents[2]
# llama.cpp's name for each --types entry: (llama-quantize type argument, extra flags).
LLAMA_TYPES = {"q4_0": ("Q4_0", []), "q3_k_s": ("Q3_K_S", []), "q2_k_pure": ("Q2_K", ["--pure"]),
               "q4_k_s": ("Q4_K_S", []), "q4_k_m": ("Q4_K_M", []), "q5_k_m": ("Q5_K_M", []),
               "q6_k": ("Q6_K", [])}  # fmt: skip


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tool(args: argparse.Namespace, name: str) -> Path:
    path = Path(args.llama_cpp) / "build" / "bin" / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: run examples/benchmarks/build_llamacpp.sh or pass --llama-cpp")
    return path


def run(cmd: list[Any], log: Path) -> str:
    """Run a llama.cpp tool, keep its output in ``log``, return stdout + stderr."""
    cmd = [str(c) for c in cmd]
    logger.info("$ %s", " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    log.write_text(out)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}); see {log}:\n{out[-3000:]}")
    logger.info("  done in %.0f s", time.perf_counter() - start)
    return out


def record(args: argparse.Namespace, rec: dict[str, Any]) -> None:
    rec = {"bench": "llamacpp", **rec, "cpu": cpu_model(), "threads": args.threads,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    logger.info("record: %s", json.dumps(rec))


def llama_ppl(args: argparse.Namespace, model: Path, text: Path, ctx: int, chunks: int, extra=()) -> float:
    out = run(
        [tool(args, "llama-perplexity"), "-m", model, "-f", text, "-c", ctx, "--chunks", chunks, "-t", args.threads,
         "--no-repack", *extra],
        Path(args.work) / f"ppl_{model.stem}_{ctx}_{chunks}.log",
    )  # fmt: skip
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if match is None:
        raise SystemExit(f"no final perplexity in llama-perplexity's output for {model}")
    return float(match.group(1))


def read_kld_tokens(path: Path) -> tuple[int, int, np.ndarray]:
    """(n_ctx, n_chunk, tokens [n_chunk * n_ctx]) from a ``--kl-divergence-base`` file's header."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise SystemExit(f"{path} is not a llama-perplexity logits file")
        n_ctx = int(np.frombuffer(f.read(4), dtype=np.int32)[0])
        _n_vocab, n_chunk = (int(x) for x in np.frombuffer(f.read(8), dtype=np.int32))
        tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32)
    return n_ctx, n_chunk, tokens


@torch.inference_mode()
def torch_ppl_llama_protocol(model: Any, tokens: np.ndarray, n_ctx: int, n_chunk: int, bos_id: int | None) -> float:
    """Perplexity with llama-perplexity's protocol, computed by the PyTorch model: chunk ``i`` is
    ``tokens[i n_ctx : (i + 1) n_ctx]`` (first token replaced by BOS when ``bos_id`` is given), and the logits at
    positions ``n_ctx / 2 .. n_ctx - 2`` score the next token."""
    first = n_ctx // 2
    nll, count = 0.0, 0
    for i in range(n_chunk):
        ids = torch.tensor(tokens[i * n_ctx : (i + 1) * n_ctx], dtype=torch.long)
        if bos_id is not None:
            ids[0] = bos_id
        logits = model(ids[None]).logits[0].double()
        logp = torch.log_softmax(logits[first : n_ctx - 1], dim=-1)
        nll -= float(logp.gather(1, ids[first + 1 :, None]).sum())
        count += n_ctx - 1 - first
        logger.info("  chunk %d: running ppl %.4f", i + 1, np.exp(nll / count))
    return float(np.exp(nll / count))


def make_checkpoint(args: argparse.Namespace, label: str, config: dict[str, Any]) -> Path:
    """Quantize the fp32 SmolLM2 with this project (cached in --work/label)."""
    import hf_decoupleq
    from hf_decoupleq import DecoupleQConfig
    from hf_decoupleq.calibration.data import get_calibration_windows

    folder = Path(args.work) / label
    if (folder / "config.json").is_file():
        return folder
    tok = load_tokenizer()
    model = load_model(torch.float32)
    windows = get_calibration_windows(
        str(DEFAULT_CALIB_PATH), tok, num_samples=args.num_samples, seq_len=args.calib_seq_len, seed=0
    )
    cfg = DecoupleQConfig(
        dataset=windows, num_samples=args.num_samples, seq_len=args.calib_seq_len, incoherence=False, **config
    )
    start = time.perf_counter()
    hf_decoupleq.quantize(model, cfg, tokenizer=tok)
    logger.info("quantized %s in %.0f s", label, time.perf_counter() - start)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "bench_config.json").write_text(json.dumps({**config, "num_samples": args.num_samples,
                                                          "calib_seq_len": args.calib_seq_len}))  # fmt: skip
    return folder


def parse_config(spec: str) -> dict[str, Any]:
    """``bits=4,group_size=128,method=rtn`` -> kwargs (ints, floats, booleans parsed)."""
    out: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def stage_agreement(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    import hf_decoupleq  # noqa: F401
    from hf_decoupleq.export import export_gguf

    config = parse_config(args.agreement_config)
    label = "ckpt_" + "_".join(f"{k}{v}" for k, v in config.items())
    folder = make_checkpoint(args, label, config)
    gguf_path = Path(args.work) / f"{label}.Q4_1.gguf"
    report = export_gguf(folder, gguf_path, "q4_1", tokenizer_pre=args.tokenizer_pre)
    kld = Path(args.work) / f"{label}.kld"
    ppl_llama = llama_ppl(args, gguf_path, Path(args.eval_text), args.agreement_ctx, args.agreement_chunks,
                          ["--kl-divergence-base", kld])  # fmt: skip
    n_ctx, n_chunk, tokens = read_kld_tokens(kld)
    kld.unlink()
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    add_bos = bool(reader.fields["tokenizer.ggml.add_bos_token"].contents())
    bos = int(reader.fields["tokenizer.ggml.bos_token_id"].contents()) if add_bos else None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    ppl_torch = torch_ppl_llama_protocol(model, tokens, n_ctx, n_chunk, bos)
    record(args, {
        "stage": "agreement", "checkpoint": config, "num_samples": args.num_samples, "gguf_type": "Q4_1",
        "export_rel_error": report.rel_error, "file_bytes": report.file_size, "ctx": n_ctx, "chunks": n_chunk,
        "ppl_llama_cpp": ppl_llama, "ppl_pytorch_llama_protocol": ppl_torch,
        "rel_diff": abs(ppl_llama - ppl_torch) / ppl_torch, "eval_text": Path(args.eval_text).name,
    })  # fmt: skip


def llama_file_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def llama_layer_types(types: dict[str, str], gguf_type: str) -> dict[str, str]:
    """``gguf_layer_types`` that give this project's checkpoint the type of llama.cpp's file (``types``, by GGUF tensor
    name) wherever ``gguf_type`` (with its fallback) would give another: one exact-name pattern per such layer."""
    import gguf

    from hf_decoupleq.solver.kquant import layer_format

    model = load_model(torch.float32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    out = {}
    for name, module in model.model.layers.named_modules(prefix="model.layers"):
        if not isinstance(module, torch.nn.Linear):
            continue
        want = types.get(names.get_name(f"{name}.weight", try_suffixes=(".weight",)))
        if want is not None and layer_format(gguf_type, module.in_features).ggml_type != want:
            out[re.escape(name)] = want
    return out


def stage_compare(args: argparse.Namespace) -> None:
    import hf_decoupleq  # noqa: F401
    from hf_decoupleq.export import export_gguf

    work = Path(args.work)
    f32 = work / "smollm2-f32.gguf"
    if not f32.is_file():
        run([tool(args, "llama-quantize"), "--allow-requantize", Path(gguf_folder()) / GGUF_NAME, f32, "F32"],
            work / "quantize_f32.log")  # fmt: skip
    imatrix = work / f"imatrix_c512_x{args.imatrix_chunks}.gguf"
    if not imatrix.is_file():
        run([tool(args, "llama-imatrix"), "-m", f32, "-f", DEFAULT_CALIB_PATH, "-c", 512, "--chunks",
             args.imatrix_chunks, "-o", imatrix, "-t", args.threads, "--no-repack"], work / "imatrix.log")  # fmt: skip
    for name in args.types:
        llama_type, flags = LLAMA_TYPES[name]
        theirs = work / f"llama-{name}.gguf"
        if not theirs.is_file():
            run([tool(args, "llama-quantize"), "--imatrix", imatrix, "--token-embedding-type", "f16", *flags, f32,
                 theirs, llama_type], work / f"quantize_{name}.log")  # fmt: skip
        types = {k: v.lower() for k, v in llama_file_types(theirs).items() if v not in ("F32", "F16")}
        config = parse_config(args.ours_config[name])
        label = "ckpt_" + "_".join(f"{k}{v}" for k, v in config.items())
        mix = llama_layer_types(types, config["gguf_type"]) if "gguf_type" in config else {}
        if mix:
            config["gguf_layer_types"] = mix
            label += "_mix" + hashlib.sha256(json.dumps(mix, sort_keys=True).encode()).hexdigest()[:8]
            logger.info("%s: %d layers take llama.cpp's other types: %s", name, len(mix), mix)
        folder = make_checkpoint(args, label, config)
        ours = work / f"ours-{name}-{label}.gguf"
        report = export_gguf(folder, ours, None, lossy=args.allow_lossy, tensor_types=types,
                             tokenizer_pre=args.tokenizer_pre)  # fmt: skip
        ours_types = {t.name: t.gguf_type.lower() for t in report.tensors if t.source != "float"}
        mismatched = sorted(n for n in types if ours_types.get(n) != types[n])
        if mismatched:
            raise SystemExit(f"tensor types differ from llama.cpp's file for {mismatched[:5]}")
        for who, path, extra in (("llama.cpp", theirs, {"imatrix_chunks": args.imatrix_chunks}),
                                 ("hf-decoupleq", ours, {"checkpoint": config, "num_samples": args.num_samples,
                                                         "exact": not report.lossy})):  # fmt: skip
            ppl = llama_ppl(args, path, Path(args.eval_text), 2048, args.chunks)
            record(args, {"stage": "compare", "type": name, "who": who, "file": path.name,
                          "file_bytes": path.stat().st_size, "ppl": ppl, "ctx": 2048, "chunks": args.chunks,
                          "eval_text": Path(args.eval_text).name, **extra})  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("agreement", "compare"))
    p.add_argument("--llama-cpp", default=str(DEFAULT_LLAMA_CPP), help="llama.cpp source folder with build/bin")
    p.add_argument("--work", default="bench_out/llamacpp", help="folder for checkpoints, GGUF files and logs")
    p.add_argument("--results", default=str(REPO / "examples" / "benchmarks" / "results" / "llamacpp.jsonl"))
    p.add_argument("--eval-text", default=str(DEFAULT_EVAL_PATH))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=32, help="calibration windows for this project's checkpoints")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--tokenizer-pre", default="smollm", help="pre-tokenizer written to this project's files")
    p.add_argument("--agreement-config", default="bits=4,group_size=128,method=rtn,blockwise=false")
    p.add_argument("--agreement-ctx", type=int, default=2048)
    p.add_argument("--agreement-chunks", type=int, default=2)
    p.add_argument("--types", nargs="+", default=["q4_0"], choices=sorted(LLAMA_TYPES))
    p.add_argument("--chunks", type=int, default=10, help="llama-perplexity --chunks of 2048 tokens")
    p.add_argument("--imatrix-chunks", type=int, default=128)
    p.add_argument(
        "--ours-q4-0",
        default="gguf_type=q4_0",
        help="this project's checkpoint for q4_0 (symmetric W4 g32 with fp16 scales is exactly Q4_0; the block-wise "
        "stage keeps the zeros tied to -8 s)",
    )
    p.add_argument("--ours-q2-k-pure", default="gguf_type=q2_k",
                   help="checkpoint for q2_k_pure (Q2_K where K % 256 == 0, the Q4_0 fallback elsewhere)")
    p.add_argument("--ours-q3-k-s", default="gguf_type=q3_k",
                   help="checkpoint for q3_k_s (Q3_K where K % 256 == 0, the Q4_0 fallback elsewhere)")
    p.add_argument("--ours-q4-k-s", default="gguf_type=q4_k",
                   help="checkpoint for q4_k_s (Q4_K where K % 256 == 0, Q5_0 elsewhere, and the layers llama.cpp's "
                   "file makes Q5_K / Q5_1 likewise)")
    p.add_argument("--ours-q4-k-m", default="gguf_type=q4_k",
                   help="checkpoint for q4_k_m (as q4_k_s; the layers llama.cpp's file makes Q6_K, or Q8_0 where Q6_K "
                   "falls back, likewise)")
    p.add_argument("--ours-q5-k-m", default="gguf_type=q5_k",
                   help="checkpoint for q5_k_m (Q5_K where K % 256 == 0, Q5_1 elsewhere, the Q6_K / Q8_0 layers of "
                   "llama.cpp's file likewise)")
    p.add_argument("--ours-q6-k", default="gguf_type=q6_k", help="checkpoint for q6_k (Q6_K, the Q8_0 fallback elsewhere)")
    p.add_argument("--allow-lossy", action="store_true", help="export through requantization where not exact")
    args = p.parse_args()
    args.ours_config = {"q4_0": args.ours_q4_0, "q2_k_pure": args.ours_q2_k_pure, "q3_k_s": args.ours_q3_k_s,
                        "q4_k_s": args.ours_q4_k_s, "q4_k_m": args.ours_q4_k_m, "q5_k_m": args.ours_q5_k_m,
                        "q6_k": args.ours_q6_k}  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    {"agreement": stage_agreement, "compare": stage_compare}[args.stage](args)


if __name__ == "__main__":
    main()
