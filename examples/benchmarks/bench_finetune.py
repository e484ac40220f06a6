"""Fine-tuning the floating-point parts of a quantized SmolLM2-135M: WikiText-2 perplexity before and after.

The paper's extension (issue "beyond the paper", part 1): with the integer codes frozen, train only the packed
linears' scales and zeros (and the norm weights) with the plain language-modelling loss, then report perplexity on
the real-model benchmark's test windows before and after, and check that the codes did not move and that the saved
checkpoint reloads to the trained model.

Steps:

1. the quantized model: ``--quantized DIR`` if it already holds a decoupleQ checkpoint, otherwise SmolLM2-135M
   (GGUF, float32) is quantized with the library's default method at ``--bits``/``--group-size`` on the real-model
   benchmark's calibration protocol (128 x 512 tokens of ``wiki.valid.tokens``, seed 0, ``batch_size=8``,
   ``calibration_dtype="bfloat16"``) and saved there;
2. perplexity on the first ``--eval-windows`` windows of 2048 tokens of ``wiki.test.raw`` (the table's protocol);
3. ``hf_decoupleq.prepare_for_training`` + Adam for ``--steps`` steps of ``--batch-size`` windows of ``--seq-len``
   tokens drawn from ``wiki.valid.tokens`` with ``--train-seed`` (linear warm-up, then linear decay to 0);
4. perplexity again; save the fine-tuned model, reload it, compare codes and logits.

Outputs in ``--out``: ``results.json`` (every figure, the loss curve), ``results.md``, the checkpoints.

    python examples/benchmarks/bench_finetune.py --out bench_out/finetune

Smoke test (a few minutes)::

    python examples/benchmarks/bench_finetune.py --out /tmp/ft_smoke --num-samples 8 --steps 4 --eval-windows 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # a sibling helper module, not an installed package

logger = logging.getLogger("bench_finetune")
EVAL_SEQ_LEN = 2048


def is_checkpoint(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") or {}
    return qc.get("quant_method") == "decoupleq"


def quantize_to(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Quantize the float32 SmolLM2 with the library's defaults on the benchmark's calibration protocol; save it."""
    import hf_decoupleq
    from hf_decoupleq.calibration.data import get_calibration_windows

    tokenizer = _common.load_tokenizer()
    model = _common.load_model(torch.float32)
    windows = get_calibration_windows(
        str(args.calib_data), tokenizer, num_samples=args.num_samples, seq_len=args.calib_seq_len, seed=args.seed
    )
    cfg = hf_decoupleq.DecoupleQConfig(
        bits=args.bits,
        group_size=args.group_size,
        dataset=windows,
        num_samples=args.num_samples,
        seq_len=args.calib_seq_len,
        seed=args.seed,
        batch_size=8,
        calibration_dtype="bfloat16",
    )
    t0 = time.perf_counter()
    hf_decoupleq.quantize(model, cfg, tokenizer=tokenizer)
    quant_s = time.perf_counter() - t0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    logger.info("quantized in %.1f s, saved to %s", quant_s, folder)
    return {"quant_s": quant_s, "calib_sha256": _common.tensor_sha256(windows)}


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_decoupleq  # noqa: F401  (registers "decoupleq")

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from hf_decoupleq import DecoupleQLinear

    return {n: m.qweight.detach().clone() for n, m in model.named_modules() if isinstance(m, DecoupleQLinear)}


def lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def train(model, windows: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    from hf_decoupleq import prepare_for_training

    names = prepare_for_training(model, train_norms=not args.no_train_norms)
    params = dict(model.named_parameters())
    norm_params = [params[n] for n in names if not n.endswith((".scales", ".zeros"))]
    quant_params = [params[n] for n in names if n.endswith((".scales", ".zeros"))]
    groups = [{"params": quant_params, "lr": args.lr}]
    if norm_params:
        groups.append({"params": norm_params, "lr": args.norm_lr})
    optimizer = torch.optim.Adam(groups)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    autocast = args.train_dtype == "bfloat16"
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * lr_factor(step, args.steps, args.warmup)
        batch = windows[step * args.batch_size : (step + 1) * args.batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            recent = losses[-10:]
            logger.info(
                "step %d/%d loss %.4f (mean of last %d: %.4f), %.1f s/step",
                step + 1,
                args.steps,
                losses[-1],
                len(recent),
                sum(recent) / len(recent),
                (time.perf_counter() - t0) / (step + 1),
            )
    model.eval()
    train_s = time.perf_counter() - t0
    return {
        "trainable_tensors": len(names),
        "trainable_parameters": sum(p.numel() for p in quant_params + norm_params),
        "train_s": train_s,
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_out/finetune"), help="output folder")
    p.add_argument("--quantized", type=Path, default=None, help="quantized checkpoint (default OUT/quantized)")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=128, help="calibration windows when quantizing (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="calibration seed (default 0)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per step (default 1)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training window (default 512)")
    p.add_argument("--train-seed", type=int, default=1, help="seed of the training windows (default 1)")
    p.add_argument("--lr", type=float, default=2e-5, help="Adam lr of scales and zeros (default 2e-5)")
    p.add_argument("--norm-lr", type=float, default=1e-4, help="Adam lr of the norm weights (default 1e-4)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (default 10)")
    p.add_argument("--no-train-norms", action="store_true", help="train scales and zeros only")
    p.add_argument(
        "--train-dtype",
        choices=("float32", "bfloat16"),
        default="bfloat16",
        help="bfloat16: forward under CPU bf16 autocast (parameters and optimizer stay float32; default)",
    )
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--calib-data", type=Path, default=_common.DEFAULT_CALIB_PATH)
    p.add_argument("--eval-data", type=Path, default=_common.DEFAULT_EVAL_PATH)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    _common.setup_logging(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("steps", "batch_size", "eval_windows", "num_samples"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    from hf_decoupleq.calibration.data import get_calibration_windows
    from hf_decoupleq.evaluation import perplexity

    args.out.mkdir(parents=True, exist_ok=True)
    qdir = args.quantized or args.out / "quantized"
    record: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if is_checkpoint(qdir):
        logger.info("using the quantized checkpoint in %s", qdir)
    else:
        record["quantization"] = quantize_to(qdir, args)

    model, tokenizer = load(qdir)
    record["quantization_config"] = {
        k: v for k, v in model.config.quantization_config.to_dict().items() if k != "quantization_stats"
    }
    before_codes = codes(model)
    ppl = lambda m: perplexity(m, tokenizer, args.eval_data, seq_len=EVAL_SEQ_LEN, max_windows=args.eval_windows)
    record["ppl_before"] = ppl(model).ppl
    logger.info("perplexity before fine-tuning: %.4f", record["ppl_before"])

    windows = get_calibration_windows(
        str(args.calib_data),
        tokenizer,
        num_samples=args.steps * args.batch_size,
        seq_len=args.seq_len,
        seed=args.train_seed,
    )
    record.update(train(model, windows, args))
    record["ppl_after"] = ppl(model).ppl
    logger.info("perplexity after fine-tuning: %.4f", record["ppl_after"])

    after_codes = codes(model)
    record["codes_identical"] = before_codes.keys() == after_codes.keys() and all(
        torch.equal(before_codes[k], after_codes[k]) for k in before_codes
    )
    ft_dir = args.out / "finetuned"
    model.save_pretrained(ft_dir)
    tokenizer.save_pretrained(ft_dir)
    probe = windows[:1, : min(args.seq_len, 256)]
    with torch.no_grad():
        trained_logits = model(input_ids=probe).logits
        reloaded, _ = load(ft_dir)
        reloaded_logits = reloaded(input_ids=probe).logits
    record["reload_max_abs_logit_diff"] = (trained_logits - reloaded_logits).abs().max().item()
    record["environment"] = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    first = sum(record["losses"][:10]) / min(10, len(record["losses"]))
    last = sum(record["losses"][-10:]) / min(10, len(record["losses"]))
    table = "\n".join(
        [
            f"# Fine-tuning the float parts: SmolLM2-135M W{args.bits} g{args.group_size}",
            "",
            "| | WikiText-2 ppl | train loss (mean of 10 steps) |",
            "|---|---:|---:|",
            f"| before | {record['ppl_before']:.2f} | {first:.4f} (first) |",
            f"| after {args.steps} steps | {record['ppl_after']:.2f} | {last:.4f} (last) |",
            "",
            (
                f"{record['trainable_parameters']:,} trainable parameters in {record['trainable_tensors']} tensors; "
                f"{args.steps} Adam steps of {args.batch_size} x {args.seq_len} tokens of wiki.valid.tokens (seed "
                f"{args.train_seed}), lr {args.lr:g} (scales/zeros) / {args.norm_lr:g} (norms), {args.train_dtype} forward, "
                f"{record['train_s']:.0f} s. Codes identical: {record['codes_identical']}; reloaded checkpoint max |logit "
                f"diff| {record['reload_max_abs_logit_diff']:.3g}. Perplexity: first {args.eval_windows} windows of "
                f"{EVAL_SEQ_LEN} tokens of wiki.test.raw."
            ),
            "",
        ]
    )
    (args.out / "results.md").write_text(table, encoding="utf-8")
    print(table)  # the script's product; everything else goes through logging
    if not math.isfinite(record["ppl_after"]) or not record["codes_identical"]:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
