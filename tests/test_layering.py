"""The layering rules of ``pyproject.toml`` hold, and ``lint-imports`` does catch a forbidden import."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(folder: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``folder`` with the project's contracts."""
    env = {"PATH": str(LINT.parent), "PYTHONPATH": str(folder)}
    return subprocess.run([str(LINT), "--config", str(folder / "pyproject.toml"), "--no-cache"], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def copy_of_the_packages(tmp_path) -> Path:
    for package in ("xvlm", "datamodules"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_a_copy_of_the_packages_keeps_every_contract(copy_of_the_packages):
    clean = lint(copy_of_the_packages)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "BROKEN" not in clean.stdout and "KEPT" in clean.stdout


@pytest.mark.parametrize(("module", "bad_import", "broken"), [
    ("datamodules/bad.py", "import xvlm.ot", "datamodules import nothing from xvlm"),
    ("xvlm/zeroshot/bad.py", "from xvlm.methods.base import XVLMModule", "use methods only through xvlm.contracts"),
    ("xvlm/metrics/bad.py", "from xvlm.ot import sinkhorn", "xvlm.metrics imports no other xvlm module"),
    ("xvlm/backbones_extra.py", "import xvlm.methods\nimport xvlm.backbones", "no import cycles"),
])
def test_a_forbidden_import_breaks_the_build(copy_of_the_packages, module, bad_import, broken):
    path = copy_of_the_packages / module
    path.write_text(f"{bad_import}\n")
    if module == "xvlm/backbones_extra.py":  # close a circle: backbones -> backbones_extra -> methods -> backbones
        backbones = copy_of_the_packages / "xvlm/backbones.py"
        backbones.write_text(backbones.read_text() + "\nimport xvlm.backbones_extra  # noqa\n")
    result = lint(copy_of_the_packages)
    assert result.returncode != 0
    assert broken in result.stdout and "BROKEN" in result.stdout
