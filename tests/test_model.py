import numpy as np
import pytest
import torch

from sae_model.loading import Encoder, load_encoder, load_model, save_model
from sae_model.model import StackedAutoencoder


def test_shapes_and_layers():
    m = StackedAutoencoder([12, 8, 4, 2])
    x = torch.rand(5, 12)
    assert m.encode(x).shape == (5, 2)
    assert m.encode(x, layer=2).shape == (5, 4)
    assert m(x).shape == (5, 12)
    out = m(x)
    assert float(out.min()) >= 0 and float(out.max()) <= 1  # logistic output for [0,1] data
    # decode_logits is the output before its sigmoid
    assert torch.allclose(torch.sigmoid(m.decode_logits(m.encode(x))), out, atol=1e-6)
    with pytest.raises(ValueError, match="layer 4"):
        m.encode(x, layer=4)


def test_code_layer_is_linear_by_default():
    m = StackedAutoencoder([6, 4, 2])
    with torch.no_grad():
        m.encoders[1].bias.fill_(100.0)  # a sigmoid code would saturate at 1
    assert float(m.encode(torch.rand(3, 6)).min()) > 90


def test_save_load_roundtrip_is_exact(tmp_path):
    torch.manual_seed(0)
    m = StackedAutoencoder([10, 6, 3], activation="relu")
    save_model(m, tmp_path / "m")
    m2 = load_model(tmp_path / "m")
    x = np.random.default_rng(0).random((7, 10), dtype=np.float32)
    a = Encoder(m).encode(x)
    b = load_encoder(str(tmp_path / "m")).encode(x)
    np.testing.assert_array_equal(a, b)
    assert m2.hidden_activation == "relu" and m2.layers == [10, 6, 3]


def test_encoder_rejects_wrong_width():
    with pytest.raises(ValueError, match="width 10"):
        Encoder(StackedAutoencoder([10, 2])).encode(np.zeros((3, 9), dtype=np.float32))
