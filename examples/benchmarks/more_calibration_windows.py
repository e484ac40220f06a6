"""Calibration windows for the 'more windows' ablations of the end-to-end stage (docs/benchmarks.md): the
benchmark's 128 windows (seed 0), which get_calibration_windows returns first for a larger num_samples, and more.

Usage:
    python examples/benchmarks/more_calibration_windows.py BENCH_OUT/calibration_windows.pt OUT.pt [NUM_SAMPLES]
NUM_SAMPLES defaults to 192.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

from hf_decoupleq.calibration.data import get_calibration_windows

num_samples = int(sys.argv[3]) if len(sys.argv) > 3 else 192
windows = get_calibration_windows(
    str(_common.DEFAULT_CALIB_PATH), _common.load_tokenizer(), num_samples=num_samples, seq_len=512, seed=0
)
first = torch.load(sys.argv[1], weights_only=True)
print(tuple(windows.shape), "first windows are the benchmark's:", torch.equal(windows[: len(first)], first))
torch.save(windows, sys.argv[2])
