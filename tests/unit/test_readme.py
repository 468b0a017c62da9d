"""The README's commands exist: its make targets are in the Makefile, and every `streamrec`
command and option it shows is accepted by the CLI (checked through --help, which
parses the command line without running anything). The quick start itself runs, line by
line as written, in tests/integration/test_quickstart.py."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CODE = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S))
STREAMREC_LINES = [line.split("#")[0].strip() for line in CODE.splitlines() if line.startswith(".venv/bin/streamrec")]


def test_the_two_commands_are_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "up", "down"):
        assert f"make {target}" in README or target in ("up", "down")
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"no '{target}' target in the Makefile"


@pytest.mark.parametrize("line", STREAMREC_LINES)
def test_readme_streamrec_lines_parse(line):
    args = shlex.split(line)[1:]
    command, options = args[0], [a for a in args[1:] if a.startswith("--")]
    out = subprocess.run([sys.executable, "-m", "stream.cli", command, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for option in options:
        assert option in out.stdout, f"`streamrec {command}` has no option {option}"


def test_readme_shows_the_cli():
    assert len(STREAMREC_LINES) >= 5
