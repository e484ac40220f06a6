"""Ablation (not a library feature): the end-to-end stage with trainable integer codes, on a saved checkpoint.

Every packed layer gets a float offset per code, zero at first; the stage's forward uses
``round(clamp(code + offset))`` with a straight-through gradient, and the offsets join the stage's Adam as one more
parameter group (step ``--code-lr`` levels, the stage's warm-up and cosine decay). After training the rounded codes
are packed back into ``qweight``. Everything else is ``hf_decoupleq.e2e.train_end_to_end`` as the pipeline runs it
(relative step ``--lr`` for scales, zeros and norms). Usage, on a checkpoint saved without the stage
(``bench_real_model.py --methods decoupleq-incoherent --save-models DIR``)::

    THREADS=2 python examples/benchmarks/ablation_e2e_trained_codes.py DIR/models/decoupleq-incoherent_w3g128 \\
        --windows DIR/calibration_windows.pt --code-lr 0.01 --out codes.jsonl

The stage's own "after" check runs without gradients, through the packed codes, so it does not see the offsets;
the script logs the KL on the same check windows once the codes are packed (``check_kl_packed``).
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
from torch import nn
from transformers import AutoModelForCausalLM

from hf_decoupleq import e2e
from hf_decoupleq.evaluation import perplexity
from hf_decoupleq.nn.linear import DecoupleQLinear
from hf_decoupleq.packing import pack

logger = logging.getLogger("ablation_e2e_trained_codes")


def attach_offsets(model: nn.Module) -> list[tuple[DecoupleQLinear, torch.Tensor, nn.Parameter]]:
    """Give every packed layer a trainable offset per code (not registered, so the stage does not freeze it)."""
    out = []
    for m in model.modules():
        if isinstance(m, DecoupleQLinear):
            base = m.unpacked_codes().float()
            offset = nn.Parameter(torch.zeros_like(base))
            top = 2**m.bits - 1

            def codes(base=base, offset=offset, top=top):
                value = (base + offset).clamp(0, top)
                return value + (value.round() - value).detach()  # straight-through rounding

            m.unpacked_codes = codes  # the differentiable forward reads the codes through this method
            out.append((m, base, offset))
    return out


def pack_offsets(layers) -> int:
    """Pack the trained codes into each layer's qweight; return how many codes changed."""
    changed = 0
    for m, base, offset in layers:
        codes = (base + offset.detach()).clamp(0, 2**m.bits - 1).round()
        changed += int((codes != base).sum())
        del m.unpacked_codes
        m.qweight.copy_(pack(codes.to(torch.uint8), m.bits))
        m._cache.clear()
        m.post_init()
    return changed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--windows", required=True)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--code-lr", type=float, default=0.01)
    p.add_argument("--out")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    cpu = torch.device("cpu")
    windows = torch.load(a.windows, weights_only=True)
    fp = _common.load_model(torch.float32)
    teacher = e2e.capture_teacher(fp, windows, batch_size=8, compute_dtype=torch.bfloat16, device=cpu)
    del fp
    q = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32)
    layers = attach_offsets(q)
    offsets = [offset for _, _, offset in layers]
    adam = torch.optim.Adam

    def with_offsets(groups, **kwargs):
        return adam([*groups, {"params": offsets, "lr": a.code_lr}], **kwargs)

    t0 = time.perf_counter()
    torch.optim.Adam = with_offsets  # the stage builds its optimizer with torch.optim.Adam
    try:
        stats = e2e.train_end_to_end(
            q, windows, teacher, epochs=1.0, lr=a.lr, norm_lr=a.lr, train_norms=True, compute_dtype=torch.bfloat16,
            device=cpu, seed=0, relative=True,
        )  # fmt: skip
    finally:
        torch.optim.Adam = adam
    moved = torch.cat([o.detach().abs().flatten() for o in offsets])
    changed = pack_offsets(layers)
    rec = {"ckpt": a.ckpt, "lr": a.lr, "code_lr": a.code_lr, "windows": int(windows.shape[0]), **stats,
           "codes_changed": changed, "codes": int(moved.numel()), "offset_abs_max": float(moved.max()),
           "stage_s": time.perf_counter() - t0}  # fmt: skip
    check = e2e._window_batches(teacher, windows)[:: max(len(windows) // 16, 1)][:16]
    rec["check_kl_packed"] = e2e._mean_loss(*e2e._parts(q), check, cpu, torch.bfloat16)
    logger.info("%d of %d codes changed; check KL with them packed %.5f", changed, rec["codes"], rec["check_kl_packed"])
    eval_input = evaluation_input(_common.load_tokenizer(), _common.DEFAULT_EVAL_PATH, 0)
    rec["ppl_after"] = perplexity(q, _common.load_tokenizer(), eval_input, seq_len=2048, max_windows=40,
                                  progress=False).ppl  # fmt: skip
    rec["env"] = environment(argparse.Namespace(threads=torch.get_num_threads(), device="cpu"))
    print(json.dumps(rec), flush=True)  # the script's product
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
