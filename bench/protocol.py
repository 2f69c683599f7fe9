"""Issue 20's evaluation protocol: one recipe across SMAP in full, SMAP-early, SMAP-new, the
synthetic series and the same series as a fleet, in one table of sequence precision, recall
and F1 and their mean.

    python bench/protocol.py [--seeds 0,1,2,3,4] [--jobs 2] [--json OUT] [--plots DIR]
                             [--scores PREFIX.npz] [--channels P-1,S-1] [--series ...]

SMAP runs its per-channel models (`bench/configs/smap.toml`), SMAP-early the same models with
each test stream starting 1,000 events before the channel's first label (`quality_smap
--early`), SMAP-new with it starting 250 events before (a fault in a new device's first few
hundred events), the synthetic set its per-series models (`bench/configs/synthetic.toml`:
the data's shape only) and the synthetic fleet one model for all 15 series (`quality_synthetic
--mode shared`), as a fleet of devices gets. A data set's row is the mean over `--seeds` when
several are given (the synthetic sets': the mean of their five kinds), else the one run's; the
last row is the mean of the data sets, each weighing alike. `--channels`, `--series` and
`--epochs` make a small trial of the protocol, not its result. `--scores PREFIX.npz` writes
each data set's score dump (layout: `bench/quality_report.py`'s docstring) next to it, as
PREFIX-<data set>.npz.
"""

from __future__ import annotations

import argparse

import quality_smap
import quality_synthetic
from quality_report import (
    common_arguments,
    console,
    field_means,
    rates_table,
    training_arguments,
    write_json,
)

#: SMAP-early's and SMAP-new's events before each channel's first labeled sequence.
EARLY, NEW = 1000, 250


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser, "protocol")
    training_arguments(parser)
    parser.add_argument("--channels", help="SMAP channels of a trial (default: all)")
    parser.add_argument("--series", help="synthetic series of a trial (default: all 15)")
    args = parser.parse_args()

    smap, synthetic = _argvs(args)
    smap_full = quality_smap.run(_named(smap, args, "smap"))["per_channel"]
    early = [*smap, "--early", str(EARLY)]
    smap_early = quality_smap.run(_named(early, args, "smap_early"))["per_channel"]
    new = [*smap, "--early", str(NEW)]
    smap_new = quality_smap.run(_named(new, args, "smap_new"))["per_channel"]
    series = quality_synthetic.run(_named(synthetic, args, "synthetic"))
    fleet_argv = [*synthetic, "--mode", "shared"]
    fleet = quality_synthetic.run(_named(fleet_argv, args, "synthetic_fleet"))
    rows = {
        "SMAP": _row(smap_full, "total"),
        "SMAP-early": _row(smap_early, "total"),
        "SMAP-new": _row(smap_new, "total"),
        "synthetic": _row(series, "mean"),
        "synthetic-fleet": _row(fleet, "mean"),
    }
    #: Keys in alert for most of their normal events (first seed): their labels are all
    #: "caught" by one episode, so a data set's figures mean little while any are.
    in_alert = {
        "SMAP": smap_full["total"]["channels_mostly_in_alert"],
        "SMAP-early": smap_early["total"]["channels_mostly_in_alert"],
        "SMAP-new": smap_new["total"]["channels_mostly_in_alert"],
        "synthetic": len(series["series_mostly_in_alert"]),
        "synthetic-fleet": len(fleet["series_mostly_in_alert"]),
    }
    mean = field_means(list(rows.values()))
    seeds = "the configurations' seed" if args.seeds == [None] else f"seeds {args.seeds}"
    console.print(rates_table(f"protocol ({seeds})", "data set", rows | {"mean": mean}))
    console.print(f"keys mostly in alert (first seed): {in_alert}")
    write_json(
        args.json,
        {"seeds": args.seeds, "data_sets": rows, "mean": mean, "keys_mostly_in_alert": in_alert},
    )


def _argvs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The command lines of SMAP's per-channel run and of the synthetic run."""
    smap = [*_shared_argv(args, "smap"), "--mode", "per_channel"]
    if args.channels:
        smap += ["--channels", args.channels]
    synthetic = _shared_argv(args, "synthetic")
    if args.series:
        synthetic += ["--series", args.series]
    return smap, synthetic


def _shared_argv(args: argparse.Namespace, data_set: str) -> list[str]:
    """The options every benchmark of the protocol gets alike."""
    argv = ["--data", str(args.data), "--work", str(args.work / data_set)]
    argv += ["--jobs", str(args.jobs), "--cooldown", str(args.cooldown)]
    if args.seeds != [None]:
        argv += ["--seeds", ",".join(map(str, args.seeds))]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    return argv


def _named(argv: list[str], args: argparse.Namespace, run: str) -> list[str]:
    """`argv` with the run's own plot folder and score dump, when asked for."""
    if args.plots:
        argv = [*argv, "--plots", str(args.plots / run)]
    if args.scores:
        argv = [*argv, "--scores", str(args.scores.with_name(f"{args.scores.stem}-{run}.npz"))]
    return argv


def _row(result: dict, headline: str) -> dict:
    """A data set's figures: the mean over seeds when there are several, else the run's
    `headline` (SMAP's total, the synthetic set's mean of kinds)."""
    return field_means([result.get("seed_mean", result[headline])])


if __name__ == "__main__":
    main()
