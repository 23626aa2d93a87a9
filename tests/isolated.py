"""Run a piece of code in a fresh interpreter: a test of something that could
kill the process (a segfault, an abort) sees it as a failed test with the
signal's number instead of losing the whole test run.

The child runs this checkout's pmd (cwd and PYTHONPATH), and inherits the
environment, so under scripts/sanitize.sh it runs the sanitized build too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_isolated(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def describe(r: subprocess.CompletedProcess[str]) -> str:
    how = f"exit status {r.returncode}"
    if r.returncode < 0:
        how = f"killed by {signal.Signals(-r.returncode).name}"
    return f"{how}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-8000:]}"


def check_isolated(code: str, *args: str, timeout: float = 300) -> str:
    """run_isolated, and fail unless the child exited 0; returns its stdout."""
    r = run_isolated(code, *args, timeout=timeout)
    assert r.returncode == 0, describe(r)
    return r.stdout
