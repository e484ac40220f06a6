"""examples/benchmarks/gpu_suite.sh without a GPU: it skips the CUDA parts with a message, runs the tiny-model
quantize-on-load smoke on the CPU, writes its JSON record and exits 0."""

import json
import os
import subprocess

from conftest import REPO


def test_gpu_suite_cpu_mode(tmp_path):
    out = tmp_path / "suite.json"
    # Hide any GPU, and run the library's own CPU path (not Triton's interpreter) as a user would.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / "benchmarks" / "gpu_suite.sh"), "--out", str(out), "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record == json.loads(proc.stdout)
    assert record["device"]["cuda"] is False
    parts = record["parts"]
    assert list(parts) == ["prewarm", "kernels", "smoke_tiny", "smollm2_quantize", "decode", "vllm"]
    for name in ("prewarm", "kernels", "smollm2_quantize", "decode", "vllm"):
        assert parts[name]["status"] == "skipped" and "CUDA" in parts[name]["message"], parts[name]
        assert f"{name}: skipped" in proc.stderr
    smoke = parts["smoke_tiny"]
    assert smoke["status"] == "ok", smoke
    # 2 blocks x 7 linears quantized on load, all on the device, generation ran, and the saved packed checkpoint
    # reloads to the very same logits.
    assert smoke["device"] == "cpu" and smoke["packed_layers"] == smoke["packed_layers_on_device"] == 14
    assert smoke["new_tokens"] == 8 and smoke["logits_finite"] and smoke["reload_max_abs_diff"] == 0.0
    assert smoke["quantize_on_load_s"] > 0
