"""Seeded, labeled synthetic data sets for trying, testing and demonstrating the trainer.

Two generators, both vectorised numpy and deterministic for a given seed:

- `sensors`: industrial devices reporting temperature, vibration and pressure every five
  minutes. Each device has its own operating point and gain, so readings only make sense
  against the device's own history (per-key normalisation); a shared daily and weekly load
  cycle drives all three readings. Faults (spikes, drift, stuck readings, level shifts) hit
  one reading at a time; a forecast model catches them as readings that stop agreeing with
  the load the other readings and the recent past imply.
- `transactions`: card holders with their own spending level, favourite terminals and
  hours. Fraud comes in episodes that only look wrong as a sequence: card-testing bursts of
  small amounts seconds apart, amount spikes far above the holder's habit, and sprees
  across unfamiliar terminals. Honest customers sometimes pay twice in a row too, so one
  short gap alone is not fraud.

Both split by time (the test part is later than the training part) and come with a
`train.toml` for `trainer train`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

#: 2024-01-01T00:00:00Z, a Monday: the first day of every generated data set.
START = 1_704_067_200
DAY = 86_400
#: Share of the time span, at its end, that goes to the test part.
TEST_FRACTION = 0.3


@dataclass(frozen=True)
class Dataset:
    """A generated data set: training and test tables and the trainer config that fits them."""

    name: str
    train: pa.Table
    test: pa.Table
    config: str

    def write(self, folder: Path) -> list[Path]:
        """Write train.csv, test.csv and train.toml into `folder`; returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / "train.csv", folder / "test.csv", folder / "train.toml"]
        pa_csv.write_csv(self.train, paths[0])
        pa_csv.write_csv(self.test, paths[1])
        paths[2].write_text(self.config)
        return paths


def _table(columns: dict[str, np.ndarray], order: np.ndarray, rows: np.ndarray) -> pa.Table:
    """The chosen rows of `columns`, in `order` (a stream arrives in time order)."""
    picked = order[rows[order]]
    return pa.table({name: values[picked] for name, values in columns.items()})


def _split(columns: dict[str, np.ndarray], cut: float) -> tuple[pa.Table, pa.Table]:
    """Time-ordered training rows before `cut` and test rows from it on."""
    times = columns["ts"]
    order = np.argsort(times, kind="stable")
    before = times < cut
    return _table(columns, order, before), _table(columns, order, ~before)


def _position_in_group(lengths: np.ndarray) -> np.ndarray:
    """0, 1, ... within each consecutive group of the given lengths (flattened)."""
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _ar1(rng: np.random.Generator, shape: tuple[int, int], phi: float, sigma: float) -> np.ndarray:
    """Stationary AR(1) series along axis 1, computed in closed form a block at a time.

    Within a block x[k] = phi^(k+1) x[-1] + phi^k Σ_{j<=k} phi^-j e[j]; blocks keep phi^-j
    small enough to stay exact in float64.
    """
    rows, steps = shape
    noise = rng.normal(0.0, sigma, shape)
    series = np.empty(shape)
    previous = rng.normal(0.0, sigma / np.sqrt(1 - phi * phi), rows)
    block = 256
    for begin in range(0, steps, block):
        e = noise[:, begin : begin + block]
        k = np.arange(e.shape[1])
        decay = phi**k
        chunk = decay * (phi * previous[:, None] + np.cumsum(e / decay, axis=1))
        series[:, begin : begin + block] = chunk
        previous = chunk[:, -1]
    return series


#: Settings both data sets share: a per-key time split for validation, and the optimiser.
COMMON_CONFIG = {
    "split": {"train": 0.8, "validation": 0.2, "test": 0.0},
    "model": {"export_mode": "window", "layers": 1},
    "training": {"batch_size": 256, "learning_rate": 0.005, "seed": 0},
}


