"""Block-wise stage variants on SmolLM2-135M's first decoder blocks: output MSE before/after and time.

Each variant quantizes the first ``--blocks`` decoder blocks in order (layer-wise stage, then its block-wise stage;
each block's inputs are the previous quantized block's outputs, as in the full pipeline) on the calibration
windows of the real-model benchmark (128 x 512 tokens of WikiText-2 validation, seed 0), and prints, per block,
the block-wise stage's output MSE before and after training and its time. A quick way to compare optimizers,
learning rates and epochs without running all 30 blocks and the perplexity evaluation.

    python examples/benchmarks/bench_blockwise.py --blocks 3 --threads 1 \\
        --variants '[{"blockwise_lr": 1e-5}, {"blockwise_optimizer": "signsgd", "blockwise_epochs": 1}]'

Every variant starts from ``bits=2, group_size=64, blockwise_epochs=2, batch_size=8, calibration_dtype="bfloat16"``
(the benchmark's W2 g64 setting) and overrides it with its own ``DecoupleQConfig`` fields.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # a sibling helper module, not an installed package

BASE = {
    "bits": 2,
    "group_size": 64,
    "num_samples": 128,
    "seq_len": 512,
    "seed": 0,
    "batch_size": 8,
    "calibration_dtype": "bfloat16",
    "blockwise": True,
    "blockwise_epochs": 2,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", required=True, help="JSON list of dicts of DecoupleQConfig overrides")
    p.add_argument("--blocks", type=int, default=3, help="first N decoder blocks (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument(
        "--calib-data",
        default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"),
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = json.loads(args.variants)

    from hf_decoupleq import DecoupleQConfig, pipeline
    from hf_decoupleq.calibration.data import get_calibration_windows

    tok = _common.load_tokenizer()
    model = _common.load_model(torch.float32)
    _common.drop_source_quantization_config(model)
    windows = get_calibration_windows(args.calib_data, tok, num_samples=128, seq_len=512, seed=0)
    _, blocks = pipeline.find_decoder_blocks(model)
    cpu = torch.device("cpu")
    with torch.no_grad():
        first_inputs = pipeline.capture_block_inputs(model, blocks[0], windows, BASE["batch_size"])
    for overrides in variants:
        cfg = DecoupleQConfig(**{**BASE, "dataset": windows, **overrides})
        compute_dtype = pipeline._calibration_dtype(cfg, model)
        inputs, rows, t0 = first_inputs, [], time.perf_counter()
        for i in range(args.blocks):
            block = copy.deepcopy(blocks[i])
            replay = pipeline.ChildReplay(block, [], len(inputs.hidden))
            stats = pipeline.quantize_block(
                block, inputs, cfg, block_name=f"model.layers.{i}", block_index=i, skip=[], device=cpu,
                compute_dtype=compute_dtype, replay=replay,
            )  # fmt: skip
            rows.append(
                {
                    "block": i,
                    "mse_before": stats.get("blockwise_initial_mse"),
                    "mse_after": stats.get("blockwise_final_mse"),
                    "blockwise_s": round(stats.get("seconds_blockwise", 0.0), 1),
                }
            )
            outputs = pipeline.forward_quantized_block(block, inputs, cpu, compute_dtype=compute_dtype, replay=replay)
            inputs = pipeline.BlockInputs(outputs, inputs.kwargs)
        print(json.dumps({"variant": overrides, "blocks": rows, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
