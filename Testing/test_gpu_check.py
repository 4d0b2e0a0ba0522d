"""bench/gpu_check.sh (issue 13): parses, and stops with one line where there is no CUDA device."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_gpu_check_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would really run")
def test_gpu_check_without_cuda_is_one_line(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert not (tmp_path / "gpu_check.md").exists()


def test_data_path_bench_has_the_options_the_check_uses():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_data_path.py"), "--help"],
                          capture_output=True, text=True, timeout=120, check=True)
    for option in ("--device", "--end-to-end", "--repeats", "--gpu-memory", "--out"):
        assert option in done.stdout
