"""How long the command-line tools take to start: `--help` and `--version` of both.

    python bench/startup.py [--runs N] [--json OUT]

Each command runs N times (default 7) in a fresh interpreter, `python -c pass` too as the
baseline of this machine and its load; the median wall time of each is reported in seconds
and as a multiple of the baseline, against the targets (0.5 s for `detector`, 1.5 s for
`trainer`). The commands run as `python -c "from <package>.cli import main; main([...])"` with
this interpreter, which is what the installed `detector` and `trainer` scripts do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

#: Seconds each tool should start within, per issue 21.
TARGETS = {"detector": 0.5, "trainer": 1.5}
COMMANDS = [(tool, option) for tool in TARGETS for option in ("--help", "--version")]


@dataclass(frozen=True)
class Timing:
    command: str
    median_s: float
    ratio: float
    target_s: float | None

    @property
    def verdict(self) -> str:
        if self.target_s is None:
            return ""
        return "ok" if self.median_s <= self.target_s else "over target"


def wall_time(code: str) -> float:
    """Seconds for a fresh interpreter to run `code` and exit; its output is discarded."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def cli_code(tool: str, option: str) -> str:
    """`tool option` as the console script runs it (argparse exits 0 after printing)."""
    return f"from {tool}.cli import main; main([{option!r}])"


def measure(runs: int) -> list[Timing]:
    """Median times, the runs of every command interleaved so that load drifts hit all alike."""
    codes = {"python -c pass": "pass"} | {
        f"{tool} {option}": cli_code(tool, option) for tool, option in COMMANDS
    }
    samples: dict[str, list[float]] = {name: [] for name in codes}
    for _ in range(runs):
        for name, code in codes.items():
            samples[name].append(wall_time(code))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    baseline = medians["python -c pass"]
    return [
        Timing(name, median, median / baseline, TARGETS.get(name.split()[0]))
        for name, median in medians.items()
    ]


def report(timings: list[Timing]) -> str:
    lines = [f"{'command':<20} {'median s':>9} {'x pass':>7} {'target s':>9}"]
    for timing in timings:
        target = "" if timing.target_s is None else f"{timing.target_s:.1f}"
        lines.append(
            f"{timing.command:<20} {timing.median_s:>9.3f} {timing.ratio:>7.1f} {target:>9}"
            f"  {timing.verdict}".rstrip()
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command (default 7)")
    parser.add_argument("--json", type=Path, help="also write the timings as JSON here")
    args = parser.parse_args()
    timings = measure(args.runs)
    print(report(timings))
    if args.json:
        args.json.write_text(json.dumps([asdict(t) for t in timings], indent=2) + "\n")
    return 0 if all(t.verdict != "over target" for t in timings) else 1


if __name__ == "__main__":
    raise SystemExit(main())
