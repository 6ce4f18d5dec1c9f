"""The README's code blocks that claim to run do: each is marked ``<!-- runs: HOW -->`` on the line above
its fence, and this file runs every marked block (an unknown HOW fails, so a marked block cannot be skipped).

- ``python``: the block runs in a fresh ``python`` process from a temporary folder (outputs go there), with
  the repository root importable (``examples/``).
- ``.ci/run``: the block's commands (the README's set-up) must be, verbatim and in order, commands of
  ``.ci/run``, which CI runs in a brand-new virtualenv; running them here would reinstall this venv.

``examples/hf_trainer.py`` (named in the README) runs as a script and must print "same losses".
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"^<!-- runs: (?P<how>\S+) -->\n```(?P<lang>\w*)\n(?P<code>.*?)^```$", re.M | re.S)
RUNNERS = ("python", ".ci/run")


def _blocks() -> list[tuple[str, str, int]]:
    text = (ROOT / "README.md").read_text()
    markers = text.count("<!-- runs:")
    blocks = [(m["how"], m["code"], text[: m.start()].count("\n") + 1) for m in MARKED.finditer(text)]
    assert len(blocks) == markers, "a '<!-- runs: ... -->' marker is not directly above a ``` fence"
    return blocks


BLOCKS = _blocks()


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: the CPU path needs no Triton interpreter
    return env


def test_readme_marks_the_set_up_and_the_trainer_example():
    hows = [how for how, _, _ in BLOCKS]
    assert hows.count(".ci/run") == 1 and hows.count("python") >= 1, hows
    assert all(how in RUNNERS for how in hows), f"unknown runner in {hows}; known: {RUNNERS}"


@pytest.mark.parametrize("how,code,line", [b for b in BLOCKS if b[0] == "python"], ids=lambda v: str(v)[:12])
def test_python_block_runs(how, code, line, tmp_path):
    proc = subprocess.run([sys.executable, "-"], input=code, cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stderr[-4000:]}"


def test_set_up_commands_are_what_ci_runs():
    (code,) = [code for how, code, _ in BLOCKS if how == ".ci/run"]
    commands = [c.strip() for c in code.splitlines() if c.strip() and not c.strip().startswith("#")]
    assert len(commands) == 2, commands  # install, test
    ci = [c.strip() for c in (ROOT / ".ci" / "run").read_text().splitlines()]
    # .ci/run wraps pytest in pytest_checked (exit code 5, no tests, must fail): same arguments.
    ci = [re.sub(r"^pytest_checked ", "python -m pytest ", c) for c in ci]
    at = [ci.index(c) if c in ci else -1 for c in commands]
    assert -1 not in at and at == sorted(at), f"README set-up {commands} not run in this order by .ci/run"


def test_hf_trainer_example_gives_the_unpatched_losses():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_trainer.py")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "same losses" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
