"""The 192 calibration windows of the 'more windows' ablation (docs/benchmarks.md): the benchmark's 128 windows
(seed 0), which get_calibration_windows returns first for num_samples=192, and 64 more.

Usage, from the repository root: python examples/benchmarks/more_calibration_windows.py
    BENCH_OUT/calibration_windows.pt windows192.pt
"""

import sys

import torch

sys.path.insert(0, "examples/benchmarks")
import _common

from hf_decoupleq.calibration.data import get_calibration_windows

windows = get_calibration_windows(
    "../shared/data/wikitext2/wiki.valid.tokens", _common.load_tokenizer(), num_samples=192, seq_len=512, seed=0
)
first = torch.load(sys.argv[1], weights_only=True)
print(tuple(windows.shape), "first 128 are the benchmark's:", torch.equal(windows[:128], first))
torch.save(windows, sys.argv[2])
