"""The training loop: seeded, early-stopped, optionally data-parallel under torchrun.

Windows are materialised per batch from (last event, length) pairs, so memory stays that
of the encoded events however many windows an epoch visits.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from trainer.config import TrainingConfig
from trainer.data import Windows
from trainer.network import NetOutput, SequenceNet

#: Windows per forward pass when only scoring (no gradients).
EVAL_BATCH = 4096


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    validation_loss: float
    learning_rate: float
    seconds: float
    windows_per_second: float


@dataclass
class History:
    """Per-epoch losses and learning rates, for reports and plots."""

    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False

    @property
    def best_validation_loss(self) -> float:
        return self.epochs[self.best_epoch - 1].validation_loss if self.epochs else math.nan


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (world of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed_context(device: torch.device) -> Iterator[Distributed]:
    """Join the torchrun process group when RANK/WORLD_SIZE say so; leave it on exit."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield Distributed()
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    try:
        yield Distributed(dist.get_rank(), dist.get_world_size())
        # Leave together: rank 0 still exports while the others are done, and a rank that
        # tore its gloo group down meanwhile was seen to abort on a loaded machine.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("training.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Fixed seeds: initial weights, dropout and shuffling repeat exactly on the CPU.

    The CPU kernels used here (LSTM, linear, embedding) are deterministic already, so the
    costly global `torch.use_deterministic_algorithms` switch is not needed; a test holds it.
    """
    torch.manual_seed(seed)


def fit(
    net: SequenceNet,
    train: Windows,
    validation: Windows,
    config: TrainingConfig,
    *,
    device: torch.device,
    distributed: Distributed = Distributed(),
    progress: bool = True,
) -> History:
    """Train `net` in place; on return it holds the weights of the best validation epoch."""
    net.to(device)
    loss_fn = make_loss(net.task, config, train.labels)
    model: nn.Module = net
    if distributed.enabled:
        model = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.5, patience=max(1, config.patience // 2)
    )
    amp = config.amp and device.type == "cuda"
    every_step = config.forecast_targets == "every"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    sampler = DistributedSampler(
        range(len(train)),
        num_replicas=distributed.world_size,
        rank=distributed.rank,
        shuffle=True,
        seed=config.seed,
    )
    # Without a validation split, early stopping watches the training loss instead.
    watched = validation if len(validation) else train
    history = History()
    best_loss, best_state, stale = math.inf, copy.deepcopy(net.state_dict()), 0
    batches = math.ceil(len(sampler) / config.batch_size)
    with _progress_bar(progress and distributed.is_main) as bar:
        task = bar.add_task("training", total=config.epochs * batches, loss=math.nan, speed=0.0)
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            sampler.set_epoch(epoch)
            order = np.fromiter(iter(sampler), np.int64, len(sampler))
            model.train()
            total, seen = 0.0, 0
            for start in range(0, len(order), config.batch_size):
                index = order[start : start + config.batch_size]
                x, lengths, target = _batch(train, index, device)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.float16) if amp else nullcontext():
                    loss = loss_fn(model(x, lengths, every_step=every_step), target)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                total += float(loss.detach()) * len(index)
                seen += len(index)
                elapsed = time.perf_counter() - started
                bar.update(task, advance=1, loss=total / seen, speed=seen / max(elapsed, 1e-9))
            train_loss = _mean_across_ranks(total, seen, distributed, device)
            validation_loss = evaluate_loss(net, watched, loss_fn, device)
            scheduler.step(validation_loss)
            seconds = time.perf_counter() - started
            history.epochs.append(
                EpochRecord(
                    epoch,
                    train_loss,
                    validation_loss,
                    optimizer.param_groups[0]["lr"],
                    seconds,
                    seen * distributed.world_size / seconds,
                )
            )
            if validation_loss < best_loss:
                best_loss, stale = validation_loss, 0
                best_state = copy.deepcopy(net.state_dict())
                history.best_epoch = epoch
            else:
                stale += 1
                if stale >= config.patience:
                    history.stopped_early = epoch < config.epochs
                    break
    net.load_state_dict(best_state)
    return history


def predict(net: SequenceNet, windows: Windows, device: torch.device) -> NetOutput:
    """The network's outputs on all `windows`, on the CPU, in evaluation mode."""
    net.eval()
    parts: list[NetOutput] = []
    with torch.no_grad():
        for start in range(0, len(windows), EVAL_BATCH):
            x, lengths = windows.arrays(slice(start, start + EVAL_BATCH))
            out = net(torch.from_numpy(x).to(device), torch.from_numpy(lengths).to(device))
            parts.append(NetOutput(*(None if t is None else t.float().cpu() for t in out)))
    if not parts:
        return NetOutput(torch.zeros(0), torch.zeros(0))
    return NetOutput(*(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True)))


