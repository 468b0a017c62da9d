"""`streamrec train` run as a job (cron, a Kubernetes Job: its output a log, not a terminal)
said nothing from "read N events" until the end of the training, minutes later: rich draws its
progress bar there only once, when it stops. Each epoch is a line of the log now."""

from __future__ import annotations

import io

from rich.console import Console
from tiny_models import TINY, tiny_sequences

from gpu_scorer.training import TrainConfig, train


class Lines(io.StringIO):
    """A log file that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_a_training_whose_output_is_no_terminal_logs_a_line_each_epoch():
    log = Lines()
    console = Console(file=log, force_terminal=False, width=200)
    assert not console.is_terminal
    tc = TrainConfig(epochs=3, batch_size=64, patience=5, progress=True)
    train(tiny_sequences(), TINY, tc, console=console)
    said = [w for w in log.writes if "epochs," in w]
    assert [next(p for p in ("(1/3", "(2/3", "(3/3") if p in w) for w in said] == ["(1/3", "(2/3", "(3/3"], log.writes
    assert all("val HR@10" in w for w in said)


def test_no_progress_logs_no_epoch_lines():
    log = Lines()
    train(tiny_sequences(), TINY, TrainConfig(epochs=1, batch_size=64, progress=False),
          console=Console(file=log, force_terminal=False))
    assert not log.getvalue()
