"""One verified model file behind an onnxruntime session.

`Scorer.load` checks the model contract (`load_model_file`) before onnxruntime ever sees the
bytes, picks the execution providers, and runs one warm-up batch so that the first real
batch does not pay for kernel selection and memory planning. An int8 model is then checked
against its manifest's probes, since int8 kernels differ between CPUs.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import structlog

from detector.contract.features import FeatureCodec
from detector.contract.manifest import Manifest
from detector.contract.model_file import (
    INPUT_C,
    INPUT_EVENTS,
    INPUT_H,
    INPUT_LENGTHS,
    OUTPUT_C,
    OUTPUT_CONTRIB,
    OUTPUT_H,
    OUTPUT_SCORE,
    ModelContractError,
    load_model_file,
    relative_difference,
)

log = structlog.get_logger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: Rows of the warm-up batch run at load.
WARM_UP_ROWS = 8
#: On the CPU, window batches go to onnxruntime in chunks of at most this many steps
#: (windows x window length), so that the LSTM's input projection of a chunk (4 x hidden
#: floats per step) stays in the core's cache: 4096 windows of 32 steps at once stream over
#: 100 MB through memory per layer and score about 20% slower than chunks of 32 windows.
CPU_WINDOW_STEPS = 1024
#: Plain float32 on CUDA: TF32 matrix products (onnxruntime's default there) moved a forecast
#: model's scores by up to 0.6% on an H200, off the float32 scores its threshold was
#: calibrated on. It costs 13-25% of batched window throughput there, still 26-43x the CPU's.
CUDA_OPTIONS = {"use_tf32": "0"}


def resolve_providers(requested: Sequence[str] = ("auto",)) -> list[str]:
    """onnxruntime providers for `requested` names; "auto" means CUDA when usable, else CPU."""
    available = onnxruntime.get_available_providers()
    resolved: list[str] = []
    for name in requested:
        if name == "auto":
            resolved += [CUDA, CPU] if CUDA in available else [CPU]
        elif name in available:
            resolved.append(name)
        else:
            raise ValueError(f"execution provider {name!r} is not available (have {available})")
    return list(dict.fromkeys(resolved))


@functools.cache
def load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that pip installed (the nvidia-* packages) once.

    onnxruntime-gpu's CUDA provider finds them by name on the loader's path, where pip does
    not put them; in a trainer process `import torch` loads them first, but the detector never
    imports torch. What `preload_dlls` prints about libraries it cannot find is logged; the
    session then falls back to the CPU provider as usual.
    """
    preload = getattr(onnxruntime, "preload_dlls", None)  # onnxruntime-gpu 1.21 and later
    if preload is None:
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        preload()
    if printed.getvalue().strip():
        log.warning("cuda libraries incomplete", detail=printed.getvalue().strip())


@dataclass(frozen=True, slots=True)
class Scores:
    """Graph outputs for a batch: score [n]; contrib [n, n_forecast] for forecast models;
    h, c [layers, n, hidden] after the step for stateful models."""

    score: np.ndarray
    contrib: np.ndarray | None = None
    h: np.ndarray | None = None
    c: np.ndarray | None = None


