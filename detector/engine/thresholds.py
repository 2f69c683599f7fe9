"""The nonparametric dynamic threshold of Hundman et al. (2018), vectorised over rows.

Used twice, so that both apply one rule: the trainer fits a fixed threshold on validation
scores (`trainer.calibrate`), and the engine re-chooses each key's threshold from that key's
own recent smoothed scores (`Scoring.adaptive`). A row is one key's scores in time order.
"""

from __future__ import annotations

import numpy as np

#: Candidate thresholds, in standard deviations above the mean (the paper's range and step);
#: the last one is also the choice when no candidate separates anything.
CANDIDATE_Z = np.arange(2.5, 12.0 + 1e-9, 0.5)
#: Rows handled at once: bounds the [rows, candidates, scores] temporaries.
_CHUNK_ROWS = 64


def choose_levels(
    values: np.ndarray,
    valid: np.ndarray,
    breaks: np.ndarray | None = None,
    prune: float = 0.13,
    buffer: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's threshold and chosen z, from its `valid` scores [rows, n].

    Among ε = mean + z·std for z in `CANDIDATE_Z`, the one whose removal of the scores at or
    above it cuts the mean and the spread the most, per flagged score and per flagged
    sequence (squared): (Δmean/mean + Δstd/std) / (#flagged + #sequences²). Their pruning
    keeps an anomalous sequence only when its peak exceeds the largest normal score by the
    fraction `prune`; as a threshold that is a floor of (1 + prune) · max(normal scores).
    With their error buffer (`buffer` > 0), the scores within `buffer` positions of a flagged
    one count as flagged in the denominator and are not normal: a candidate is then not
    charged per score for flagging a peak's whole shoulder, and the shoulders of one past
    peak do not set the floor just under it, which would hide every later fault of its size
    for the whole history. Without it, every score below ε is normal.
    `breaks` marks positions where a new sequence starts regardless (another key's scores).
    A row of equal scores gets a threshold just above them; a row without scores, NaN.
    """
    values = np.asarray(values, np.float64)
    valid = np.asarray(valid, bool)
    if breaks is None:
        breaks = np.zeros(valid.shape, bool)
    parts = [
        _choose(
            values[i : i + _CHUNK_ROWS],
            valid[i : i + _CHUNK_ROWS],
            breaks[i : i + _CHUNK_ROWS],
            prune,
            buffer,
        )
        for i in range(0, values.shape[0], _CHUNK_ROWS)
    ]
    if not parts:
        return np.zeros(0), np.zeros(0)
    levels, z = zip(*parts, strict=True)
    return np.concatenate(levels), np.concatenate(z)


def _choose(
    values: np.ndarray, valid: np.ndarray, breaks: np.ndarray, prune: float, buffer: int
) -> tuple[np.ndarray, np.ndarray]:
    values = np.where(valid, values, 0.0)
    count = valid.sum(axis=1)
    n = np.maximum(count, 1)
    total, squares = values.sum(axis=1), np.square(values).sum(axis=1)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - np.square(mean), 0.0))
    epsilon = mean[:, None] + CANDIDATE_Z * std[:, None]  # [rows, z]
    above = valid[:, None, :] & (values[:, None, :] >= epsilon[:, :, None])  # [rows, z, n]
    flagged = above.sum(axis=2)
    kept = np.maximum(count[:, None] - flagged, 1)
    kept_mean = (total[:, None] - (above * values[:, None, :]).sum(axis=2)) / kept
    kept_squares = squares[:, None] - (above * np.square(values)[:, None, :]).sum(axis=2)
    kept_std = np.sqrt(np.maximum(kept_squares / kept - np.square(kept_mean), 0.0))
    # What counts against a candidate: its flagged scores, or with a buffer every score within
    # it (telemanom's error buffer), and their runs.
    marked = _near(above, breaks[:, None, :], buffer) & valid[:, None, :] if buffer else above
    continues = np.zeros_like(marked)
    continues[:, :, 1:] = marked[:, :, :-1] & ~breaks[:, None, 1:]
    sequences = (marked & ~continues).sum(axis=2)
    usable = (flagged > 0) & (flagged < count[:, None]) & (mean > 0)[:, None] & (std > 0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cut = (mean[:, None] - kept_mean) / mean[:, None] + (std[:, None] - kept_std) / std[:, None]
        gain = np.where(usable, cut / (marked.sum(axis=2) + np.square(sequences)), -np.inf)
    best = np.where(usable.any(axis=1), gain.argmax(axis=1), CANDIDATE_Z.size - 1)
    rows = np.arange(best.size)
    chosen = epsilon[rows, best]
    below = valid & ~above[rows, best]
    normal = below & ~marked[rows, best]  # below ε and outside the buffer
    normal_top = np.where(normal, values, -np.inf).max(axis=1, initial=-np.inf)
    top = np.where(valid, values, -np.inf).max(axis=1, initial=-np.inf)
    levels = np.where(
        below.any(axis=1),
        np.maximum(chosen, (1 + prune) * normal_top),
        _next_float32(top),  # equal scores: alert only above all of them (`>=`)
    )
    return np.where(count > 0, levels, np.nan), CANDIDATE_Z[best]


def _near(flagged: np.ndarray, breaks: np.ndarray, buffer: int) -> np.ndarray:
    """Positions within `buffer` of a flagged one along the last axis, never across a break
    (`breaks` broadcasts against `flagged`)."""
    n = flagged.shape[-1]
    index = np.broadcast_to(np.arange(n), flagged.shape)
    breaks = np.broadcast_to(breaks, flagged.shape)
    start = np.maximum.accumulate(np.where(breaks, index, 0), axis=-1)  # of each run
    previous = np.maximum.accumulate(np.where(flagged, index, -1), axis=-1)
    after = (previous >= start) & (index - previous <= buffer)
    # The same, looking forward: the next flagged position, and the next break after each.
    next_break = np.minimum.accumulate(np.where(breaks, index, n)[..., ::-1], axis=-1)[..., ::-1]
    next_break = np.concatenate([next_break[..., 1:], np.full((*flagged.shape[:-1], 1), n)], -1)
    following = np.minimum.accumulate(np.where(flagged, index, n)[..., ::-1], axis=-1)[..., ::-1]
    before = (following < next_break) & (following - index <= buffer)
    return after | before


def _next_float32(values: np.ndarray) -> np.ndarray:
    """The next float32 above each value, in float64: above every score that the arena's
    float32 ring keeps as that value, so that a key whose smoothed score holds still (an
    EWMA settled on a constant error) does not alert on the last bits of its float64 form."""
    return np.nextafter(values.astype(np.float32), np.float32(np.inf)).astype(np.float64)