def config_toml(name: str, config: dict[str, dict]) -> str:
    """A `trainer train` configuration in TOML: `config`, completed from `COMMON_CONFIG`."""
    lines = [f"# Written by `trainer synth {name}`; edit freely, see `trainer train --help`."]
    for section in ("data", "split", "model", "training", "threshold"):
        values = dict(config.get(section, {}))
        for key, value in COMMON_CONFIG.get(section, {}).items():
            values.setdefault(key, value)
        if not values:
            continue  # the recipe's, for a forecast model
        lines += ["", f"[{section}]"]
        tables = {k: v for k, v in values.items() if isinstance(v, list | dict)}
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if k not in tables]
        for key, items in tables.items():
            if isinstance(items, dict):
                lines += ["", f"[{section}.{key}]"]
                lines += [f"{k} = {_toml_value(v)}" for k, v in items.items()]
                continue
            for item in items:
                lines += ["", f"[[{section}.{key}]]"]
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string
    return repr(value)


# ---- sensors --------------------------------------------------------------------------

SENSOR_INTERVAL = 300
SENSOR_JITTER = 20
SENSOR_DROP_RATE = 0.005
SENSOR_READINGS = ("temperature", "vibration", "pressure")
#: Per reading, the (low, high) ranges devices draw their operating point and their gain
#: (units per unit of load) from, and the measurement noise in units of load.
OPERATING_POINT = ((20.0, 2.0, 2.0), (70.0, 8.0, 12.0))
GAIN = ((2.0, 0.3, -1.0), (6.0, 1.5, -0.2))
NOISE = (0.10, 0.12, 0.10)
#: Faults are placed at most one per slot of this many readings, with clean margins around.
FAULT_SLOT = 96
FAULT_MARGIN = 8
FAULT_KINDS = ("spike", "level_shift", "drift", "stuck")
#: Inclusive length range, in readings, of each kind of fault.
FAULT_LENGTHS = {"spike": (1, 3), "level_shift": (12, 36), "drift": (24, 60), "stuck": (24, 60)}
#: Chance that a slot holds a fault, in the training and the test part.
FAULT_RATE_TRAIN = 0.03
FAULT_RATE_TEST = 0.5

SENSORS_CONFIG = {
    "data": {
        "key": "device_id",
        "time": "ts",
        "label": "label",
        "time_delta": True,
        "features": [{"name": name, "kind": "numeric"} for name in SENSOR_READINGS],
    },
    # The forecast recipe (trainer/recipe.py) for the network, its per-key scaling and the
    # training, but for the budget.
    "model": {"task": "forecast"},
    # 60,000 training windows in all (6 epochs of 10,000) train in seconds on two cores.
    "training": {"epochs": 6, "max_windows": 10_000, "patience": 2},
    # These faults last 1 to 60 readings; the recipe's alerting smooths over about 10 and
    # confirms over 5, made for faults that last tens to hundreds (docs/quality.md). Its
    # own alerting instead: each raw score against one threshold, at once.
    "threshold": {"method": "quantile", "target": 0.9995, "advanced": {"smoothing": 1.0}},
}


def sensors(keys: int = 50, days: float = 14.0, seed: int = 0) -> Dataset:
    """Devices reporting three readings every five minutes, with faults mostly in the test part."""
    rng = np.random.default_rng(seed)
    slots = int(days * DAY / SENSOR_INTERVAL) // FAULT_SLOT
    if slots < 4:
        shortest = 4 * FAULT_SLOT * SENSOR_INTERVAL / DAY
        raise ValueError(f"days={days:g} is too short: sensors need at least {shortest:.2f} days")
    steps = slots * FAULT_SLOT
    times = (
        START
        + rng.uniform(0, SENSOR_INTERVAL, (keys, 1))
        + np.arange(steps) * SENSOR_INTERVAL
        + rng.uniform(-SENSOR_JITTER, SENSOR_JITTER, (keys, steps))
    )
    load = _sensor_load(rng, times)
    width = len(SENSOR_READINGS)
    base = rng.uniform(*OPERATING_POINT, (keys, 1, width))
    gain = rng.uniform(*GAIN, (keys, 1, width))
    readings = base + gain * (load[..., None] + rng.normal(0, NOISE, (keys, steps, width)))

    split_slot = round(slots * (1 - TEST_FRACTION))
    label, fault = _inject_faults(rng, readings, gain[:, 0, :], split_slot)
    kept = rng.random((keys, steps)) >= SENSOR_DROP_RATE
    columns = {
        "device_id": np.repeat([f"dev-{k:03d}" for k in range(keys)], steps).reshape(keys, steps),
        "ts": np.round(times).astype(np.int64),
        **{name: np.round(readings[..., index], 3) for index, name in enumerate(SENSOR_READINGS)},
        "label": label,
        "fault": fault,
    }
    columns = {name: values[kept] for name, values in columns.items()}
    train, test = _split(columns, START + split_slot * FAULT_SLOT * SENSOR_INTERVAL)
    return Dataset("sensors", train, test, config_toml("sensors", SENSORS_CONFIG))


