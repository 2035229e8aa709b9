"""The keys that read the talk's "L2 cost, lr 1, batch 5" (issue 22): summed cost, Glorot x 4, decoder bias."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sae_model.config import ModelConfig
from sae_model.model import StackedAutoencoder, init_weights
from sae_model.pretrain import init_decoder_bias, reduction_scale
from sae_model.trainer import build_model, make_optimizer


def test_summed_cost_step_equals_scaled_sgd_step_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    x = torch.rand(5, 12)
    a, b = torch.nn.Linear(12, 12), torch.nn.Linear(12, 12)
    b.load_state_dict(a.state_dict())
    scale = reduction_scale("sum", 12, "sgd")
    assert scale == 12.0 and reduction_scale("sum", 12, "adam") == 1.0 and reduction_scale("mean", 12, "sgd") == 1.0
    summed = make_optimizer(list(a.parameters()), "sgd", 0.1, 0.9, 1e-3)
    scaled = make_optimizer(list(b.parameters()), "sgd", 0.1 * scale, 0.9, 1e-3 / scale)
    for _ in range(3):
        for lin, opt, loss_fn in ((a, summed, lambda o: ((o - x) ** 2).sum(1).mean()), (b, scaled, lambda o: F.mse_loss(o, x))):
            opt.zero_grad()
            loss_fn(torch.sigmoid(lin(x))).backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


def test_glorot4_init_draws_within_its_bound_with_zero_biases():
    m = build_model(ModelConfig(layers=[300, 100, 2], init="glorot4"), seed=1)
    bound = 4 * math.sqrt(6 / 400)
    w = m.encoders[0].weight.detach()
    assert float(w.abs().max()) <= bound and float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert all(float(lin.bias.abs().max()) == 0 for lin in [*m.encoders, *m.decoders])
    default = build_model(ModelConfig(layers=[300, 100, 2]), seed=1)
    assert float(default.encoders[0].weight.abs().max()) <= 1 / math.sqrt(300)
    with pytest.raises(ValueError, match="model.init"):
        init_weights(default, "xavier")


def test_decoder_bias_starts_at_the_logit_of_the_input_mean():
    m = StackedAutoencoder([6, 3, 2])
    x = torch.tensor([[0.1, 0.2, 0.5, 0.0, 1.0, 0.3]] * 2 + [[0.3, 0.2, 0.5, 0.0, 1.0, 0.1]] * 2)
    init_decoder_bias(m, 0, x)
    mean = x.mean(0).clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(torch.sigmoid(m.decoders[0].bias), mean)
    before = m.decoders[1].bias.clone()
    init_decoder_bias(m, 1, torch.rand(4, 3))  # decoders[1] ends in a sigmoid too (hidden units)
    assert not torch.equal(before, m.decoders[1].bias)
