"""The end-to-end stage (hf_decoupleq.e2e) alone, on a saved checkpoint: an ablation of its step size and length.

Loads a decoupleQ checkpoint saved without the stage (``bench_real_model.py --methods decoupleq-incoherent
--save-models DIR``), captures the teacher from the full-precision SmolLM2-135M on the same calibration windows
(``calibration_windows.pt`` of that benchmark folder), runs ``train_end_to_end`` with the given settings, then
measures WikiText-2 test perplexity on the fixed protocol (first 40 windows of 2048 tokens) and appends one JSON line
to ``--out``::

    python examples/benchmarks/bench_e2e.py bench_out/models/decoupleq-incoherent_w2g64 \\
        --windows bench_out/calibration_windows.pt --lr 3e-4 --out examples/benchmarks/results/e2e/lr_sweep.jsonl

``THREADS`` (environment, default 1) sets torch's thread count.
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import torch
from bench_real_model import environment, evaluation_input
from transformers import AutoModelForCausalLM

from hf_decoupleq.e2e import capture_teacher, train_end_to_end
from hf_decoupleq.evaluation import perplexity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--norm-lr", type=float, default=1e-4)
    p.add_argument("--no-norms", action="store_true")
    p.add_argument("--relative", action="store_true", help="each packed layer's step = lr x the mean |scale| of that layer")
    p.add_argument("--seed", type=int, default=0, help="order of the windows in the stage")
    p.add_argument("--windows", required=True, help="calibration_windows.pt of the benchmark that made the checkpoint")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-offset", type=int, default=0,
                   help="skip this many evaluation windows first (bench_real_model.py's second protocol)")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--skip-base-eval", action="store_true", help="do not measure the checkpoint before the stage")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    tok = _common.load_tokenizer()
    windows = torch.load(a.windows, weights_only=True)
    if a.max_windows:
        windows = windows[: a.max_windows]
    fp = _common.load_model(torch.float32)
    t0 = time.perf_counter()
    teacher = capture_teacher(fp, windows, batch_size=8, compute_dtype=torch.bfloat16, device=torch.device("cpu"))
    t_teacher = time.perf_counter() - t0
    del fp
    q = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32)
    rec = {"ckpt": a.ckpt, "epochs": a.epochs, "lr": a.lr, "norm_lr": a.norm_lr, "norms": not a.no_norms,
           "relative": a.relative, "seed": a.seed, "windows": int(windows.shape[0]), "teacher_s": t_teacher}  # fmt: skip
    rec["env"] = environment(argparse.Namespace(threads=torch.get_num_threads(), device="cpu"))
    measure = {"seq_len": 2048, "max_windows": a.eval_windows, "progress": False}
    eval_input = evaluation_input(tok, _common.DEFAULT_EVAL_PATH, a.eval_offset)
    if a.eval_offset:
        rec["eval_offset_windows"] = a.eval_offset
    if not a.skip_base_eval:
        rec["ppl_before"] = perplexity(q, tok, eval_input, **measure).ppl
    stats = train_end_to_end(
        q, windows, teacher, epochs=a.epochs, lr=a.lr, norm_lr=a.norm_lr, train_norms=not a.no_norms,
        compute_dtype=torch.bfloat16, device=torch.device("cpu"), seed=a.seed,
        relative=a.relative,
    )  # fmt: skip
    rec.update(stats)
    t0 = time.perf_counter()
    rec["ppl_after"] = perplexity(q, tok, eval_input, **measure).ppl
    rec["eval_s"] = time.perf_counter() - t0
    print(json.dumps(rec), flush=True)  # the script's product
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
