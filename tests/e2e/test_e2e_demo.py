"""``writewatchd demo`` (what ``make demo`` runs): a daemon, a spawned writer, the writewatch CLI's live view."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_watches_the_writer_with_the_writewatch_command() -> None:
    writewatchd = Path(sys.executable).parent / "writewatchd"
    done = subprocess.run(
        [str(writewatchd), "demo", "--seconds", "1"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "spawned the demo writer" in done.stdout
    # The summary table printed by `writewatch watch` (its n_pages row shows a non-zero count).
    n_pages = next(line.split()[1] for line in done.stdout.splitlines() if line.split()[:1] == ["n_pages"])
    assert int(n_pages.replace(",", "")) > 0
