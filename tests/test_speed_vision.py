"""benchmarks/speed_vision.py runs end to end on synthetic images and prints its table (a smoke test: no timings
are asserted; the numbers live in docs/vision.md)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_vision.py"


def test_speed_vision_quick_synthetic_prints_every_row():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--synthetic", "--threads", "1", "--device", "cpu",
                           "--all-rows"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    names = [row.split("|")[1].strip() for row in rows]
    assert "input pipeline, batches/s" in names
    for method in ("fine-tuning", "ER, buffer 500", "DER++, buffer 500"):
        assert names.count(f"step: {method}, ms/step") == 2  # beside the bare loop and the per-sample pipeline
        assert method in names  # the epoch table
    assert "synthetic" in done.stdout and "threads" in done.stdout and " MB" in done.stdout
