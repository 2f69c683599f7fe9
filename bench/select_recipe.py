"""Choose the forecast recipe's alerting settings by cross-validation, never on the labels
a figure is reported on.

    python bench/select_recipe.py --smap SMAP.npz --synthetic SYNTHETIC.npz [--fleet FLEET.npz]
                                  [--buffers 0,100] [--splits 100] [--json OUT]

The score dumps come from `bench/protocol.py --scores PREFIX.npz` (or the two benches'
`--scores`): each key's smoothed scores, in time order, as one model per key scored them.
Alerting does not change the scores, so every candidate setting is replayed offline here
with the engine's own rules (`detector.engine.thresholds.choose_levels` every `refresh` scores over
the last `history`, the warm-up and its floor, the floor, confirmation and
cooldown, as `detector.engine.core` applies them), and judged per labeled sequence as the
benchmarks judge. Each smoothing's static threshold is calibrated as the trainer calibrates
it, on the normal validation scores of the model's keys smoothed with it.
With `--check`, the replay is checked against the engine first: with the settings the dumps
were made with, it must give the dumped thresholds, and its calibration the trainer's static
ones, or the script stops.

Four data sets are judged: SMAP, SMAP-early (each channel's stream from 1,000 events before
its first label), SMAP-new (from 250 events before it: a fault in a new device's first few
hundred events, which the other two never have) and the synthetic series with a model each.
`--fleet` adds a fifth, the same series with one model for all of them (a fleet, whose static
threshold is calibrated on all its keys' validation scores at once, as the trainer does). A
setting's objective is the mean of their sequence F1s (each pooled over keys and averaged
over seeds).

- **Channel and series halves:** `--splits` times, the SMAP channels and the synthetic
  series are halved at random (a channel's three streams stay on one side, and so do a
  series' two). The
  best setting on one half is scored on the other, and the other way round. The mean of
  those held-out F1s is the honest estimate of the selection.
- **Leave one data set out:** the best setting on the three SMAP sets is scored on the
  synthetic sets, and the best on the synthetic sets is scored on the SMAP sets.

The setting chosen most often across the halvings, with the default options, is the
recipe's (`trainer/recipe.py`).
Last, the recipe is replayed with each of its settings switched off in turn, on all keys:
a setting earns its place on the data sets where that loses F1.
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from protocol import EARLY, NEW
from quality_report import MOSTLY_IN_ALERT, console, table, write_json

from detector.engine.thresholds import choose_levels
from trainer.calibrate import dynamic_threshold, smooth_per_key
from trainer.data import VALIDATION
from trainer.metrics import episode_flags, range_counts

#: The data set of the synthetic series scored by one model for all of them.
FLEET = "synthetic-fleet"
#: The engine's re-choice schedule and cooldown, as the recipe and the benchmarks use them.
HISTORY, REFRESH, COOLDOWN = 2100, 70, 100
#: Each alerting setting at the value that switches it off: the recipe without it.
WITHOUT: dict[str, dict[str, Any]] = {
    "smoothing": {"smoothing": 1.0},
    "adaptive threshold": {"adaptive": False},
    "pruning margin": {"prune": 0.0},
    "error buffer": {"buffer": 0},
    "warm-up": {"warm_up": 0, "warm_up_floor": None},
    "alerts while warming": {"warm_up_floor": None},
    "confirmation": {"confirm": 1},
    "smallest error": {"min_scaled_error": 0.0},
}
#: How far the replay's static thresholds may be from the trainer's (relative): the trainer
#: calibrates on torch's scores of its validation windows, the replay on the engine's.
STATIC_TOLERANCE = 0.01
#: The candidates: telemanom's margin and wider ones; the margin over every score below the
#: threshold, or (telemanom's error buffer) over those more than 100 scores from one above it;
#: a key's own history deciding from its first score, or after a sixth or a third of the
#: history, and until then no alerts or only above 2, 3 or 5 times its calibrated threshold.
GRID = {
    "smoothing": (0.02, 0.1),
    "prune": (0.13, 0.2, 0.3),
    "buffer": (0, 100),
    "warm_up": (0, 350, 700),
    "warm_up_floor": (None, 2.0, 3.0, 5.0),
    "confirm": (1, 5, 10),
    "min_scaled_error": (0.05, 0.1, 0.2),
}


@dataclass(frozen=True)
class Setting:
    smoothing: float
    prune: float
    buffer: int
    warm_up: int
    warm_up_floor: float | None
    confirm: int
    min_scaled_error: float
    #: False: one static threshold for every event (no `[threshold.advanced.adaptive]`).
    adaptive: bool = True


@dataclass
class Stream:
    """One key's scores under one seed, and what the engine needs beside them."""

    data_set: str
    key: str
    seed: str
    #: The model's scores before smoothing (recovered from the dumped smoothed ones).
    raw: np.ndarray
    labels: np.ndarray
    static: float
    unit: float
    #: The model's scores of its validation events, before smoothing.
    validation: np.ndarray
    #: Which validation events are labeled anomalous (the trainer calibrates on the others).
    validation_labels: np.ndarray
    #: The scores smoothed with each candidate α.
    smoothed: dict[float, np.ndarray] = field(default_factory=dict)
    #: The static threshold the trainer calibrates with each candidate α.
    statics: dict[float, float] = field(default_factory=dict)
    #: Each re-choice's level for each (α, prune, buffer) [choices].
    levels: dict[tuple[float, float, int], np.ndarray] = field(default_factory=dict)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smap", type=Path, required=True, help="SMAP score dump (.npz)")
    parser.add_argument("--synthetic", type=Path, help="synthetic score dump (optional)")
    parser.add_argument("--fleet", type=Path, help="synthetic fleet score dump (optional)")
    parser.add_argument("--splits", type=int, default=100, help="random halvings (default 100)")
    parser.add_argument(
        "--buffers",
        default="0",
        help="the error buffers to choose from, of the grid's 0 and 100 (default 0, the "
        "recipe's selection): the held-out estimates with and without 100 tell whether the "
        "buffer earns its place",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the halvings")
    parser.add_argument(
        "--check",
        nargs=len(GRID),
        metavar=tuple(GRID),
        help="the dumps' own setting: checks the replay",
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    smap = _streams(args.smap, "SMAP")
    streams = smap + [_early(s, EARLY, "SMAP-early") for s in smap]
    streams += [_early(s, NEW, "SMAP-new") for s in smap]
    if args.synthetic:
        streams += _streams(args.synthetic, "synthetic")
    if args.fleet:
        streams += _streams(args.fleet, FLEET)
    settings = [
        setting
        for setting in (Setting(*values) for values in itertools.product(*GRID.values()))
        if setting.warm_up or setting.warm_up_floor is None  # a floor of no warm-up: a twin
        if str(setting.buffer) in args.buffers.split(",")
    ]
    console.print(f"{len(streams)} streams; replaying {len(settings)} settings")
    _prepare_levels(streams, settings)
    if args.check:
        dumps = {"SMAP": args.smap, "synthetic": args.synthetic, FLEET: args.fleet}
        _check(
            streams,
            {name: path for name, path in dumps.items() if path},
            _parse_setting(args.check),
        )
    replayed = Table(streams, settings)
    halvings = _halvings(replayed, args.splits, args.seed)
    document = {
        "grid": GRID,
        "halvings": halvings,
        "leave_one_data_set_out": _leave_one_out(replayed),
        "without": _without(streams, Setting(**halvings["recipe"])),
    }
    write_json(args.json, document)


def _streams(path: Path, data_set: str) -> list[Stream]:
    dump = np.load(path)
    prefixes = sorted({name.rsplit("/", 1)[0] for name in dump.files})
    return [
        Stream(
            data_set,
            prefix.split("/", 1)[1],
            prefix.split("/", 1)[0],
            _unsmoothed(dump[f"{prefix}/test_scores"], float(dump[f"{prefix}/smoothing"])),
            dump[f"{prefix}/test_labels"] > 0,
            float(dump[f"{prefix}/static_threshold"]),
            float(dump[f"{prefix}/unit_score"]),
            *_validation(dump, prefix),
        )
        for prefix in prefixes
    ]


def _validation(dump: np.lib.npyio.NpzFile, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """The unsmoothed scores of the trainer's validation events, as the engine replayed the
    training file, and their labels."""
    raw = _unsmoothed(dump[f"{prefix}/train_scores"], float(dump[f"{prefix}/smoothing"]))
    validation = dump[f"{prefix}/train_split"] == VALIDATION
    return raw[validation], dump[f"{prefix}/train_labels"][validation] > 0


def _unsmoothed(smoothed: np.ndarray, alpha: float) -> np.ndarray:
    """The scores an EWMA of weight `alpha` (started from zero) turned into `smoothed`:
    s[t] = α r[t] + (1 - α) s[t-1] solved for r[t]."""
    previous = np.concatenate([[0.0], smoothed[:-1]])
    return (smoothed - (1 - alpha) * previous) / alpha


def _smoothed(raw: np.ndarray, alpha: float) -> np.ndarray:
    """The engine's EWMA of a key's scores (`detector.engine.alerts.smooth`), in float64."""
    if alpha == 1.0:
        return raw.copy()
    out = np.empty_like(raw)
    previous = 0.0
    for index, value in enumerate(raw.tolist()):
        previous = alpha * value + (1 - alpha) * previous
        out[index] = previous
    return out


def _early(stream: Stream, before: int, data_set: str) -> Stream:
    """The stream from `before` events before its first label (all of it when sooner)."""
    labeled = np.flatnonzero(stream.labels)
    start = max(0, int(labeled[0]) - before) if labeled.size else 0
    return Stream(
        data_set,
        stream.key,
        stream.seed,
        stream.raw[start:],
        stream.labels[start:],
        stream.static,
        stream.unit,
        stream.validation,
        stream.validation_labels,
    )


def _prepare_levels(streams: list[Stream], settings: list[Setting]) -> None:
    """Every stream smoothed with each α of `settings`, its static threshold calibrated with
    each as the trainer does (the dynamic threshold of its model's smoothed validation
    scores), and every re-choice's level for each (α, margin, buffer), all streams at once per
    re-choice (`choose_levels` is vectorised). What is there already is kept."""
    alphas = {setting.smoothing for setting in settings} - streams[0].smoothed.keys()
    for stream in streams:
        for alpha in alphas:
            stream.smoothed[alpha] = _smoothed(stream.raw, alpha)
    for model in _models(streams):
        validations = [(stream.validation, stream.validation_labels) for stream in model]
        for alpha in alphas:
            static = _calibrated(validations, alpha)
            for stream in model:
                stream.statics[alpha] = static
    longest = max(stream.raw.size for stream in streams)
    choices = {(s.smoothing, s.prune, s.buffer) for s in settings if s.adaptive}
    for alpha, prune, buffer in sorted(choices - streams[0].levels.keys()):
        per_stream: list[list[float]] = [[] for _ in streams]
        for count in range(REFRESH, longest + 1, REFRESH):
            rows = [i for i, s in enumerate(streams) if s.raw.size >= count]
            recent = np.stack([_recent(streams[i].smoothed[alpha], count) for i in rows])
            valid = np.arange(HISTORY) < min(count, HISTORY)
            every = np.broadcast_to(valid, recent.shape)
            levels = choose_levels(recent, every, prune=prune, buffer=buffer)[0]
            for row, level in zip(rows, levels.tolist(), strict=True):
                per_stream[row].append(level)
        for stream, levels in zip(streams, per_stream, strict=True):
            stream.levels[alpha, prune, buffer] = np.asarray(levels)


def _models(streams: list[Stream]) -> list[list[Stream]]:
    """The streams of each model: a fleet's streams of one seed share theirs."""
    shared: dict[str, list[Stream]] = {}
    alone = []
    for stream in streams:
        if stream.data_set == FLEET:
            shared.setdefault(stream.seed, []).append(stream)
        else:
            alone.append([stream])
    return alone + list(shared.values())


def _calibrated(validations: list[tuple[np.ndarray, np.ndarray]], alpha: float) -> float:
    """The static threshold the trainer calibrates with `alpha` on these keys' validation
    scores and labels, through its own smoothing and method: all scores smoothed, the normal
    ones judged, each key one run of sequences."""
    scores, labels = (np.concatenate(parts) for parts in zip(*validations, strict=True))
    keys = np.repeat(np.arange(len(validations)), [part.size for part, _ in validations])
    return dynamic_threshold(smooth_per_key(scores, keys, alpha), labels, keys)[0]


def _recent(scores: np.ndarray, count: int) -> np.ndarray:
    """The last min(count, HISTORY) of the first `count` scores, oldest first, padded; in
    float32, as the engine's ring keeps them."""
    kept = scores[max(0, count - HISTORY) : count].astype(np.float32)
    return np.pad(kept, (0, HISTORY - kept.size))


def _thresholds(stream: Stream, setting: Setting) -> np.ndarray:
    """Each score's threshold as `detector.engine.core` sets it under `setting`."""
    count = np.arange(1, stream.raw.size + 1)
    floor = setting.min_scaled_error**2 * stream.unit if setting.min_scaled_error else 0.0
    static = max(stream.statics[setting.smoothing], floor)
    if not setting.adaptive:
        return np.full(stream.raw.size, static)
    levels = stream.levels[setting.smoothing, setting.prune, setting.buffer]
    done = count // REFRESH
    level = np.where(done > 0, levels[np.maximum(done - 1, 0)] if levels.size else np.nan, np.nan)
    threshold = np.where(np.isnan(level), static, np.fmax(level, floor))
    factor = setting.warm_up_floor
    warming = np.inf if factor is None else np.fmax(threshold, factor * static)
    return np.where(count < setting.warm_up, warming, threshold)


def _counts(stream: Stream, setting: Setting) -> np.ndarray:
    """(labeled, detected, predicted, predicted on a label) of `stream` under `setting`. A key
    mostly in alert detects nothing and raises one false alarm: an alert that never ends
    overlaps every label without telling any of them apart."""
    above = stream.smoothed[setting.smoothing] >= _thresholds(stream, setting)
    predicted = episode_flags(above, None, COOLDOWN, setting.confirm, from_onset=True)
    counts = range_counts(stream.labels, predicted)
    normal = ~stream.labels
    if normal.any() and predicted[normal].mean() > MOSTLY_IN_ALERT:
        return np.array([counts.labeled, 0, 1, 0])
    return np.array([counts.labeled, counts.detected, counts.predicted, counts.predicted_on_label])


def _check(streams: list[Stream], dumps: dict[str, Path], setting: Setting) -> None:
    """Stop unless the replay here gives the engine's thresholds of the dumped runs (of each
    data set in `dumps`), and its calibration the trainer's static thresholds (to
    `STATIC_TOLERANCE`: the trainer calibrates on torch's scores, the replay on
    onnxruntime's)."""
    gaps = []
    for data_set, path in dumps.items():
        dump = np.load(path)
        for stream in (stream for stream in streams if stream.data_set == data_set):
            gaps.append(abs(stream.statics[setting.smoothing] / stream.static - 1))
            dumped = replace(stream, statics={setting.smoothing: stream.static})
            got = _thresholds(dumped, setting)
            want = dump[f"{stream.seed}/{stream.key}/test_thresholds"]
            if not np.allclose(got, want, rtol=1e-9, equal_nan=True):
                raise SystemExit(f"{stream.key}: the replay's thresholds are not the engine's")
    if max(gaps) > STATIC_TOLERANCE:
        raise SystemExit(f"the replay's calibration is {max(gaps):.2%} off the trainer's")
    console.print(
        "replay checked: the engine's thresholds, to the event; the trainer's static "
        f"thresholds, within {max(gaps):.2g}"
    )


class Table:
    """The counts of every setting on every stream [settings, streams, 4], and the F1s of
    any subset of keys: pooled over a data set's keys per seed, meant over seeds."""

    def __init__(self, streams: list[Stream], settings: list[Setting]) -> None:
        self.streams, self.settings = streams, settings
        self.counts = np.stack(
            [np.stack([_counts(stream, setting) for stream in streams]) for setting in settings]
        ).astype(np.float64)
        runs = sorted({(s.data_set, s.seed) for s in streams})
        self.data_sets = sorted({data_set for data_set, _ in runs})
        self.run_of = np.array([runs.index((s.data_set, s.seed)) for s in streams])
        self.set_of_run = np.array([self.data_sets.index(data_set) for data_set, _ in runs])
        self.keys = np.array([s.key for s in streams])

    def f1s(self, keys: set[str] | None = None) -> np.ndarray:
        """Sequence F1 [settings, data sets] over `keys` (None: all)."""
        chosen = np.ones(self.keys.size, bool) if keys is None else np.isin(self.keys, list(keys))
        member = np.zeros((self.keys.size, self.set_of_run.size))
        member[np.flatnonzero(chosen), self.run_of[chosen]] = 1.0
        pooled = np.einsum("akc,kr->acr", self.counts, member)  # [settings, 4, runs]
        labeled, detected, predicted, on_label = pooled.transpose(1, 0, 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(predicted > 0, on_label / predicted, 0.0)
            recall = np.where(labeled > 0, detected / labeled, 0.0)
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0)
        return np.stack(
            [f1[:, self.set_of_run == index].mean(axis=1) for index in range(len(self.data_sets))],
            axis=1,
        )

    def best(self, keys: set[str] | None = None, data_sets: set[str] | None = None) -> int:
        """The index of the setting of the best mean F1 over `data_sets` (None: all)."""
        columns = [i for i, name in enumerate(self.data_sets) if not data_sets or name in data_sets]
        return int(self.f1s(keys)[:, columns].mean(axis=1).argmax())


def _halvings(table_: Table, splits: int, seed: int) -> dict:
    """Choose on random halves of the keys, score on the other halves."""
    families: dict[str, set[str]] = {}
    for stream in table_.streams:
        family = "SMAP" if stream.data_set.startswith("SMAP") else "synthetic"
        families.setdefault(family, set()).add(stream.key)
    rng = np.random.default_rng(seed)
    held_out, chosen = [], Counter()
    for _ in range(splits):
        halves: list[set[str]] = [set(), set()]
        for keys in families.values():
            ordered = sorted(keys)
            for rank, index in enumerate(rng.permutation(len(ordered)).tolist()):
                halves[rank % 2].add(ordered[index])
        for fit, judged in ((0, 1), (1, 0)):
            best = table_.best(halves[fit])
            chosen[best] += 1
            held_out.append(table_.f1s(halves[judged])[best])
    estimate = dict(zip(table_.data_sets, np.mean(held_out, axis=0).tolist(), strict=True))
    estimate["mean"] = float(np.mean(list(estimate.values())))
    recipe, times = chosen.most_common(1)[0]
    in_sample = dict(zip(table_.data_sets, table_.f1s()[recipe].tolist(), strict=True))
    in_sample["mean"] = float(np.mean(list(in_sample.values())))
    console.print(
        table(
            f"Sequence F1, cross-validated ({splits} halvings of the keys, both ways)",
            ["", *estimate],
            [["held-out halves", *estimate.values()], ["recipe, all keys", *in_sample.values()]],
        )
    )
    setting = asdict(table_.settings[recipe])
    console.print(f"recipe (chosen in {times} of {2 * splits} fits): {setting}")
    return {
        "held_out_f1": estimate,
        "recipe": setting,
        "recipe_chosen": times,
        "fits": 2 * splits,
        "recipe_f1_all_keys": in_sample,
        "most_chosen": [
            {"setting": asdict(table_.settings[i]), "times": n} for i, n in chosen.most_common(5)
        ],
    }


def _leave_one_out(table_: Table) -> dict:
    """Choose on the SMAP sets, score on the synthetic sets, and the other way."""
    smap = {"SMAP", "SMAP-early", "SMAP-new"}
    synthetic = set(table_.data_sets) - smap
    rows, document = [], {}
    f1s = table_.f1s()
    if not synthetic:
        return {}
    for fit, judged in ((smap, synthetic), (synthetic, smap)):
        best = table_.best(None, fit)
        scored = {
            name: float(f1s[best, i]) for i, name in enumerate(table_.data_sets) if name in judged
        }
        name = f"chosen on {' + '.join(sorted(fit))}"
        document[name] = {"setting": asdict(table_.settings[best]), "f1": scored}
        rows += [[name, data_set, f1] for data_set, f1 in scored.items()]
    console.print(table("Leave one data set out: sequence F1", ["", "scored on", "F1"], rows))
    return document


def _without(streams: list[Stream], recipe: Setting) -> dict:
    """The recipe against itself with each setting it uses switched off, on all keys: a setting
    earns its place on the data sets where switching it off loses F1."""
    switched = {name: replace(recipe, **changes) for name, changes in WITHOUT.items()}
    switched = {name: variant for name, variant in switched.items() if variant != recipe}
    variants = [recipe, *switched.values()]
    _prepare_levels(streams, variants)
    replayed = Table(streams, variants)
    f1s = replayed.f1s()
    document, rows = {}, [["the recipe", *f1s[0].tolist(), ""]]
    for name, row in zip(switched, f1s[1:], strict=True):
        pairs = zip(replayed.data_sets, row, f1s[0], strict=True)
        loses = [data_set for data_set, f1, base in pairs if f1 < base]
        document[name] = {"f1": dict(zip(replayed.data_sets, row.tolist(), strict=True))}
        document[name]["loses_on"] = loses
        rows.append([f"without {name}", *row.tolist(), str(len(loses))])
    columns = ["", *replayed.data_sets, "data sets it loses"]
    console.print(table("The recipe without each setting: sequence F1, all keys", columns, rows))
    return document


def _parse_setting(values: list[str]) -> Setting:
    alpha, prune, buffer, warm_up, factor, confirm, bound = values
    return Setting(
        float(alpha),
        float(prune),
        int(buffer),
        int(warm_up),
        None if factor == "none" else float(factor),
        int(confirm),
        float(bound),
    )


if __name__ == "__main__":
    main()
