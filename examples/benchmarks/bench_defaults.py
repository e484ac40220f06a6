"""The library defaults (``batch_size="auto"``, ``calibration_dtype="auto"``) against the benchmark's settings.

Runs ``bench_real_model.py`` twice on one machine, one after the other, on its fixed protocol (SmolLM2-135M, 128
WikiText-2 windows of 512 tokens, perplexity on the first 40 test windows of 2048 tokens), with the project's
default method (``decoupleq-e2e``: SignSGD block-wise stage, incoherence processing, end-to-end stage) at W2 g64
and W3 g128:

- ``defaults``: ``--batch-size auto --calibration-dtype auto`` (what a user gets without setting them);
- ``bench``: ``--batch-size 8 --calibration-dtype bfloat16`` (the benchmark's own settings).

Writes ``OUT/defaults/``, ``OUT/bench/`` (each a ``bench_real_model.py`` output folder: ``results.jsonl``, logs) and
``OUT/comparison.json`` / ``OUT/comparison.md``: per setting, the quantization times and their ratio
(defaults / bench; target <= 1.1), both perplexities, and what "auto" resolved to on this machine::

    python examples/benchmarks/bench_defaults.py --out bench_out/defaults [--resume] [--threads 2]

Each of the four runs takes about as long as one decoupleQ row of the README table (minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = "w2g64,w3g128"
METHOD = "decoupleq-e2e"
VARIANTS = {
    "defaults": ["--batch-size", "auto", "--calibration-dtype", "auto"],
    "bench": ["--batch-size", "8", "--calibration-dtype", "bfloat16"],
}


def records(folder: Path) -> dict[str, dict]:
    path = folder / "results.jsonl"
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("status") == "ok" and rec.get("method") == METHOD:
                out[rec["setting"]] = rec  # the last successful record of a setting wins
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_out/defaults"), help="output folder")
    p.add_argument("--configs", default=SETTINGS, help=f"settings to compare (default: {SETTINGS})")
    p.add_argument("--resume", action="store_true", help="skip runs that already have a record")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--eval-windows", type=int, default=40, help="WikiText-2 test windows (default 40)")
    args = p.parse_args(argv)

    for name, flags in VARIANTS.items():
        cmd = [sys.executable, str(HERE / "bench_real_model.py"), "--methods", METHOD, "--configs", args.configs,
               "--eval-windows", str(args.eval_windows), "--out", str(args.out / name), *flags]  # fmt: skip
        if args.resume:
            cmd.append("--resume")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    defaults, bench = records(args.out / "defaults"), records(args.out / "bench")
    rows = []
    for setting in args.configs.split(","):
        d, b = defaults.get(setting), bench.get(setting)
        if d is None or b is None:
            continue
        rows.append({
            "setting": setting,
            "defaults_quant_s": d["quant_s"],
            "bench_quant_s": b["quant_s"],
            "time_ratio": d["quant_s"] / b["quant_s"],
            "defaults_ppl": d["ppl"],
            "bench_ppl": b["ppl"],
            "defaults_resolved": d.get("calibration_resolved"),
            "bench_resolved": b.get("calibration_resolved"),
        })  # fmt: skip
    env = next(iter(defaults.values()), {}).get("env", {})
    (args.out / "comparison.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    lines = [
        f"Defaults vs bench settings, `{METHOD}`, {env.get('cpu', '?')} ({env.get('torch_threads', '?')} threads)",
        "",
        "| setting | defaults resolved to | quant s (defaults) | quant s (bench) | ratio | ppl (defaults) | ppl (bench) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        res = r["defaults_resolved"] or {}
        lines.append(
            f"| {r['setting']} | batch {res.get('batch_size')}, {res.get('calibration_dtype') or 'model dtype'} "
            f"| {r['defaults_quant_s']:.1f} | {r['bench_quant_s']:.1f} | {r['time_ratio']:.3f} "
            f"| {r['defaults_ppl']:.4f} | {r['bench_ppl']:.4f} |"
        )
    (args.out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
