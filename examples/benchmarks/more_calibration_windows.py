"""Calibration windows for the 'more windows' ablations of the end-to-end stage (docs/benchmarks.md): the
benchmark's 128 windows (of its seed), which get_calibration_windows returns first for a larger num_samples, and more.

Usage:
    python examples/benchmarks/more_calibration_windows.py BENCH_OUT/calibration_windows.pt OUT.pt [NUM_SAMPLES [SEED [SEQ_LEN]]]
NUM_SAMPLES defaults to 192, SEED to 0 (the benchmark's ``--seed``; 1 for its second protocol), SEQ_LEN to 512 (the
benchmark's ``--calib-seq-len``; with another length the windows are a draw of their own).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

from hf_decoupleq.calibration.data import get_calibration_windows

num_samples = int(sys.argv[3]) if len(sys.argv) > 3 else 192
seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
seq_len = int(sys.argv[5]) if len(sys.argv) > 5 else 512
windows = get_calibration_windows(
    str(_common.DEFAULT_CALIB_PATH), _common.load_tokenizer(), num_samples=num_samples, seq_len=seq_len, seed=seed
)
first = torch.load(sys.argv[1], weights_only=True)
same = windows.shape[1] == first.shape[1] and torch.equal(windows[: len(first)], first)
print(tuple(windows.shape), "first windows are the benchmark's:", same)
torch.save(windows, sys.argv[2])
