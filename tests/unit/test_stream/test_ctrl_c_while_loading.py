"""A Ctrl-C while the ``streamrec`` command loads (a second or two of imports, before the
command can catch it) stops it as a later Ctrl-C does: ``streamrec: interrupted``, exit 130,
no KeyboardInterrupt traceback from inside an import."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# Runs the console script's entry point (pyproject.toml's [project.scripts], as pip's
# `streamrec` script does), with an import finder that sends this process a SIGINT when the
# command line module starts loading: a Ctrl-C pressed while the command loads.
CTRL_C_WHILE_LOADING = textwrap.dedent(
    """
    import os, signal, sys

    class CtrlC:
        def find_spec(self, name, path=None, target=None):
            if name == "stream.cli":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, CtrlC())
    sys.argv = ["streamrec", "produce", "--limit", "1"]
    from {module} import {function}
    sys.exit({function}())
    """
)


def test_a_ctrl_c_while_the_command_loads_says_interrupted_and_exits_130(tmp_path):
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["streamrec"]
    module, function = target.split(":")
    code = CTRL_C_WHILE_LOADING.format(module=module, function=function)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (out.returncode, out.stderr) == (130, "streamrec: interrupted\n")
