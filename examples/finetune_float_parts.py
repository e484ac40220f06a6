"""Fine-tune only the floating-point parts (scales, zeros, norms) of a decoupleQ model, then save it.

    python examples/finetune_float_parts.py --model out/ --text train.txt --steps 200 --output out-ft/

The integer codes stay frozen, so the result is the same packed format with no extra parameters.
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_decoupleq  # noqa: F401  (registers "decoupleq" with transformers)
from hf_decoupleq import prepare_for_training
from hf_decoupleq.calibration.data import get_calibration_windows

logger = logging.getLogger("finetune_float_parts")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved decoupleQ checkpoint (folder or Hub id)")
    parser.add_argument("--text", required=True, help="training text file (.txt/.jsonl/.parquet)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-train-norms", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    names = prepare_for_training(model, train_norms=not args.no_train_norms)
    windows = get_calibration_windows(
        args.text, tok, num_samples=args.steps * args.batch_size, seq_len=args.seq_len, seed=args.seed
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses = []
    for step in range(args.steps):
        batch = windows[step * args.batch_size : (step + 1) * args.batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0:
            logger.info("step %d loss %.4f", step, loss.item())
    model.eval()
    model.save_pretrained(args.output)
    tok.save_pretrained(args.output)
    return {"trainable": names, "losses": losses}


if __name__ == "__main__":
    main()
