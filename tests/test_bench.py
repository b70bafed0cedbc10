"""The benchmark scripts run (smoke sizes) and print the ratios they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def test_ppo_memory_benchmark_compares_both_layouts():
    result = subprocess.run(
        [sys.executable, "bench/ppo_memory.py", "--smoke-test", "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shared: peak memory" in result.stdout and "separate: peak memory" in result.stdout
    ratios = json.loads(result.stdout.split("RATIOS ", 1)[1].splitlines()[0])
    assert ratios["memory"] > 0 and ratios["time"] > 0
