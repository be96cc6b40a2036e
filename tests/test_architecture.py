"""The layers of pyproject.toml's [tool.importlinter] contract, checked by import-linter.

import-linter (grimp) finds a package's modules by walking its folder, and snowfed's
subpackages live beside it (pyproject's package-dir: client/, server/, strategies/, sim/, bench/). The
test therefore lays the installed package's shape out in a temporary folder, one link per
source file, and runs `lint-imports` on that."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"client": "client", "server": "server", "strategies": "strategies", "sim": "sim",
               "bench": "bench"}


def _package_tree(root: Path) -> Path:
    """root/snowfed as installed: snowfed/ with client/, server/, strategies/ and sim/ inside."""
    sources = {Path("snowfed"): REPO / "snowfed",
               **{Path("snowfed", name): REPO / folder for name, folder in SUBPACKAGES.items()}}
    for target, source in sources.items():
        for file in source.rglob("*.py"):
            link = root / target / file.relative_to(source)
            if link.exists():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(file)
    return root


def _lint(tree: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([str(lint), str(REPO / "pyproject.toml"), "--no-cache"], cwd=tree,
                          env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
                          text=True, timeout=300)


def test_the_import_layers_hold(tmp_path):
    done = _lint(_package_tree(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 kept, 0 broken" in done.stdout


def test_a_core_module_importing_the_simulator_breaks_the_contract(tmp_path):
    tree = _package_tree(tmp_path)
    metrics = tree / "snowfed" / "metrics.py"
    text = metrics.read_text()
    metrics.unlink()  # a copy of the link's file, with one import that goes up the layers
    metrics.write_text(text + "\nimport snowfed.sim.run.runner  # noqa\n")
    done = _lint(tree)
    assert done.returncode != 0
    assert "snowfed.metrics -> snowfed.sim.run.runner" in done.stdout, done.stdout[-3000:]
