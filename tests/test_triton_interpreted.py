"""The Triton kernels against their references on the CPU, under Triton's interpreter.

The kernels only compile for a GPU; the interpreter runs the same kernel code with NumPy, so every
change to them is checked here too (tests/gpu repeats the cases compiled, at full size). It needs
the `triton` package, which the `test` extra installs; without it the test is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_triton_kernels_match_their_references_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(TESTS / "triton_cases.py")], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "all Triton kernels match their references" in result.stdout
