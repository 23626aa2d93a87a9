"""DPDK's ``dpdk-testpmd`` as a vhost-user back-end for the tests (Debian's dpdk-dev).

``--no-huge``: testpmd's memory is then plain anonymous memory, so no huge pages need
reserving on the test machine (its vhost library maps pmd's memfd either way).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

TESTPMD = shutil.which("dpdk-testpmd")

_NO_TESTPMD = "dpdk-testpmd is not installed (apt-get install --no-install-recommends dpdk-dev)"


def needs_testpmd(test):
    """Skip without testpmd, saying so; with PMD_REQUIRE_DPDK=1 (CI) fail instead: a skip there is a
    missing check."""
    if os.environ.get("PMD_REQUIRE_DPDK", "") not in ("", "0"):
        if TESTPMD is None:
            def missing(*args, **kwargs):
                pytest.fail(f"PMD_REQUIRE_DPDK=1, but {_NO_TESTPMD}")
            missing.__name__ = test.__name__
            return missing
        return test
    return pytest.mark.skipif(TESTPMD is None, reason=_NO_TESTPMD)(test)


class DpdkBackend:
    """One ``dpdk-testpmd`` with a vhost-user port in io mode, stopped by PID at the end."""

    def __init__(self, path: str, log_path: str, *, client: bool = False, peer: str | None = None,
                 mode: str = "io", queues: int = 1, extra: tuple[str, ...] = ()) -> None:
        # One port: io forwarding sends what port 0 receives back out of port 0 (an echo).
        # With ``peer``, a second vhost-user port there: io forwards 0 -> 1 and 1 -> 0.
        self.prefix = f"pmdvu{os.getpid()}x{int(time.monotonic() * 1000) % 100000}"
        vdevs = []
        for i, iface in enumerate([path] + ([peer] if peer else [])):
            vdevs += ["--vdev", f"net_vhost{i},iface={iface},queues={queues}" + (",client=1" if client else "")]
        cmd = [TESTPMD, "--lcores", "0@0,1@1", "--main-lcore", "0", "--no-pci", "--file-prefix", self.prefix,
               "--no-huge", "-m", "1024", *vdevs, "--", f"--forward-mode={mode}", "--nb-cores=1",
               f"--rxq={queues}", f"--txq={queues}", "--stats-period", "1", *extra,
               # testpmd drains and drops whatever its ports hold when forwarding starts; in server mode
               # pmd is connected (and may be sending) before that
               "--no-flush-rx"]
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_for_socket(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self.proc.poll() is not None:
                raise AssertionError(f"testpmd exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"testpmd made no socket in {timeout} s:\n{self.output()}")
            time.sleep(0.02)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> int:
        """SIGINT by PID (testpmd prints its statistics and exits), SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)  # its runtime files, our prefix
        return self.proc.returncode

    def forwarded(self) -> tuple[int, int]:
        """RX and TX packets of port 0 in testpmd's final forward statistics."""
        text = self.output()
        block = text[text.rindex("Forward statistics for port 0"):]
        rx = re.search(r"RX-packets:\s+(\d+)", block)
        tx = re.search(r"TX-packets:\s+(\d+)", block)
        assert rx and tx, block
        return int(rx.group(1)), int(tx.group(1))
