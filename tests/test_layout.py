"""The package layout follows the data flow (DESIGN.md): data → models → training → evaluation → CLIs.

Each layer may import only the layers below it; the check reads every import statement of the
package (module level and inside functions), so a lazy import back up the flow fails too.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from barnfast.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "barnfast"

# layer -> the barnfast layers it may import (besides itself); the shared leaves are always allowed.
# The recipe schema (config.py) is read by the trainer; it imports nothing of barnfast but errors.
SHARED = {"barnfast", "barnfast.errors", "barnfast.optional", "barnfast.kernels"}
ALLOWED = {
    "data": set(),
    "models": {"data"},
    "training": {"data", "models", "config"},
    "evaluation": {"data", "models"},
    "config": set(),
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            # `from barnfast import train`: the submodule counts, `__version__` does not
            out += [f"barnfast.{a.name}" for a in node.names if node.module == "barnfast"
                    and ((PKG / a.name).is_dir() or (PKG / f"{a.name}.py").exists())]
    return [m for m in out if m == "barnfast" or m.startswith("barnfast.")]


def _files(layer: str) -> list[Path]:
    return sorted((PKG / layer).rglob("*.py")) if (PKG / layer).is_dir() else [PKG / f"{layer}.py"]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_import_runs_back_up_the_data_flow(layer):
    bad = []
    for path in _files(layer):
        for module in _imports(path):
            if module in SHARED or module.startswith("barnfast.kernels."):
                continue
            target = _layer(module)
            if target and target != layer and target not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, f"barnfast/{layer} may import only {sorted(ALLOWED[layer]) or 'no other layer'}:\n" + "\n".join(bad)


def test_no_top_level_kernels_package():
    """`kernels` at top level would shadow the PyPI package that transformers probes for."""
    import barnfast.kernels

    assert Path(barnfast.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert "kernels" not in sys.modules or getattr(sys.modules["kernels"], "__file__", "") != barnfast.kernels.__file__


def test_every_subcommand_has_a_module_with_main():
    import importlib

    for name, (module, _) in SUBCOMMANDS.items():
        assert callable(importlib.import_module(module).main), name


@pytest.mark.parametrize("argv", [["-m", "barnfast", "--help"], ["-m", "barnfast", "train", "--help"],
                                  ["-m", "barnfast.train", "--help"], ["-m", "barnfast", "eval", "--help"]])
def test_command_line_help(argv):
    res = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout


def test_unknown_subcommand_lists_the_known_ones():
    res = subprocess.run([sys.executable, "-m", "barnfast", "trian"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "unknown subcommand 'trian'" in res.stderr and "train" in res.stderr