def _sensor_load(rng: np.random.Generator, times: np.ndarray) -> np.ndarray:
    """Each device's load: daily and weekly cycles of its own phase and size, plus wander."""
    keys, steps = times.shape
    hours = (times - START) / 3600.0
    peak = rng.uniform(10, 17, (keys, 1))
    size = rng.uniform(0.7, 1.3, (keys, 1))
    daily_angle = 2 * np.pi * (hours - peak) / 24
    daily = np.cos(daily_angle) + 0.3 * np.cos(2 * daily_angle)
    weekly = 0.4 * np.cos(2 * np.pi * (hours / 24 - 2.5) / 7)  # busiest mid-week
    return size * (daily + weekly) + _ar1(rng, (keys, steps), phi=0.99, sigma=0.04)


def _inject_faults(
    rng: np.random.Generator, readings: np.ndarray, gain: np.ndarray, split_slot: int
) -> tuple[np.ndarray, np.ndarray]:
    """Modify `readings` [keys, steps, readings] in place; returns labels and fault names.

    The first slot of each part stays clean so that a key replayed from the start of the
    test file has history before its first fault.
    """
    keys, steps, width = readings.shape
    slots = steps // FAULT_SLOT
    slot_index = np.arange(slots)
    rate = np.where(slot_index < split_slot, FAULT_RATE_TRAIN, FAULT_RATE_TEST)
    rate[[0, split_slot]] = 0.0
    key, slot = np.nonzero(rng.random((keys, slots)) < rate)
    kind = rng.integers(0, len(FAULT_KINDS), key.size)
    bounds = np.array([FAULT_LENGTHS[name] for name in FAULT_KINDS])
    length = rng.integers(bounds[kind, 0], bounds[kind, 1] + 1)
    room = FAULT_SLOT - 2 * FAULT_MARGIN - length
    start = slot * FAULT_SLOT + FAULT_MARGIN + (rng.random(key.size) * (room + 1)).astype(int)
    feature = rng.integers(0, width, key.size)
    size = (
        rng.choice([-1.0, 1.0], key.size)
        * np.select(
            [kind == FAULT_KINDS.index("spike"), kind == FAULT_KINDS.index("level_shift")],
            [rng.uniform(0.8, 1.5, key.size), rng.uniform(0.6, 1.2, key.size)],
            rng.uniform(1.2, 2.5, key.size),  # drift: where the ramp ends
        )
        * np.abs(gain[key, feature])
    )

    event = np.repeat(np.arange(key.size), length)
    offset = _position_in_group(length)
    at_key, at_step, at_feature = key[event], start[event] + offset, feature[event]
    event_kind = np.asarray(FAULT_KINDS)[kind[event]]
    shift = np.select(
        [event_kind == "drift", event_kind == "stuck"],
        [size[event] * (offset + 1) / length[event], 0.0],
        size[event],
    )
    stuck = event_kind == "stuck"
    frozen = readings[at_key, start[event] - 1, at_feature]
    current = readings[at_key, at_step, at_feature]
    readings[at_key, at_step, at_feature] = np.where(stuck, frozen, current + shift)

    label = np.zeros((keys, steps), np.int8)
    label[at_key, at_step] = 1
    fault = np.full((keys, steps), "none", dtype=object)
    fault[at_key, at_step] = event_kind
    return label, fault


# ---- transactions -----------------------------------------------------------------------

FRAUD_SCENARIOS = ("card_testing", "amount_spike", "spree")
#: Fraud episodes per customer per day, and the share of each scenario. Fraud is far more
#: common than in real card data (a few percent of payments) so that small data sets hold
#: enough episodes to learn from.
FRAUD_RATE = 0.02
FRAUD_MIX = (0.4, 0.3, 0.3)
#: Share of honest payments followed by a second one at the same terminal minutes later.
REPEAT_RATE = 0.04
HOME_SHARE = 0.92
#: One terminal in this many is an online merchant that card testers favour.
RISKY_TERMINAL_SHARE = 50
MAX_HOME_TERMINALS = 8

