"""The RBM's visible units for counts (issue 20): Hinton & Salakhutdinov (2006)'s constrained Poisson unit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipelines.config import ConfigError, load_config
from sae_model.callbacks import Callback
from sae_model.config import FinetuneConfig, ModelConfig, PretrainConfig, TrainConfig
from sae_model.data import is_validation
from sae_model.evaluation import knn_accuracy
from sae_model.model import StackedAutoencoder
from sae_model.pretrain import rbm_params, rbm_step, tie_rbm_init
from sae_model.trainer import MlflowSettings, TrainingError, train
from tests.train_data import write_features

pytestmark = pytest.mark.usefixtures("one_thread", "mlflow_reset")


def documents(n: int, words: int, topics: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Word counts of ``n`` documents, each drawn from one of ``topics`` word distributions (30 % of
    a topic's mass on its own block of words, the rest on all words), with lengths from 5 to 200
    words; and the topics."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, topics, n)
    block = words // topics
    dists = np.full((topics, words), 0.7 / words)
    for t in range(topics):
        dists[t, t * block:(t + 1) * block] += 0.3 / block
    dists /= dists.sum(1, keepdims=True)
    lengths = rng.integers(5, 201, n)
    x = np.stack([rng.multinomial(m, dists[t]) for m, t in zip(lengths, labels, strict=True)])
    return x.astype(np.float32), labels


def test_constrained_poisson_cd1_step_is_the_papers_update():
    torch.manual_seed(0)
    model = StackedAutoencoder([6, 4, 2], output_activation="linear")
    v0 = torch.tensor([[3.0, 0, 1, 0, 0, 2], [0, 0, 0, 7, 1, 0], [1, 1, 1, 1, 1, 1]])
    w, hb, vb = (t.detach().clone() for t in (model.encoders[0].weight, model.encoders[0].bias, model.decoders[0].bias))
    opt = torch.optim.SGD([model.encoders[0].weight, model.encoders[0].bias, model.decoders[0].bias], lr=0.5)
    rbm_step(model, 0, v0, opt, cd_k=1, generator=torch.Generator().manual_seed(5), visible_units="constrained_poisson")

    # The same step written out from the paper: sampled binary hiddens, the visible rates
    # N * softmax(W'h + b) as the reconstruction (not a sample), then the hidden probabilities again.
    g = torch.Generator().manual_seed(5)
    p0 = torch.sigmoid(v0 @ w.T + hb)
    h0 = (torch.rand(p0.shape, generator=g) < p0).float()
    rates = v0.sum(1, keepdim=True) * torch.softmax(h0 @ w + vb, dim=1)
    assert torch.allclose(rates.sum(1), torch.tensor([6.0, 8.0, 6.0]))  # each row's length is kept
    p1 = torch.sigmoid(rates @ w.T + hb)
    n = v0.shape[0]
    assert torch.allclose(model.encoders[0].weight, w + 0.5 * (p0.T @ v0 - p1.T @ rates) / n, atol=1e-6)
    assert torch.allclose(model.encoders[0].bias, hb + 0.5 * (p0 - p1).mean(0), atol=1e-6)
    assert torch.allclose(model.decoders[0].bias, vb + 0.5 * (v0 - rates).mean(0), atol=1e-6)
    assert torch.equal(model.decoders[0].weight, model.encoders[0].weight.T)  # still tied


def test_constrained_poisson_applies_to_the_first_rbm_only():
    # Above the first level the inputs are hidden probabilities: the logistic unit as before.
    model = StackedAutoencoder([6, 4, 3, 2])
    x = torch.rand(5, 4)
    states = []
    for units in ("model", "constrained_poisson"):
        m = StackedAutoencoder([6, 4, 3, 2])
        m.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        rbm_step(m, 1, x, opt, cd_k=1, generator=torch.Generator().manual_seed(1), visible_units=units)
        states.append(m.encoders[1].weight.detach().clone())
    assert torch.equal(states[0], states[1])
    with pytest.raises(ValueError, match="visible_units"):
        rbm_step(model, 0, torch.rand(5, 6), torch.optim.SGD(model.parameters(), lr=0.1), 1, visible_units="poisson")


def _settings(visible: str, epochs: int = 10) -> tuple:
    return (
        ModelConfig(layers=[60, 16, 2]),
        PretrainConfig(method="rbm", rbm_visible=visible, epochs=epochs, lr=0.05, batch_size=20),
        FinetuneConfig(epochs=0),
        TrainConfig(seed=1, progress=False, val_fraction=0.0),
    )


def test_pretraining_on_counts_learns_the_topics_whatever_the_length(tmp_path):
    # Documents of three overlapping topics, 5 to 200 words long (5-NN accuracy on the raw counts:
    # 0.95). The same net, only the first RBM's visible unit differs: with the constrained Poisson
    # unit its 16 hidden units' probabilities separate the topics (5-NN accuracy ~0.97); the logistic
    # unit, whose reconstructions cannot exceed 1, learns features at chance (~0.31).
    x, labels = documents(600, 60, 3)
    uri = write_features(tmp_path / "root", x, labels)
    acc = {}
    for visible in ("constrained_poisson", "model"):
        r = train(*_settings(visible), uri, None, MlflowSettings("", enabled=False), tmp_path / visible)
        h = r.model.encode(torch.from_numpy(x), 1).detach().numpy()
        acc[visible] = knn_accuracy(h, labels, k=5)
    assert acc["constrained_poisson"] > 0.9 and acc["constrained_poisson"] > acc["model"] + 0.2, acc


def test_negative_inputs_are_refused_with_the_key_to_change(tmp_path):
    x, labels = documents(60, 60, 3)
    x[7, 3] = -1.0
    uri = write_features(tmp_path / "root", x, labels)
    with pytest.raises(TrainingError, match=r"rbm_visible=constrained_poisson needs non-negative.*1 training rows"):
        train(*_settings("constrained_poisson", epochs=1), uri, None, MlflowSettings("", enabled=False), tmp_path / "ck")


def test_negative_validation_rows_are_refused_too(tmp_path):
    x, labels = documents(100, 60, 3)
    ids = np.arange(100, dtype=np.int64) * 13 + 5  # write_features' item ids
    x[np.flatnonzero(is_validation(ids, 0.2))[0], 3] = -1.0
    uri = write_features(tmp_path / "root", x, labels)
    model, pre, fine, _ = _settings("constrained_poisson", epochs=1)
    tc = TrainConfig(seed=1, progress=False, val_fraction=0.2)
    with pytest.raises(TrainingError, match=r"needs non-negative.*1 validation rows"):
        train(model, pre, fine, tc, uri, None, MlflowSettings("", enabled=False), tmp_path / "ck")


def test_the_unit_needs_rbm_pretraining_and_the_scale_needs_the_unit():
    with pytest.raises(ConfigError, match=r"^pretrain.rbm_visible: constrained_poisson is a visible unit of an RBM"):
        load_config(None, ["pretrain.method=autoencoder", "pretrain.rbm_visible=constrained_poisson"])
    with pytest.raises(ConfigError, match=r"^pretrain.rbm_count_scale: scales the inputs of the constrained Poisson"):
        load_config(None, ["pretrain.method=rbm", "pretrain.rbm_count_scale=20"])
    unit = ["pretrain.method=rbm", "pretrain.rbm_visible=constrained_poisson"]
    for bad, message in (("inf", "must be <= 10000.0"), ("1e40", "must be <= 10000.0"), ("1e-30", "must be >= 0.0001")):
        with pytest.raises(ConfigError, match=rf"^pretrain.rbm_count_scale: {message}"):
            load_config(None, [*unit, f"pretrain.rbm_count_scale={bad}"])
    cfg = load_config(None, ["pretrain.method=rbm", "pretrain.rbm_visible=constrained_poisson"])
    assert cfg.pretrain.rbm_visible == "constrained_poisson"


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_unit_length_rows_need_the_count_scale_and_the_model_takes_them_unscaled(tmp_path):
    # The news20 preset's rows: unit-length, summing to ~5. At scale 1 the unit's weights barely move
    # from their init (hidden probabilities all ~0.5: mean sd over rows 0.002, measured); at x20 it
    # learns (sd 0.37), and the returned model's hidden units, fed the unscaled rows, separate the
    # topics (5-NN 0.98).
    x, labels = documents(600, 60, 3)
    x = _unit_rows(x)
    uri = write_features(tmp_path / "root", x, labels)
    hidden = {}
    for scale in (1.0, 20.0):
        model, pre, fine, tc = _settings("constrained_poisson")
        pre = dataclasses.replace(pre, rbm_count_scale=scale, lr=0.01)
        r = train(model, pre, fine, tc, uri, None, MlflowSettings("", enabled=False), tmp_path / str(scale))
        hidden[scale] = r.model.encode(torch.from_numpy(x), 1).detach().numpy()
    spread = {s: float(h.std(0).mean()) for s, h in hidden.items()}
    assert spread[1.0] < 0.02 and spread[20.0] > 0.2, spread
    assert knn_accuracy(hidden[20.0], labels, k=5) > 0.9


def test_the_scaled_rbm_is_the_rbm_of_the_scaled_rows():
    # rbm_step with count_scale c on x moves the decoder (the RBM's weights) and the biases as the
    # unscaled RBM does on c x, while the encoder holds c times the weights: SGD with momentum and
    # weight decay, two steps.
    c = 20.0
    x = documents(40, 12, 3)[0] / 50.0
    scaled, plain = StackedAutoencoder([12, 5, 2]), StackedAutoencoder([12, 5, 2])
    tie_rbm_init(scaled, 0, torch.Generator().manual_seed(0), count_scale=c)
    tie_rbm_init(plain, 0, torch.Generator().manual_seed(0))
    for model, rows, scale in ((scaled, x, c), (plain, x * c, 1.0)):
        opt = torch.optim.SGD(rbm_params(model, 0), lr=0.01, momentum=0.9, weight_decay=0.001)
        g = torch.Generator().manual_seed(3)
        for _ in range(2):
            rbm_step(model, 0, torch.from_numpy(rows), opt, 1, g, visible_units="constrained_poisson", count_scale=scale)
    assert torch.allclose(scaled.encoders[0].weight, c * plain.encoders[0].weight, rtol=1e-4, atol=1e-5)
    for a, b in ((scaled.decoders[0].weight, plain.decoders[0].weight), (scaled.encoders[0].bias, plain.encoders[0].bias),
                 (scaled.decoders[0].bias, plain.decoders[0].bias)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_with_the_scale_equals_training_on_scaled_rows(tmp_path, optimizer):
    # The whole pretraining through the trainer: rows x with rbm_count_scale=20 against the rows 20 x
    # with scale 1. Every stage above the first sees the same hidden units, so the two models differ
    # only in the first encoder's weights, by the factor (for Adam too: its rate is scaled).
    x, labels = documents(200, 60, 3)
    x = _unit_rows(x)
    off = MlflowSettings("", enabled=False)
    models = []
    for rows, scale in ((x, 20.0), (x * 20.0, 1.0)):
        model, pre, fine, tc = _settings("constrained_poisson", epochs=2)
        pre = dataclasses.replace(pre, rbm_count_scale=scale, lr=0.01 if optimizer == "sgd" else 0.001, optimizer=optimizer)
        uri = write_features(tmp_path / f"root{scale}", rows, labels)
        models.append(train(model, pre, fine, tc, uri, None, off, tmp_path / f"ck{scale}").model.state_dict())
    for key in models[0]:
        want = models[1][key] * (20.0 if key == "encoders.0.weight" else 1.0)
        assert torch.allclose(models[0][key], want, rtol=1e-3, atol=1e-4), key


class _StopAt(Callback):
    """Stops training at the end of one epoch (before its checkpoint), as a killed job would."""

    def __init__(self, stage_index: int, epoch: int) -> None:
        self.at = (stage_index, epoch)

    def on_epoch_end(self, trainer, stage, rec) -> None:
        if (stage.index, rec.epoch) == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize(("first", "then"), [(2, 3), (3, 2)])
def test_a_resume_with_another_run_length_keeps_the_encoder_scaled_once(tmp_path, first, then):
    # pretrain.epochs may change on a resume (RESUME_FREE_KEYS): killed after the first RBM's stage,
    # resumed with a longer or shorter stage. The encoder must hold the factor exactly once, i.e.
    # c times the decoder's (the RBM's) weights, as in an uninterrupted run.
    x, labels = documents(200, 60, 3)
    uri = write_features(tmp_path / "root", _unit_rows(x), labels)
    model, pre, fine, tc = _settings("constrained_poisson", epochs=first)
    pre = dataclasses.replace(pre, rbm_count_scale=20.0)
    off = MlflowSettings("", enabled=False)
    with pytest.raises(KeyboardInterrupt):
        train(model, pre, fine, tc, uri, None, off, tmp_path / "ck", callbacks=[_StopAt(1, 0)])
    pre = dataclasses.replace(pre, epochs=then)
    m = train(model, pre, fine, tc, uri, None, off, tmp_path / "ck", resume=True).model
    assert torch.allclose(m.encoders[0].weight, 20.0 * m.decoders[0].weight.T, rtol=1e-5, atol=1e-6)
