"""The LSTM the trainer learns and exports, in window and stateful form.

Both forms compute the same function of a key's events (see `forward` and `step`), so a
detector may score with either: a stateful model fed a key's events one at a time from zero
state gives the window model's scores on the same events.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from detector.contract.features import FeatureCodec
from detector.contract.manifest import CategoricalFeature, Manifest

#: Residual variances are floored so that a perfectly predicted feature cannot divide by zero.
MIN_RESIDUAL_VARIANCE = 1e-6


class NetOutput(NamedTuple):
    """What one pass returns: the score, and what the loss needs."""

    #: [B]: probability (classify) or mean squared scaled error (forecast).
    score: Tensor
    #: classify: the logit [B]; forecast: the prediction [B, n_forecast] in encoded units.
    raw: Tensor
    #: forecast only: the encoded values being predicted [B, n_forecast].
    target: Tensor | None = None
    #: forecast only: squared scaled errors per forecast feature [B, n_forecast].
    contrib: Tensor | None = None


class EventEncoder(nn.Module):
    """Turns graph inputs (categoricals as float codes) into LSTM inputs.

    Numeric and time-delta columns pass through unchanged; each categorical column is looked
    up in its own embedding (code 0 is padding, 1 unknown), and the embeddings are appended.
    """

    def __init__(self, manifest: Manifest) -> None:
        super().__init__()
        features = manifest.features
        categorical = [i for i, f in enumerate(features) if isinstance(f, CategoricalFeature)]
        plain = [i for i in range(len(features)) if i not in categorical]
        self.register_buffer("plain_index", torch.tensor(plain, dtype=torch.long))
        self.categorical_index = categorical
        self.embeddings = nn.ModuleList(
            nn.Embedding(len(f.vocabulary) + 2, f.embedding_dim, padding_idx=0)
            for f in features
            if isinstance(f, CategoricalFeature)
        )
        self.size = len(plain) + sum(e.embedding_dim for e in self.embeddings)

    def forward(self, x: Tensor) -> Tensor:
        """[..., F] graph inputs -> [..., size] LSTM inputs."""
        parts = [x.index_select(-1, self.plain_index)]
        for column, embedding in zip(self.categorical_index, self.embeddings, strict=True):
            # Clamp so that a corrupt code can never index outside the table at runtime.
            codes = x[..., column].clamp(0, embedding.num_embeddings - 1).to(torch.int64)
            parts.append(embedding(codes))
        return torch.cat(parts, dim=-1)


class SequenceNet(nn.Module):
    """Embeddings, an LSTM stack, an optional LayerNorm and a linear head, per the manifest."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__()
        spec = manifest.network
        self.task = manifest.task
        self.layers = spec.layers
        self.hidden = spec.hidden
        self.bidirectional = spec.bidirectional
        self.encoder = EventEncoder(manifest)
        forecast = FeatureCodec(manifest).forecast_index.tolist() if self.task == "forecast" else []
        self.register_buffer("forecast_index", torch.tensor(forecast, dtype=torch.long))
        self.register_buffer("residual_variance", torch.ones(len(forecast)))
        if spec.bidirectional:
            # One single-layer LSTM per direction and layer, so that the backward direction
            # can run on each sequence reversed within its own length (padding never enters).
            self.forward_layers = self._direction(spec.layers, spec.hidden)
            self.backward_layers = self._direction(spec.layers, spec.hidden)
            self.between = nn.Dropout(spec.dropout)
        else:
            self.lstm = nn.LSTM(
                self.encoder.size,
                spec.hidden,
                spec.layers,
                batch_first=True,
                dropout=spec.dropout if spec.layers > 1 else 0.0,
            )
        summary = spec.hidden * (2 if spec.bidirectional else 1)
        self.norm = nn.LayerNorm(summary) if spec.layer_norm else nn.Identity()
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(summary, 1 if manifest.task == "classify" else len(forecast))
        self.reset_parameters()

    def _direction(self, layers: int, hidden: int) -> nn.ModuleList:
        return nn.ModuleList(
            nn.LSTM(self.encoder.size if i == 0 else 2 * hidden, hidden, 1, batch_first=True)
            for i in range(layers)
        )

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> SequenceNet:
        return cls(manifest)

    def reset_parameters(self) -> None:
        """Xavier for input and head weights, orthogonal recurrent weights, forget bias 1.

        A forget-gate bias of 1 lets gradients flow through long windows from the start.
        """
        for module in self.modules():
            if isinstance(module, nn.LSTM):
                for name, parameter in module.named_parameters():
                    if name.startswith("weight_ih"):
                        nn.init.xavier_uniform_(parameter)
                    elif name.startswith("weight_hh"):
                        for gate in parameter.data.chunk(4, dim=0):
                            nn.init.orthogonal_(gate)
                    elif name.startswith("bias_ih"):
                        nn.init.zeros_(parameter)
                        parameter.data[module.hidden_size : 2 * module.hidden_size] = 1.0
                    elif name.startswith("bias_hh"):
                        nn.init.zeros_(parameter)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    # -- window mode ---------------------------------------------------------------------

    def forward(self, x: Tensor, lengths: Tensor, *, every_step: bool = False) -> NetOutput:
        """Score right-padded windows x [B, W, F] whose first `lengths` [B] steps are real.

        With `every_step` (forecast training), every real step of every window is forecast
        from the steps before it, and the outputs hold one row per real step instead of one
        per window.
        """
        lengths = lengths.to(torch.int64)
        if every_step:
            return self._forecast_every_step(x, lengths)
        if self.task == "classify":
            summary = self._summarise(self.encoder(x), lengths)
            logit = self.head(self.dropout(self.norm(summary)))[:, 0]
            return NetOutput(torch.sigmoid(logit), logit)
        context = lengths - 1
        summary = self._summarise(self.encoder(x), context)
        # An empty context is the zero state, exactly as the stateful graph starts a key.
        summary = summary * (context > 0).to(summary.dtype)[:, None]
        prediction = self.head(self.dropout(self.norm(summary)))
        last = context.clamp(min=0).view(-1, 1, 1).expand(-1, 1, x.shape[2])
        target = x.gather(1, last)[:, 0].index_select(1, self.forecast_index)
        return self._forecast_output(prediction, target)

    def _forecast_every_step(self, x: Tensor, lengths: Tensor) -> NetOutput:
        if self.task != "forecast" or self.bidirectional:
            raise ValueError("every step can be forecast only by a unidirectional forecast model")
        outputs, _ = self.lstm(self.encoder(x))
        # Step t is forecast from the output after step t - 1, step 0 from the zero state:
        # what the window form computes for a window that ends at step t.
        before = torch.cat([torch.zeros_like(outputs[:, :1]), outputs[:, :-1]], dim=1)
        real = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        prediction = self.head(self.dropout(self.norm(before[real])))
        return self._forecast_output(prediction, x[real].index_select(1, self.forecast_index))

    def _summarise(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        """The top layer's output after the last real step (both directions if bidirectional)."""
        last = (lengths - 1).clamp(min=0)
        if not self.bidirectional:
            outputs, _ = self.lstm(inputs)
            return _at_step(outputs, last)
        steps = torch.arange(inputs.shape[1], device=inputs.device)[None, :]
        # Reversing within the length maps step t < L to L-1-t and leaves padding in place;
        # it is its own inverse, so the same index restores the original order.
        reverse = torch.where(steps < lengths[:, None], last[:, None] - steps, steps)
        layer_input = inputs
        for index, (ahead, behind) in enumerate(
            zip(self.forward_layers, self.backward_layers, strict=True)
        ):
            if index:
                layer_input = self.between(layer_input)
            forward_out, _ = ahead(layer_input)
            backward_out, _ = behind(_reorder(layer_input, reverse))
            layer_input = torch.cat([forward_out, _reorder(backward_out, reverse)], dim=-1)
        forward_summary = _at_step(forward_out, last)
        backward_summary = _at_step(backward_out, last)  # reversed order: all real steps seen
        return torch.cat([forward_summary, backward_summary], dim=-1)

    # -- stateful mode -------------------------------------------------------------------

    def step(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[NetOutput, Tensor, Tensor]:
        """Score one event per key, x [B, F], from the key's state h, c [layers, B, hidden]."""
        if self.bidirectional:
            raise ValueError("a bidirectional network has no stateful form")
        _, (h_out, c_out) = self.lstm(self.encoder(x)[:, None, :], (h, c))
        if self.task == "classify":
            logit = self.head(self.dropout(self.norm(h_out[-1])))[:, 0]
            return NetOutput(torch.sigmoid(logit), logit), h_out, c_out
        prediction = self.head(self.dropout(self.norm(h[-1])))
        target = x.index_select(1, self.forecast_index)
        return self._forecast_output(prediction, target), h_out, c_out

    def _forecast_output(self, prediction: Tensor, target: Tensor) -> NetOutput:
        contrib = (target - prediction).square() / self.residual_variance
        return NetOutput(contrib.mean(dim=1), prediction, target, contrib)

    def zero_state(self, batch: int) -> tuple[Tensor, Tensor]:
        """The state of a key that has not been seen yet."""
        shape = (self.layers, batch, self.hidden)
        weight = self.head.weight
        return weight.new_zeros(shape), weight.new_zeros(shape)

    def set_residual_variance(self, variance: Tensor) -> None:
        """Install per-feature residual variances fitted on training residuals."""
        self.residual_variance.copy_(variance.clamp(min=MIN_RESIDUAL_VARIANCE))


def _at_step(outputs: Tensor, steps: Tensor) -> Tensor:
    """outputs[b, steps[b]] for outputs [B, T, H]."""
    index = steps.view(-1, 1, 1).expand(-1, 1, outputs.shape[2])
    return outputs.gather(1, index)[:, 0]


def _reorder(values: Tensor, order: Tensor) -> Tensor:
    """values[b, order[b, t]] for values [B, T, H] and order [B, T]."""
    return values.gather(1, order[:, :, None].expand(-1, -1, values.shape[2]))
