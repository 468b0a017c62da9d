"""``streamrec train`` stopped by SIGTERM (a job's stop) while it registers the model."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# a child that sends itself SIGTERM while the registry writes the staged version's files
CHILD = textwrap.dedent("""
    import os, signal, sys
    from gpu_scorer import registry
    synced = registry.fsync_path
    def stopped_while_syncing(path):
        os.kill(os.getpid(), signal.SIGTERM)
        return synced(path)
    registry.fsync_path = stopped_while_syncing
    from stream.cli import main
    sys.argv = ["streamrec", "train", "--limit", "3000", "--epochs", "1", "--dim", "16", "--no-progress",
                "--device", "cpu", "--serve-device", "cpu", "--model-dir", sys.argv[1]]
    main()
""")


def test_sigterm_while_registering_exits_143_and_leaves_no_staging_folder(tmp_path):
    models = tmp_path / "models"
    done = subprocess.run([sys.executable, "-c", CHILD, str(models)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, (done.returncode, done.stderr[-2000:])
    assert "streamrec train: stopped by SIGTERM" in done.stderr
    assert "Traceback" not in done.stderr
    # the signal's default death left .staging-<hex> with the model's files; nothing removed it
    assert [p.name for p in models.iterdir()] == [], list(models.iterdir())  # the lock is taken after the files are synced
    assert not (models / "CURRENT").exists()
