"""Benchmark figures as plots: reads result files and writes one PNG per file.

    python bench/plots.py                              # every file in bench/results/ -> bench/plots/
    python bench/plots.py FILE ... [-o DIR]            # these files -> DIR (default bench/plots/)

What it reads, told apart by content, not by name:

- ``vs_dpdk.py``'s output (``bench/results/vs_dpdk-*.txt``): the summary table
  (``dir size | pmd Mpps DPDK Mpps | pmd/DPDK min max | pairs``), pmd and DPDK side by
  side per direction and size, the ratio over each pair; a file with several runs
  (``=== base run 1`` ...) gives one group of bars per run;
- ``loopback.py``'s output (``bench/results/loopback-*.txt``): Mpps per mode, size and
  burst, pmd against the pure-Python reference (log scale), and the split/packed table
  when there is one;
- ``insn_vs_dpdk.py``'s output: instructions per packet, pmd and DPDK, per mode;
- a pytest-benchmark ``--benchmark-json`` file (``python -m pytest bench
  --benchmark-only --benchmark-json FILE``): packets per second of each benchmark
  (``extra_info["pps"]``, which bench/conftest.py records), or rounds per second for a
  benchmark without it.

A file of none of these kinds is reported and skipped. matplotlib is an optional
dependency (``pip install matplotlib``, or the ``test`` extra): without it the script
says so and exits with status 2. The PNGs are not committed; run the script to make them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE / "plots"

_VS_ROW = re.compile(r"^(tx|rx|io)\s+(\d+)\s+\|\s+([\d.]+)\s+([\d.]+)\s+\|\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\|", re.M)
_VS_HEAD = re.compile(r"^dir\s+size\s+\|\s+pmd Mpps\s+DPDK Mpps", re.M)
_RUN = re.compile(r"^=== (.+?)\s*$", re.M)
_LB_ROW = re.compile(r"^(zc|copy)\s+(\d+)\s+(\d+)\s+\|\s+([\d.]+)\s+[\d.]+\s+[\d.]+-[\d.]+\s+\|\s+([\d.]+)\s", re.M)
_LB_PACKED = re.compile(r"^(zc|copy)\s+(\d+)\s+(\d+)\s+\|\s+([\d.]+)\s+\|\s+([\d.]+)\s+\|\s+([\d.]+)\s*$", re.M)
_INSN = re.compile(r"^(pmd|DPDK) \(.*?\), (\w+): (\d+) instructions per packet", re.M)


def parse_vs_dpdk(text: str) -> list[tuple[str, list[tuple[str, float, float, float]]]]:
    """[(run label, [(condition "tx 64", pmd Mpps, DPDK Mpps, ratio)])], one per summary table."""
    tables = []
    runs = [(m.start(), m.group(1)) for m in _RUN.finditer(text)]
    for head in _VS_HEAD.finditer(text):
        label = next((name for at, name in reversed(runs) if at < head.start()), "")
        body = text[head.end():]
        rows = []
        for line in body.splitlines()[1:]:
            m = _VS_ROW.match(line)
            if not m:
                break
            rows.append((f"{m.group(1)} {m.group(2)}", float(m.group(3)), float(m.group(4)), float(m.group(5))))
        if rows:
            tables.append((label, rows))
    return tables


def parse_loopback(text: str) -> dict[str, Any]:
    rows = [(m.group(1), int(m.group(2)), int(m.group(3)), float(m.group(4)), float(m.group(5)))
            for m in _LB_ROW.finditer(text)]
    packed = [(f"{m.group(1)} {m.group(2)}", float(m.group(4)), float(m.group(5))) for m in _LB_PACKED.finditer(text)]
    return {"rows": rows, "packed": packed}


def parse_insn(text: str) -> dict[str, dict[str, int]]:
    """{mode: {"pmd": n, "DPDK": n}} of instructions per packet (the first figure of each)."""
    out: dict[str, dict[str, int]] = {}
    for m in _INSN.finditer(text):
        out.setdefault(m.group(2), {}).setdefault(m.group(1), int(m.group(3)))
    return out


def parse_benchmark_json(data: dict[str, Any]) -> list[tuple[str, float, str]]:
    """[(benchmark name, rate, unit)]: Mpps from extra_info["pps"], else rounds per second."""
    out = []
    for b in data.get("benchmarks", []):
        pps = b.get("extra_info", {}).get("pps")
        if pps:
            out.append((b["name"], float(pps) / 1e6, "Mpps"))
        elif b.get("stats", {}).get("mean"):
            out.append((b["name"], 1.0 / float(b["stats"]["mean"]), "rounds/s"))
    return out


def _grouped_bars(ax: Any, labels: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    width = 0.8 / max(len(series), 1)
    xs = range(len(labels))
    for k, (name, values) in enumerate(series.items()):
        bars = ax.bar([x + (k - (len(series) - 1) / 2) * width for x in xs], values, width, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(list(xs), labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend()


def plot_file(path: Path, outdir: Path, plt: Any) -> Path | None:
    """Write OUTDIR/<stem>.png for one result file; None when the file is of no known kind."""
    text = path.read_text(errors="replace")
    fig = None
    if path.suffix == ".json":
        try:
            rates = parse_benchmark_json(json.loads(text))
        except (ValueError, KeyError, TypeError):
            rates = []
        if rates:
            fig, ax = plt.subplots(figsize=(8, 0.4 * len(rates) + 1.5))
            units = sorted({u for _, _, u in rates})
            ax.barh([n for n, _, _ in rates], [r for _, r, _ in rates])
            ax.set_xlabel(" or ".join(units))
            ax.invert_yaxis()
            ax.set_title(f"pytest-benchmark: {path.name}")
    elif tables := parse_vs_dpdk(text):
        fig, axes = plt.subplots(len(tables), 1, figsize=(9, 4 * len(tables)), squeeze=False)
        for ax, (label, rows) in zip(axes[:, 0], tables):
            names = [r[0] + " B" for r in rows]
            _grouped_bars(ax, names, {"pmd": [r[1] for r in rows], "DPDK virtio-user": [r[2] for r in rows]}, "Mpps")
            ax.set_title(f"pmd vs DPDK, one vhost-user back-end{': ' + label if label else ''}")
            ratio = ax.twinx()
            ratio.plot(range(len(rows)), [r[3] for r in rows], "k.--", label="pmd/DPDK")
            ratio.set_ylabel("pmd / DPDK")
            ratio.set_ylim(0, max(1.2, max(r[3] for r in rows) * 1.1))
    elif (lb := parse_loopback(text))["rows"]:
        panels = 2 if lb["packed"] else 1
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
        rows = lb["rows"]
        bursts = sorted({r[2] for r in rows})
        ax = axes[0, 0]
        if len(bursts) > 1:           # a sweep of bursts: a line per mode and size
            for mode, size in sorted({(r[0], r[1]) for r in rows}):
                pts = sorted((r[2], r[3]) for r in rows if (r[0], r[1]) == (mode, size))
                ax.plot([b for b, _ in pts], [m for _, m in pts], "o-", label=f"pmd {mode} {size} B")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("burst")
            ax.set_ylabel("Mpps")
            ax.legend(fontsize=7)
        else:
            _grouped_bars(ax, [f"{r[0]} {r[1]} B" for r in rows],
                          {"pmd": [r[3] for r in rows], "pure Python": [r[4] for r in rows]}, "Mpps")
            ax.set_yscale("log")
        ax.set_title("in-process loopback, one core")
        if lb["packed"]:
            _grouped_bars(axes[0, 1], [p[0] + " B" for p in lb["packed"]],
                          {"split": [p[1] for p in lb["packed"]], "packed": [p[2] for p in lb["packed"]]}, "Mpps")
            axes[0, 1].set_title("split vs packed rings")
    elif insn := parse_insn(text):
        modes = sorted(insn)
        fig, ax = plt.subplots(figsize=(6, 4))
        _grouped_bars(ax, modes, {who: [float(insn[m].get(who, 0)) for m in modes] for who in ("pmd", "DPDK")},
                      "instructions per packet")
        ax.set_title("driver process, callgrind, 64 B")
    if fig is None:
        return None
    fig.tight_layout()
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / f"{path.stem}.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="result files (default: every file in bench/results/)")
    parser.add_argument("-o", "--output", type=Path, default=OUT, help="directory of the PNGs (default bench/plots/)")
    args = parser.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")            # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench/plots.py needs matplotlib: pip install matplotlib (or pip install -e '.[test]')", file=sys.stderr)
        return 2
    files = args.files or sorted(p for p in RESULTS.iterdir() if p.is_file())
    written = 0
    for path in files:
        out = plot_file(path, args.output, plt)
        if out is None:
            print(f"{path}: not a result file this script knows (vs_dpdk, loopback, insn_vs_dpdk, "
                  f"pytest-benchmark JSON); skipped", file=sys.stderr)
        else:
            print(f"{path} -> {out}")
            written += 1
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
