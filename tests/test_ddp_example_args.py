"""examples/ddp_train.py refuses --resume without --checkpoint-dir instead of ignoring it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_resume_without_checkpoint_dir_is_an_error():
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "ddp_train.py"), "--resume"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2  # argparse's usage error
    assert "--resume needs --checkpoint-dir" in result.stderr
