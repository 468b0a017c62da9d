"""The ``streamrec`` console script: :func:`stream.cli.main`, loaded so that a Ctrl-C while it
loads stops the command as a Ctrl-C later does.

Loading the command line (Typer, Faust, the models, PyTorch where installed) takes a second or
two; a Ctrl-C meanwhile, before ``main`` runs and can catch it, printed a KeyboardInterrupt
traceback from deep inside an import. It says ``streamrec: interrupted`` on stderr and exits
130 instead, as a Ctrl-C in a running command does.
"""

from __future__ import annotations

import sys

try:
    from stream.cli import main
except KeyboardInterrupt:
    sys.stderr.write("streamrec: interrupted\n")
    sys.exit(130)

__all__ = ["main"]
