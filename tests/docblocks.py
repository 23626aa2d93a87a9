"""Code blocks of the documentation, run as tests: the README's examples
(tests/test_cli.py) and every block of docs/tutorial.md (tests/test_tutorial.py).

A fenced block is three backquotes, an info string and the code. The info
string's first word is the language (``sh``, ``python``, ``text``); further words
are tags. The one tag this module knows:

- ``skip-test``: the block is not run (installing pmd, what a test cannot do
  from inside the package it tests). tests/test_tutorial.py checks that only
  install commands carry it.

A ``text`` block right after a ``sh`` or ``python`` block is that block's
output, compared line by line (:func:`output_pattern`): every number in it
stands for any number (rates, counts and times differ from run to run), runs of
blanks for any blanks, ``...`` inside a line for any text and a line of only
``...`` for any number of lines; everything else must be printed as written.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
SKIP = "skip-test"
RUNNABLE = ("sh", "python")


@dataclass
class Block:
    lang: str
    tags: tuple[str, ...]
    code: str
    line: int                        # line of the opening fence, 1-based
    output: "Block | None" = field(default=None, repr=False)   # the text block that follows

    @property
    def skipped(self) -> bool:
        return SKIP in self.tags


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text in order; a ``text`` block that
    follows a runnable one with only blank lines between becomes its ``output``."""
    blocks: list[Block] = []
    prev_end = -1
    for m in FENCE.finditer(text):
        words = m.group(1).split()
        block = Block(words[0] if words else "", tuple(words[1:]), m.group(2), text.count("\n", 0, m.start()) + 1)
        if (block.lang == "text" and blocks and blocks[-1].lang in RUNNABLE and blocks[-1].output is None
                and not text[prev_end:m.start()].strip()):
            blocks[-1].output = block
        else:
            blocks.append(block)
        prev_end = m.end()
    return blocks


def block_after(text: str, heading: str, lang: str) -> Block:
    """The first ``lang`` block after the first occurrence of ``heading``."""
    at = text.find(heading)
    assert at >= 0, f"no {heading!r} in the text"
    first_line = text.count("\n", 0, at) + 1
    for block in fenced_blocks(text):
        if block.line > first_line and block.lang == lang:
            return block
    raise AssertionError(f"no {lang} block after {heading!r}")


def _line_pattern(line: str) -> str:
    parts = []
    for token in line.split():
        pieces = re.split(r"(\.\.\.|\d+(?:\.\d+)?)", token)
        rx = ""
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                rx += re.escape(piece)
            elif piece == "...":
                rx += r".*?"
            else:
                rx += r"\d+(?:\.\d+)?"
        parts.append(rx)
    return r"[ \t]*" + r"\s+".join(parts) + r"[ \t]*"


def output_pattern(expected: str) -> str:
    """A regular expression for printed output that the ``text`` block ``expected`` describes."""
    rx = ""
    for line in expected.splitlines():
        if line.strip() == "...":
            rx += r"(?:[^\n]*\n)*?"
        elif line.strip():
            rx += _line_pattern(line) + r"\n"
        else:
            rx += r"[ \t]*\n"
    return rx


def check_output(block: Block, printed: str, where: str) -> None:
    if block.output is None:
        return
    text = "".join(line.rstrip() + "\n" for line in printed.splitlines())
    if re.fullmatch(output_pattern(block.output.code), text) is None:
        raise AssertionError(f"{where}: printed\n{printed}\nwhich is not what the page says:\n{block.output.code}")


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: float) -> Any:
    def fire(signum: int, frame: object) -> None:
        raise _Timeout(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def shell_env(bindir: Path) -> dict[str, str]:
    """The environment of a page's shell blocks: ``python`` on PATH is this
    interpreter (a wrapper script, so a virtual environment stays one), and the
    ``pmd`` it imports is the one under test, a checkout's or an installed wheel's."""
    import pmd

    bindir.mkdir(parents=True, exist_ok=True)
    wrapper = bindir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    package_parent = str(Path(pmd.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    env.pop("SYSFS_PCI_DEVICES", None)
    return env


def run_page(blocks: list[Block], cwd: Path, *, name: str, timeout: float = 120,
             namespace: dict[str, Any] | None = None,
             printed_by: list[tuple[Block, str]] | None = None) -> dict[str, Any]:
    """Run every ``sh`` and ``python`` block not tagged ``skip-test``, in order, in
    ``cwd``: shell blocks with bash (``-e``: any failing command fails the block),
    Python blocks in one shared namespace (as one would type them into one
    interpreter), each with ``timeout``. Checks each exit and each printed output
    against the ``text`` block after it. Returns the namespace; ``printed_by`` gets
    (block, what it printed) for every block run."""
    ns: dict[str, Any] = {"__name__": "__tutorial__"} if namespace is None else namespace
    env = shell_env(cwd / ".bin")
    for block in blocks:
        if block.lang not in RUNNABLE or block.skipped:
            continue
        where = f"{name}:{block.line} ({block.lang})"
        if block.lang == "sh":
            r = subprocess.run(["bash", "-e", "-c", block.code], cwd=cwd, env=env, capture_output=True,
                               text=True, timeout=timeout)
            if r.returncode != 0:
                raise AssertionError(f"{where} exited {r.returncode}:\n{block.code}\n{r.stdout}{r.stderr}")
            check_output(block, r.stdout, where)
            if printed_by is not None:
                printed_by.append((block, r.stdout))
        else:
            printed = io.StringIO()
            code = compile(block.code, where, "exec")
            old = os.getcwd()
            os.chdir(cwd)
            try:
                with _alarm(timeout), contextlib.redirect_stdout(printed):
                    exec(code, ns)
            except Exception as e:
                raise AssertionError(f"{where} failed: {e!r}\n{block.code}\nprinted:\n{printed.getvalue()}") from e
            finally:
                os.chdir(old)
            check_output(block, printed.getvalue(), where)
            if printed_by is not None:
                printed_by.append((block, printed.getvalue()))
    return ns
