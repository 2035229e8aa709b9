"""Layer-wise pretraining steps: a shallow (denoising) autoencoder or an RBM trained with CD-k.

Each function does one minibatch step on level ``layer`` of a ``StackedAutoencoder``: ``x`` is the
batch already fed through the frozen levels below (see ``inputs_for_layer``). They return the
batch's reconstruction loss as a detached tensor (no host sync), so the trainer can sum it and
check it for NaN/Inf once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sae_model.callbacks import Callback
from sae_model.model import StackedAutoencoder


def corrupt(x: torch.Tensor, fraction: float, generator: torch.Generator | None) -> torch.Tensor:
    """``x`` with each entry zeroed with probability ``fraction`` (masking noise); ``x`` itself at 0."""
    if fraction <= 0:
        return x
    return x * (torch.rand(x.shape, device=x.device, generator=generator) >= fraction)


@torch.no_grad()
def inputs_for_layer(model: StackedAutoencoder, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The activations that feed level ``layer`` (0 = the data itself), through frozen levels below."""
    return x if layer == 0 else model.encode(x, layer)


def reconstruction_loss(recon_or_logits: torch.Tensor, x: torch.Tensor, bce: bool) -> torch.Tensor:
    """Mean over items of the per-item loss (squared error or cross-entropy summed over dims) / dims.

    Dividing by the width keeps learning rates comparable across layer widths (the talk's lr = 1).
    """
    if bce:
        return F.binary_cross_entropy_with_logits(recon_or_logits, x)
    return F.mse_loss(recon_or_logits, x)


def reduction_scale(reduction: str, width: int, optimizer: str) -> float:
    """Factor on an SGD step that turns the mean-reduced L2 cost (``F.mse_loss``: mean over the batch
    and the ``width`` reconstructed dims) into the summed one (sum over dims, mean over the batch).

    The summed cost's gradient is exactly ``width`` times the mean's, so SGD (with momentum, which is
    linear in the gradient) takes the same steps with lr x width and weight decay / width; the
    logged losses stay per-dimension and comparable. Adam is invariant to the gradient's scale: 1.
    """
    return float(width) if reduction == "sum" and optimizer == "sgd" else 1.0


@torch.no_grad()
def init_decoder_bias(model: StackedAutoencoder, layer: int, x: torch.Tensor) -> None:
    """Start ``decoders[layer]``'s bias at the logit of the mean of ``x`` (its input, rows x width)
    when that decoder ends in a sigmoid, so the untrained layer already outputs each input's mean.

    With outputs at 0.5 and Tag Genome relevances averaging 0.11, every output's error has the same
    sign at first; under the summed L2 cost at lr 1 that shared error drove the layer's hidden units
    into saturation (measured: validation loss 0.034 against 0.013 for predicting the mean).
    """
    if not isinstance(model.dec_acts[layer], torch.nn.Sigmoid) or x.shape[0] == 0:
        return
    m = x.float().mean(0).clamp(1e-3, 1 - 1e-3)
    model.decoders[layer].bias.copy_(torch.log(m / (1 - m)).to(model.decoders[layer].bias.dtype))


class DecoderBiasInit(Callback):
    """Trainer callback for ``pretrain.decoder_bias=data_mean``: at the start of each pretraining
    stage (not when resuming into one) sets the decoder's bias from the stage's training inputs."""

    def __init__(self, rows: int = 4096) -> None:
        self.rows = rows

    def on_stage_start(self, trainer, stage) -> None:  # noqa: ANN001 - sae_model.trainer's Trainer, Stage
        """Set the stage's decoder bias from up to ``rows`` unshuffled training rows, for a pretraining stage
        with no epoch in the history yet."""
        if stage.kind != "pretrain" or any(h["stage_index"] == stage.index for h in trainer.history):
            return
        xb = next(iter(trainer.source.batches("train", self.rows, shuffle=False)), None)
        if xb is not None:
            init_decoder_bias(trainer.model, stage.layer, inputs_for_layer(trainer.model, xb, stage.layer))


