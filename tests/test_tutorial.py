"""docs/tutorial.md, run: every ``sh`` and ``python`` block in order (tests/docblocks.py),
its exit checked and what it prints compared with the ``text`` block after it; then what
the page claims about the results (the DataFrame's rows and columns, the DuckDB counts,
the capture file) is checked on the objects the blocks left behind.

The runner itself is tested on small pages: a block that fails, or prints something the
page does not say, fails the run.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

from .docblocks import Block, fenced_blocks, output_pattern, run_page

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"

needs_analytics = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("pyarrow", "pandas", "duckdb")),
    reason="the tutorial's last steps need pyarrow, pandas and duckdb (pip install -e '.[test]')")


def _blocks() -> list[Block]:
    return fenced_blocks(TUTORIAL.read_text())


def test_only_install_commands_are_skipped() -> None:
    skipped = [b for b in _blocks() if b.skipped]
    assert skipped, "the install blocks should be marked skip-test"
    for b in skipped:
        assert b.lang == "sh" and re.search(r"\bpip install\b|scripts/setup\.sh", b.code), b


def test_every_block_is_shell_python_or_the_output_of_one() -> None:
    for b in _blocks():
        assert b.lang in ("sh", "python"), f"docs/tutorial.md:{b.line}: a {b.lang or 'bare'} block is not run"


def test_the_shell_blocks_run_pmd_as_python_dash_m() -> None:
    # `python -m pmd` runs the pmd of the interpreter under test, installed or a checkout.
    for b in _blocks():
        if b.lang == "sh" and not b.skipped:
            for line in filter(None, (ln.split("#")[0].strip() for ln in b.code.splitlines())):
                assert line.startswith("python -m pmd "), f"docs/tutorial.md:{b.line}: {line}"


@needs_analytics
def test_the_tutorial_runs_as_written(tmp_path: Path) -> None:
    ns: dict[str, Any] = {}
    printed: list[tuple[Block, str]] = []
    try:
        run_page(_blocks(), tmp_path, name="docs/tutorial.md", namespace=ns, printed_by=printed)
    finally:
        port = ns.get("port")
        if port is not None:
            port.close()
    # what the page says about the results, on the objects themselves
    n, df, batch = ns["n"], ns["df"], ns["batch"]
    assert 0 < n <= 32 and len(df) == n == batch.num_rows
    from pmd.arrow import schema

    assert list(df.columns) == schema().names
    assert (df["length"] == ns["lengths"][:n]).all() and (df["src_port"] >= 1024).all()
    assert sum(p for _, p, _ in ns["flows"]) == 10_000 and len(ns["flows"]) == 4
    assert len(ns["packets"]) == 1000 and (tmp_path / "x.pcap").stat().st_size > 1000 * 16
    assert ns["port"].closed
    shell = {b.code.split()[3]: out for b, out in printed if b.lang == "sh"}     # python -m pmd WORD
    assert float(re.search(r"^summary: mode=io .*\bmpps=([\d.]+)", shell["fwd"], re.M)[1]) > 0
    assert re.search(r"^summary: captured=1000 ", shell["capture"], re.M), shell["capture"]


# ---------------------------------------------------------------------------- the runner can fail

PAGE = """\
```python
x = 6 * 7
print("answer", x)
```

```text
answer 42
```

```sh
python -c "print('from the shell')"
```

```text
from the shell
```
"""


def test_runner_passes_a_page_that_is_right(tmp_path: Path) -> None:
    ns = run_page(fenced_blocks(PAGE), tmp_path, name="page")
    assert ns["x"] == 42


@pytest.mark.parametrize("edit", [
    ("6 * 7", "6 * undefined_name"),                        # a block that raises
    ('print("answer", x)', 'print("answr", x)'),            # prints what the page does not say
    ("from the shell')", "from the shell'); import sys; sys.exit(3)"),   # a command that fails
    ("```text\nfrom the shell\n```", "```text\nfrom the shell\nand more\n```"),  # output the page promises
])
def test_runner_fails_a_page_that_is_wrong(tmp_path: Path, edit: tuple[str, str]) -> None:
    page = PAGE.replace(*edit)
    assert page != PAGE
    with pytest.raises(AssertionError):
        run_page(fenced_blocks(page), tmp_path, name="page")


def test_skip_test_blocks_are_not_run(tmp_path: Path) -> None:
    page = "```sh skip-test\nexit 1\n```\n\n```python skip-test\nraise SystemExit(1)\n```\n"
    assert all(b.skipped for b in fenced_blocks(page))
    run_page(fenced_blocks(page), tmp_path, name="page")


def test_numbers_in_the_output_stand_for_any_number_and_words_for_themselves() -> None:
    rx = output_pattern("received 32 packets at ...\n...\nend 1.5\n")
    assert re.fullmatch(rx, "received 7 packets at noon\nx\ny\nend 20.25\n")
    assert re.fullmatch(rx, "received 7 packets at noon\nend 2\n")
    assert not re.fullmatch(rx, "received seven packets at noon\nend 2\n")
    assert not re.fullmatch(rx, "received 7 packets at noon\nend 2\nextra\n")