def fit_residual_variance(net: SequenceNet, windows: Windows, device: torch.device) -> None:
    """Per forecast feature, the mean squared training residual: errors become z-like."""
    net.set_residual_variance(torch.ones_like(net.residual_variance))
    out = predict(net, windows, device)
    variance = (out.target - out.raw).square().mean(dim=0)
    net.set_residual_variance(variance.to(net.residual_variance.device))


def evaluate_loss(
    net: SequenceNet,
    windows: Windows,
    loss_fn: Loss,
    device: torch.device,
) -> float:
    """The training loss on `windows`, in evaluation mode (no dropout)."""
    net.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(windows), EVAL_BATCH):
            index = np.arange(start, min(start + EVAL_BATCH, len(windows)))
            x, lengths, target = _batch(windows, index, device)
            total += float(loss_fn(net(x, lengths), target)) * len(index)
    return total / max(len(windows), 1)


class Loss:
    """Classify: BCE with logits (positive-weighted) or focal loss; forecast: MSE or, given
    `huber_delta`, a Huber loss: the MSE for errors within it, linear beyond, so that no spike
    (nor the key that has it) can pull the weights more than a large error does."""

    def __init__(
        self,
        task: str,
        kind: str,
        gamma: float,
        pos_weight: float,
        huber_delta: float | None = None,
    ) -> None:
        self.task, self.kind, self.gamma = task, kind, gamma
        self.pos_weight = torch.tensor(pos_weight)
        self.huber_delta = huber_delta

    def __call__(self, out: NetOutput, target: Tensor | None) -> Tensor:
        if self.task == "forecast" and self.huber_delta is None:
            # Not per_window's mean: the fused loss keeps training's gradients bit for bit.
            return nn.functional.mse_loss(out.raw.float(), out.target.float())
        return self.per_window(out, target).mean()

    def per_window(self, out: NetOutput, target: Tensor | None) -> Tensor:
        """Each window's loss [B], whose mean is the loss: what the report shares out by key."""
        if self.task == "forecast":
            return self._forecast_elements(out.raw.float(), out.target.float()).mean(dim=1)
        logit = out.raw.float()
        weighted = nn.functional.binary_cross_entropy_with_logits(
            logit, target, pos_weight=self.pos_weight.to(logit.device), reduction="none"
        )
        if self.kind == "focal":
            plain = nn.functional.binary_cross_entropy_with_logits(logit, target, reduction="none")
            # (1 - p_t)^gamma down-weights the windows the model already gets right.
            weighted = (1 - torch.exp(-plain)).pow(self.gamma) * weighted
        return weighted

    def _forecast_elements(self, prediction: Tensor, target: Tensor) -> Tensor:
        if self.huber_delta is None:
            return (prediction - target).square()
        # Twice torch's Huber loss: the squared error within delta, as the MSE, so that the
        # two agree (in value and gradient) wherever no error reaches delta.
        huber = nn.functional.huber_loss(
            prediction, target, reduction="none", delta=self.huber_delta
        )
        return 2.0 * huber


def make_loss(task: str, config: TrainingConfig, labels: np.ndarray | None) -> Loss:
    pos_weight = 1.0
    if task == "classify":
        positives = float(labels.sum()) if labels is not None else 0.0
        if config.pos_weight == "auto":
            pos_weight = (len(labels) - positives) / positives if positives else 1.0
        else:
            pos_weight = float(config.pos_weight)
    huber = task == "forecast" and config.forecast_loss == "huber"
    huber_delta = config.huber_delta if huber else None
    return Loss(task, config.loss, config.focal_gamma, pos_weight, huber_delta)


def _batch(
    windows: Windows, index: np.ndarray, device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None]:
    x, lengths = windows.arrays(index)
    labels = windows.labels
    target = None if labels is None else torch.from_numpy(labels[index]).to(device)
    return torch.from_numpy(x).to(device), torch.from_numpy(lengths).to(device), target


def _mean_across_ranks(
    total: float, seen: int, distributed: Distributed, device: torch.device
) -> float:
    if not distributed.enabled:
        return total / max(seen, 1)
    sums = torch.tensor([total, float(seen)], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return float(sums[0] / sums[1].clamp(min=1))


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[speed]:,.0f} windows/s"),
        TimeElapsedColumn(),
        disable=not enabled or not sys.stderr.isatty(),
    )
