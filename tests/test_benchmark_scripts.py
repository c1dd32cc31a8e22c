"""The loop-overhead benchmark runs against today's loop: its scripted drafter follows the drafter interface
(it broke unnoticed once, when the loop began passing the drafts per step), and acceptance is what it scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_overhead_runs_and_reports_its_scripted_acceptance():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_overhead.py"), "--new-tokens", "32",
                           "--repeats", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["1"], ["4"])]
    assert [r[0] for r in rows] == ["1", "4"]
    for row in rows:
        steps, acceptance = int(row[1]), float(row[2])
        # one wrong draft every third step: acceptance is well above one token a step and below a whole block
        assert steps > 0 and 1.5 < acceptance <= 8.0