TRANSACTIONS_CONFIG = {
    "data": {
        "key": "customer_id",
        "time": "ts",
        "label": "is_fraud",
        "time_delta": True,
        # terminal_id is left out: with thousands of terminals and a few hundred fraud
        # episodes, its embedding memorises the training split instead of generalising.
        "features": [
            {"name": "log_amount", "kind": "numeric"},
            {"name": "hour", "kind": "numeric"},
        ],
    },
    "model": {
        "task": "classify",
        "window": 16,
        "min_history": 1,
        "hidden": 32,
        "per_key_normalisation": True,
    },
    # Unweighted loss: weighting the rare positives up made the network overfit them.
    "training": {"epochs": 20, "max_windows": 60_000, "pos_weight": 1.0},
    "threshold": {"method": "max_f1"},
}


def transactions(keys: int = 500, days: float = 60.0, seed: int = 0) -> Dataset:
    """Card payments of `keys` customers over `days`, with fraud episodes throughout."""
    rng = np.random.default_rng(seed)
    terminals = max(100, 4 * keys)
    profile = _customer_profiles(rng, keys, terminals)
    honest = _honest_payments(rng, profile, days, terminals)
    fraud = _fraud_payments(rng, profile, days, terminals)
    columns = {
        name: np.concatenate([honest[name], fraud[name]]) for name in ("customer", "ts", "amount")
    }
    terminal = np.concatenate([honest["terminal"], fraud["terminal"]])
    scenario = np.concatenate([np.full(honest["ts"].size, "none", dtype=object), fraud["scenario"]])
    ts = np.round(columns["ts"]).astype(np.int64)
    amount = np.round(np.maximum(columns["amount"], 0.01), 2)
    table = {
        "customer_id": np.array([f"C{c:05d}" for c in range(keys)], dtype=object)[
            columns["customer"]
        ],
        "ts": ts,
        "amount": amount,
        # Amounts are log-normal: on a log scale a $2 probe stands as far from a $30 habit
        # as a $450 spike does, which a small network learns far more easily.
        "log_amount": np.round(np.log(amount), 4),
        "terminal_id": np.array([f"T{t:05d}" for t in range(terminals)], dtype=object)[terminal],
        "hour": (ts - START) % DAY // 3600,
        "is_fraud": (scenario != "none").astype(np.int8),
        "scenario": scenario,
    }
    train, test = _split(table, START + (1 - TEST_FRACTION) * days * DAY)
    return Dataset("transactions", train, test, config_toml("transactions", TRANSACTIONS_CONFIG))


@dataclass(frozen=True)
class _Profiles:
    rate: np.ndarray  # payments per day
    log_amount: np.ndarray  # mean of log(amount)
    spread: np.ndarray  # std of log(amount)
    active_hour: np.ndarray
    active_spread: np.ndarray
    home: np.ndarray  # [customers, MAX_HOME_TERMINALS] terminal ids
    home_cdf: np.ndarray  # cumulative preference over `home`


def _customer_profiles(rng: np.random.Generator, keys: int, terminals: int) -> _Profiles:
    preference = rng.dirichlet(np.ones(MAX_HOME_TERMINALS), keys)
    used = rng.integers(3, MAX_HOME_TERMINALS + 1, keys)
    preference[np.arange(MAX_HOME_TERMINALS) >= used[:, None]] = 0.0
    preference /= preference.sum(axis=1, keepdims=True)
    return _Profiles(
        rate=rng.lognormal(np.log(2.0), 0.5, keys),
        log_amount=rng.normal(np.log(30.0), 0.5, keys),
        spread=rng.uniform(0.35, 0.8, keys),
        active_hour=rng.uniform(11, 19, keys),
        active_spread=rng.uniform(2, 4, keys),
        home=rng.integers(0, terminals, (keys, MAX_HOME_TERMINALS)),
        home_cdf=np.cumsum(preference, axis=1),
    )


