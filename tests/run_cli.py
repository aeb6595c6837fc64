"""Run the ``xvlm`` command in a subprocess, as a user would (shared by the end-to-end tests)."""

import os
import subprocess
import sys
from pathlib import Path


def xvlm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``xvlm *args`` in ``cwd`` with this test folder importable (for test-only callbacks)."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(Path(__file__).parent)}
    command = [str(Path(sys.executable).parent / "xvlm"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
