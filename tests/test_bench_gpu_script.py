"""bench/gpu.py's code path on the CPU with miniature shapes: it runs, and ours and transformers
generate the same tokens in every mode (the GPU runs at real sizes only happen when a GPU is
lent, so this is what keeps the script from rotting in between)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


@pytest.mark.parametrize("model", ["tiny", "tiny-t5"])
def test_gpu_benchmark_runs_on_cpu_and_both_implementations_agree(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, str(BENCH), "--model", model, "--device", "cpu", "--modes", "fp16,int8,int4,int4-all",
               "--repeats", "1", "--new-tokens", "8", "--workdir", str(tmp_path / "work")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OUT": str(out)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / f"gpu-{model}.json").read_text())
    assert set(report["modes"]) == {"fp16", "int8", "int4", "int4-all"}
    for mode, result in report["modes"].items():
        assert "error" not in result, (mode, result.get("error"))
        assert all(t["first_difference"] is None for t in result["tokens"].values()), mode
        ours, reference = result["weights"]["ours"], result["weights"]["reference"]
        assert ours["llm_weight_bytes"] == reference["llm_weight_bytes"], mode
        assert ours["quantized_linear_layers"] == reference["quantized_linear_layers"], mode
    layers = {mode: r["weights"]["ours"]["quantized_linear_layers"] for mode, r in report["modes"].items()}
    # T5 keeps its feed-forward output (wo, one per block) out of 8/4-bit unless int4-all asks.
    extra = 4 if model == "tiny-t5" else 0  # 2 encoder + 2 decoder blocks
    assert layers["int4-all"] == layers["int4"] + extra and layers["fp16"] == 0
    assert "### summary" in done.stdout