class Scorer:
    """Runs a model's graph on windows or single steps, in chunks of at most `max_batch` rows."""

    def __init__(
        self,
        manifest: Manifest,
        session: onnxruntime.InferenceSession,
        source: str = "<memory>",
    ) -> None:
        self.manifest = manifest
        self.session = session
        self.source = source
        self.codec = FeatureCodec(manifest)
        self._outputs = [output.name for output in session.get_outputs()]
        on_cpu = session.get_providers()[0] == CPU
        self._window_chunk = max(1, CPU_WINDOW_STEPS // manifest.window) if on_cpu else None

    @classmethod
    def load(
        cls,
        path: Path | str,
        providers: Sequence[str] = ("auto",),
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
    ) -> Scorer:
        """Verify and load a model file; `ModelContractError` when the file is refused.

        Thread counts of 0 let onnxruntime choose (one per physical core).
        """
        manifest, data = load_model_file(path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        names = resolve_providers(providers)
        if CUDA in names:
            load_cuda_libraries()
        chosen = [(name, CUDA_OPTIONS) if name == CUDA else name for name in names]
        try:
            session = onnxruntime.InferenceSession(data, options, providers=chosen)
        except Exception as error:  # onnxruntime raises its own unrelated exception types
            raise ModelContractError(path, f"onnxruntime cannot load the graph: {error}") from None
        scorer = cls(manifest, session, str(path))
        scorer.warm_up()
        scorer.check_probes()
        log.info(
            "model loaded",
            path=str(path),
            model_version=manifest.model_version,
            task=manifest.task,
            export_mode=manifest.export_mode,
            providers=session.get_providers(),
        )
        return scorer

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def warm_up(self) -> None:
        """Score a batch of zeros once, so that the first real batch runs at full speed."""
        manifest = self.manifest
        width = len(manifest.features)
        if manifest.export_mode == "window":
            lengths = np.full(WARM_UP_ROWS, manifest.window, np.int64)
            self.score_windows(
                np.zeros((WARM_UP_ROWS, manifest.window, width), np.float32), lengths
            )
        else:
            h, c = self.zero_state(WARM_UP_ROWS)
            self.step(np.zeros((WARM_UP_ROWS, width), np.float32), h, c)

    def check_probes(self) -> None:
        """Refuse a model whose graph scores its manifest's probes unlike the float graph.

        Run on this machine's providers: a model checked on the CPU it was exported on can
        still score wrongly on another CPU's int8 kernels.
        """
        probes = self.manifest.probes
        if probes is None:
            return
        got = self.score_sequences(*probes.arrays(self.manifest.window)).score
        worst = relative_difference(got, np.asarray(probes.scores, np.float32))
        if not worst <= probes.tolerance:  # also refuses NaN
            raise ModelContractError(
                self.source,
                f"the graph scores the manifest's {len(got)} probe windows up to {worst:.3g} "
                f"away from the float graph (tolerance {probes.tolerance:.3g}) with "
                f"{self.providers[0]} on this machine, whose int8 kernels do not reproduce the "
                "exported model's scores; deploy the float model instead",
            )

    def zero_state(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """h and c of keys never seen before."""
        network = self.manifest.network
        shape = (network.layers, rows, network.hidden)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def score_windows(self, x: np.ndarray, lengths: np.ndarray, max_batch: int = 4096) -> Scores:
        """Scores of right-padded windows x [n, window, width] with `lengths` [n] real steps."""
        max_batch = min(max_batch, self._window_chunk or max_batch)
        chunks = [
            self._run(
                {
                    INPUT_EVENTS: np.ascontiguousarray(x[start : start + max_batch], np.float32),
                    INPUT_LENGTHS: np.ascontiguousarray(
                        lengths[start : start + max_batch], np.int64
                    ),
                }
            )
            for start in range(0, len(x), max_batch)
        ]
        return self._join(chunks, state_axis=None)

    def score_sequences(self, x: np.ndarray, lengths: np.ndarray) -> Scores:
        """Scores at each window's last real event, in either export mode.

        A stateful graph is fed the windows' events one at a time; by the contract it then
        scores as the window graph does.
        """
        if self.manifest.export_mode == "window":
            return self.score_windows(x, lengths)
        h, c = self.zero_state(len(x))
        kept = self._empty_rows(len(x))
        for step in range(int(lengths.max(initial=0))):
            out = self.step(x[:, step], h, c)
            h, c = out.h, out.c
            last = lengths - 1 == step
            kept.score[last] = out.score[last]
            if kept.contrib is not None:
                kept.contrib[last] = out.contrib[last]
        return kept

    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray, max_batch: int = 4096) -> Scores:
        """One event per key, x [n, width], from the keys' states h, c [layers, n, hidden]."""
        chunks = [
            self._run(
                {
                    INPUT_EVENTS: np.ascontiguousarray(x[start : start + max_batch], np.float32),
                    INPUT_H: np.ascontiguousarray(h[:, start : start + max_batch], np.float32),
                    INPUT_C: np.ascontiguousarray(c[:, start : start + max_batch], np.float32),
                }
            )
            for start in range(0, len(x), max_batch)
        ]
        return self._join(chunks, state_axis=1)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self.session.run(None, feeds), strict=True))

    def _join(self, chunks: list[dict[str, np.ndarray]], state_axis: int | None) -> Scores:
        if not chunks:
            return self._empty()
        if len(chunks) == 1:
            out = chunks[0]
        else:
            out = {
                name: np.concatenate(
                    [chunk[name] for chunk in chunks],
                    axis=state_axis if name in (OUTPUT_H, OUTPUT_C) else 0,
                )
                for name in self._outputs
            }
        return Scores(
            out[OUTPUT_SCORE], out.get(OUTPUT_CONTRIB), out.get(OUTPUT_H), out.get(OUTPUT_C)
        )

    def _empty(self) -> Scores:
        stateful = self.manifest.export_mode == "stateful"
        h, c = self.zero_state(0) if stateful else (None, None)
        empty = self._empty_rows(0)
        return Scores(empty.score, empty.contrib, h, c)

    def _empty_rows(self, rows: int) -> Scores:
        """Zero scores (and contributions) for `rows` rows, without state."""
        contrib = (
            np.zeros((rows, len(self.manifest.forecast_features)), np.float32)
            if self.manifest.task == "forecast"
            else None
        )
        return Scores(np.zeros(rows, np.float32), contrib)
