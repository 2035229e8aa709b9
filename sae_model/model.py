"""The stacked autoencoder: an encoder stack and its mirrored decoder, nothing about training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "gelu": nn.GELU, "linear": nn.Identity}


@torch.no_grad()
def init_weights(model: StackedAutoencoder, scheme: str, generator: torch.Generator | None = None) -> None:
    """``model.init``: "default" keeps PyTorch's U(+-1/sqrt(fan_in)); "glorot4" draws every weight from
    U(+-4 sqrt(6 / (fan_in + fan_out))) with zero biases (Glorot & Bengio 2010; the factor 4 is their
    advice for logistic units, used by the Theano tutorials of the talk's era).

    Why it matters: PyTorch's bound is 7x smaller for 1128 -> 1000. On Tag Genome (relevances with a
    per-tag sd of 0.10) each sigmoid layer then shrank the spread of its input about 7-fold (layer
    sds 0.017, 0.0024, 0.00033), until the code was one point. Raises ValueError on an unknown scheme.
    """
    if scheme == "default":
        return
    if scheme != "glorot4":
        raise ValueError(f"model.init: unknown scheme {scheme!r}; choose default or glorot4")
    for lin in [*model.encoders, *model.decoders]:
        fan_out, fan_in = lin.weight.shape
        bound = 4.0 * (6.0 / (fan_in + fan_out)) ** 0.5
        lin.weight.uniform_(-bound, bound, generator=generator)
        lin.bias.zero_()


def make_activation(name: str) -> nn.Module:
    """A new activation module for ``name`` (sigmoid, relu, gelu or linear). Raises ValueError on any other
    name."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


class StackedAutoencoder(nn.Module):
    """``layers = [d0, d1, ..., dL]``: encoder d0 -> ... -> dL (the code), decoder dL -> ... -> d0.

    ``encoders[i]`` maps width ``layers[i]`` to ``layers[i+1]`` and ``decoders[i]`` maps back, so
    layer-wise pretraining of level ``i`` trains the pair (encoders[i], decoders[i]) on the codes of
    the levels below, and the unrolled network is just these pairs in order.
    """

    def __init__(
        self,
        layers: list[int],
        activation: str = "sigmoid",
        code_activation: str = "linear",
        output_activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        if len(layers) < 2:
            raise ValueError(f"layers: need at least an input and a code width, got {layers}")
        self.layers = [int(w) for w in layers]
        self.hidden_activation = activation
        self.code_activation = code_activation
        self.output_activation = output_activation
        pairs = list(zip(self.layers[:-1], self.layers[1:], strict=True))
        self.encoders = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)
        self.decoders = nn.ModuleList(nn.Linear(b, a) for a, b in pairs)
        depth = len(pairs)
        # Activation after encoders[i] / decoders[i]: the code layer and the output are special.
        self.enc_acts = nn.ModuleList(
            make_activation(code_activation if i == depth - 1 else activation) for i in range(depth)
        )
        self.dec_acts = nn.ModuleList(make_activation(output_activation if i == 0 else activation) for i in range(depth))

    @property
    def depth(self) -> int:
        return len(self.encoders)

    @property
    def input_width(self) -> int:
        return self.layers[0]

    @property
    def code_width(self) -> int:
        return self.layers[-1]

    def encode(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Activations of ``layer`` (1..depth; -1 = the code layer, 3 = the 250-wide one of 1128-1000-500-250-2)."""
        upto = self.depth if layer == -1 else layer
        if not 1 <= upto <= self.depth:
            raise ValueError(f"layer {layer}: must be -1 or in 1..{self.depth}")
        for i in range(upto):
            x = self.enc_acts[i](self.encoders[i](x))
        return x

    def decode(self, z: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Reconstruct the input from the activations of ``layer`` (default: the code)."""
        start = self.depth if layer == -1 else layer
        for i in reversed(range(start)):
            z = self.dec_acts[i](self.decoders[i](z))
        return z

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The output layer before its activation, for a numerically stable cross-entropy."""
        for i in reversed(range(1, self.depth)):
            z = self.dec_acts[i](self.decoders[i](z))
        return self.decoders[0](z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``x``: float tensor (batch, d0) -> encode -> decode -> (batch, d0)."""
        return self.decode(self.encode(x))

    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild the module (weights aside), as plain JSON."""
        return {
            "layers": self.layers,
            "activation": self.hidden_activation,
            "code_activation": self.code_activation,
            "output_activation": self.output_activation,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> StackedAutoencoder:
        """A new, untrained model from ``spec()``'s dict (layers and activations; missing activations default
        to sigmoid, linear code, sigmoid output). Raises KeyError without ``layers``, ValueError as the
        constructor does."""
        return cls(
            layers=list(spec["layers"]),
            activation=spec.get("activation", "sigmoid"),
            code_activation=spec.get("code_activation", "linear"),
            output_activation=spec.get("output_activation", "sigmoid"),
        )