def autoencoder_step(
    model: StackedAutoencoder,
    layer: int,
    x: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    corruption: float,
    bce: bool,
    generator: torch.Generator | None = None,
    before_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One step of the shallow autoencoder encoders[layer] -> decoders[layer], optionally denoising.

    ``before_step`` runs between backward and the optimizer step (distributed training sums the
    gradients over ranks there).
    """
    enc, dec = model.encoders[layer], model.decoders[layer]
    h = model.enc_acts[layer](enc(corrupt(x, corruption, generator)))
    out = dec(h)
    use_bce = bce and layer == 0
    loss = reconstruction_loss(out if use_bce else model.dec_acts[layer](out), x, use_bce)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def rbm_step(
    model: StackedAutoencoder,
    layer: int,
    v0: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    cd_k: int,
    generator: torch.Generator | None = None,
    before_step: Callable[[], None] | None = None,
    visible_units: str = "model",
    count_scale: float = 1.0,
) -> torch.Tensor:
    """One CD-k step of the RBM whose weights are tied: W = encoders[layer].weight = decoders[layer].weight.T.

    ``v0``: float (batch, layers[layer]). Hidden units are binary (sampled) except for the code layer,
    whose units are linear with unit Gaussian noise (Hinton & Salakhutdinov 2006). The visible side
    uses the model's decoder activation (logistic for [0,1] data), or with ``visible_units=
    "constrained_poisson"`` on level 0 the constrained Poisson unit of the same paper's document model:
    each visible unit's rate is ``N * softmax(W'h + b)``, ``N`` the row's total (its length in words),
    so the rates of a row sum to its length. As in the paper's CD-1, the reconstruction is the mean (the
    rates), not a sample. The CD gradient is written into ``.grad`` so any torch optimizer (momentum,
    weight decay) applies it, and its state is checkpointed like the others.

    ``count_scale`` (constrained Poisson only, ``pretrain.rbm_count_scale``): the RBM models the rows
    x ``count_scale`` with weights W, while the encoder holds ``count_scale * W``, so that it encodes the
    unscaled rows as the RBM encodes the scaled ones, at every step (a checkpoint or a resume never needs
    a conversion) and the decoder holds W.T. The gradient on the encoder is ``count_scale`` times the
    RBM's, so SGD (with momentum and weight decay) moves it exactly ``count_scale`` times the RBM's step.

    Returns the mean squared error of the mean-field reconstruction of the unscaled ``v0``, detached.
    Raises ValueError on an unknown ``visible_units``.
    """
    if visible_units not in ("model", "constrained_poisson"):
        raise ValueError(f"visible_units: unknown {visible_units!r}; choose model or constrained_poisson")
    poisson = _count_units(visible_units, layer)
    c = float(count_scale) if poisson else 1.0
    enc, dec = model.encoders[layer], model.decoders[layer]
    top = layer == model.depth - 1
    w_enc, hb, vb = enc.weight, enc.bias, dec.bias  # (hidden, visible)
    w = w_enc / c if c != 1.0 else w_enc  # the RBM's own weights, for the scaled rows
    v = v0 * c if c != 1.0 else v0
    length = v.sum(1, keepdim=True) if poisson else None

    def hidden(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = F.linear(v, w, hb)
        if top:
            return pre, pre + torch.randn(pre.shape, device=pre.device, generator=generator)
        p = torch.sigmoid(pre)
        return p, (torch.rand(p.shape, device=p.device, generator=generator) < p).to(p.dtype)

    def visible(h: torch.Tensor) -> torch.Tensor:
        return _visible_mean(model, layer, F.linear(h, w.t(), vb), length)

    ph0, h = hidden(v)
    vk, phk = v, ph0
    for _ in range(cd_k):
        vk = visible(h)
        phk, h = hidden(vk)
    n = v.shape[0]
    # Descent direction = -(positive - negative statistics).
    gw = -(ph0.t() @ v - phk.t() @ vk) / n
    ghb = -(ph0 - phk).mean(0)
    gvb = -(v - vk).mean(0)
    optimizer.zero_grad(set_to_none=True)
    w_enc.grad, hb.grad, vb.grad = gw * c if c != 1.0 else gw, ghb, gvb
    if before_step is not None:
        before_step()
    optimizer.step()
    # Keep the decoder the transpose of the RBM's weights (the unrolled net starts tied).
    w = w_enc / c if c != 1.0 else w_enc
    dec.weight.copy_(w.t())
    # The updated RBM's reconstruction from the step's hidden probabilities (no second encoder pass),
    # in the unscaled rows' units.
    recon = visible(ph0)
    return F.mse_loss(recon / c if c != 1.0 else recon, v0)


@torch.no_grad()
def reconstruct_layer(model: StackedAutoencoder, layer: int, v: torch.Tensor, visible_units: str = "model") -> torch.Tensor:
    """Level ``layer``'s deterministic reconstruction of ``v`` (batch, layers[layer]), the pretraining
    stages' validation measure: the encoder's activations (an RBM's hidden probabilities, the code
    layer's linear means), then the decoder's, or for ``visible_units="constrained_poisson"`` on level 0
    the rates ``N * softmax`` as ``rbm_step`` defines them (for the unscaled rows: the encoder holds the
    count scale, the decoder does not). Same shape and dtype as ``v``."""
    h = model.enc_acts[layer](model.encoders[layer](v))
    length = v.sum(1, keepdim=True) if _count_units(visible_units, layer) else None
    return _visible_mean(model, layer, model.decoders[layer](h), length)


def _count_units(visible_units: str, layer: int) -> bool:
    """Whether level ``layer``'s visible units are constrained Poisson: only the data's own (level 0)."""
    return visible_units == "constrained_poisson" and layer == 0


def _visible_mean(model: StackedAutoencoder, layer: int, logits: torch.Tensor, length: torch.Tensor | None) -> torch.Tensor:
    """The visible units' mean given their total input: the decoder's activation, or with ``length`` (each
    row's total, (batch, 1)) the constrained Poisson rates ``length * softmax(logits)``."""
    return model.dec_acts[layer](logits) if length is None else torch.softmax(logits, dim=1) * length


def rbm_params(model: StackedAutoencoder, layer: int) -> list[torch.nn.Parameter]:
    """What an RBM optimizer updates: the shared weights (in the encoder) and both biases."""
    return [model.encoders[layer].weight, model.encoders[layer].bias, model.decoders[layer].bias]


def tie_rbm_init(model: StackedAutoencoder, layer: int, generator: torch.Generator | None = None,
                 count_scale: float = 1.0) -> None:
    """Hinton's RBM init: small Gaussian weights (sd 0.1, 0.01 here for wide layers), zero biases, tied;
    the encoder holds ``count_scale`` times the RBM's weights (see ``rbm_step``)."""
    with torch.no_grad():
        enc, dec = model.encoders[layer], model.decoders[layer]
        w = torch.randn(enc.weight.shape, generator=generator) * 0.01
        enc.weight.copy_(w * count_scale)
        enc.bias.zero_()
        dec.bias.zero_()
        dec.weight.copy_(w.t())