def _honest_payments(
    rng: np.random.Generator, profile: _Profiles, days: float, terminals: int
) -> dict[str, np.ndarray]:
    keys = profile.rate.size
    whole_days = int(np.ceil(days))
    per_day = rng.poisson(profile.rate[:, None] * np.ones(whole_days))
    customer = np.repeat(np.repeat(np.arange(keys), whole_days), per_day.ravel())
    day = np.repeat(np.tile(np.arange(whole_days), keys), per_day.ravel())
    hour = rng.normal(profile.active_hour[customer], profile.active_spread[customer]) % 24
    ts = START + day * DAY + hour * 3600
    amount = rng.lognormal(profile.log_amount[customer], profile.spread[customer])
    choice = (rng.random(customer.size)[:, None] > profile.home_cdf[customer]).sum(axis=1)
    home = profile.home[customer, np.minimum(choice, MAX_HOME_TERMINALS - 1)]
    terminal = np.where(
        rng.random(customer.size) < HOME_SHARE, home, rng.integers(0, terminals, customer.size)
    )
    repeat = rng.random(customer.size) < REPEAT_RATE
    payments = {
        "customer": np.r_[customer, customer[repeat]],
        "ts": np.r_[ts, ts[repeat] + rng.uniform(30, 300, repeat.sum())],
        "amount": np.r_[amount, amount[repeat] * rng.uniform(0.2, 1.0, repeat.sum())],
        "terminal": np.r_[terminal, terminal[repeat]],
    }
    inside = payments["ts"] < START + days * DAY
    return {name: values[inside] for name, values in payments.items()}


def _fraud_payments(
    rng: np.random.Generator, profile: _Profiles, days: float, terminals: int
) -> dict[str, np.ndarray]:
    """Fraud episodes: each a short sequence of payments that only together look wrong."""
    keys = profile.rate.size
    episodes = rng.poisson(FRAUD_RATE * days, keys)
    victim = np.repeat(np.arange(keys), episodes)
    count = victim.size
    kind = rng.choice(len(FRAUD_SCENARIOS), count, p=FRAUD_MIX)
    begin = START + rng.uniform(0, days * DAY - DAY / 4, count)
    # Card testing: 5-15 probes of a few dollars, tens of seconds apart, then maybe a
    # cash-out. Amount spike: 1-3 payments many times the usual, within hours. Spree: 4-8
    # payments a few times the usual at unfamiliar terminals, minutes apart.
    cash_out = (kind == 0) & (rng.random(count) < 0.5)
    length = cash_out + np.choose(
        kind,
        [rng.integers(5, 16, count), rng.integers(1, 4, count), rng.integers(4, 9, count)],
    )
    event = np.repeat(np.arange(count), length)
    position = _position_in_group(length)
    event_kind = kind[event]
    is_cash_out = cash_out[event] & (position == length[event] - 1)
    typical = np.exp(profile.log_amount[victim[event]])
    size = event.size
    gap = np.choose(
        event_kind,
        [rng.exponential(45, size) + 5, rng.uniform(600, 3600, size), rng.uniform(180, 1200, size)],
    )
    gap = np.where(is_cash_out, rng.uniform(120, 1200, size), gap)
    gap[position == 0] = 0.0
    cumulative = np.cumsum(gap)
    offset = cumulative - np.repeat(cumulative[np.cumsum(length) - length], length)
    amount = np.choose(
        event_kind,
        [
            rng.uniform(0.5, 5.0, size),
            typical * rng.uniform(6, 20, size),
            typical * rng.uniform(1.5, 4, size),
        ],
    )
    amount = np.where(is_cash_out, typical * rng.uniform(4, 10, size), amount)
    # Card testers favour a few weakly protected online merchants; the others go anywhere.
    risky = max(5, terminals // RISKY_TERMINAL_SHARE)
    episode_terminal = np.where(
        rng.random(count) < 0.8, rng.integers(0, risky, count), rng.integers(0, terminals, count)
    )
    terminal = np.where(
        event_kind == 0, episode_terminal[event], rng.integers(0, terminals, event.size)
    )
    return {
        "customer": victim[event],
        "ts": begin[event] + offset,
        "amount": amount,
        "terminal": terminal,
        "scenario": np.asarray(FRAUD_SCENARIOS, dtype=object)[event_kind],
    }


GENERATORS: dict[str, Callable[..., Dataset]] = {
    "sensors": sensors,
    "transactions": transactions,
}
