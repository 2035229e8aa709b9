"""Kind 4 of the bad-input contract: a ``key=value`` override is taken literally.

YAML would cut ``run #1`` at the comment, and read ``yes``, ``null`` or ``1e3`` as other types; for a
text key the value must come back exactly as typed. Case ``path-with-hash`` in ../shared/cases/.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.config import ConfigError, load_config

TEXT_KEYS = ["paths.root", "data.input", "infer.model_uri", "data.jdbc.query", "spark.conf.spark.x.y", "data.options.sep"]


def _get(cfg, key):
    if key.startswith("spark.conf."):
        return cfg.spark.conf[key[len("spark.conf.") :]]
    if key.startswith("data.options."):
        return cfg.data.options[key[len("data.options.") :]]
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(TEXT_KEYS), value=st.text())
def test_any_string_value_comes_back_unchanged(key, value):
    assert _get(load_config(None, [f"{key}={value}"]), key) == value


@pytest.mark.parametrize(
    "value",
    ["/tmp/run #1", "/data/a b/100%/ünï #x", "#start", "yes", "null", "~", "1e3", "[a, b]", "{x: 1}", " padded ", ""],
)
def test_yaml_special_strings_are_kept(value):
    cfg = load_config(None, [f"paths.root={value}", f"spark.conf.spark.sql.ansi.enabled={value}"])
    assert cfg.paths.root == value and cfg.spark.conf["spark.sql.ansi.enabled"] == value


def test_typed_keys_still_read_yaml():
    cfg = load_config(None, ["model.layers=[16, 8, 2]", "train.progress=no", "pretrain.lr=1e-3", "data.source=synthetic"])
    assert cfg.model.layers == [16, 8, 2] and cfg.train.progress is False
    assert cfg.pretrain.lr == pytest.approx(0.001) and cfg.data.source == "synthetic"


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.seed=1 #2", r"train.seed: expected an integer, got '1 #2'"),
        ("model.layers=[16,8,2] # wide", r"model.layers: expected a list, got '\[16,8,2\] # wide'"),
        ("data.source=synthetic # comment", r"data.source: must be one of .*got 'synthetic # comment'"),
    ],
)
def test_a_comment_in_a_typed_value_is_an_error_not_dropped(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("name", ["run #1", "a b ü", "100%41", "x?y;z"])
def test_every_reader_opens_a_root_with_special_characters(tmp_path, name):
    """pyarrow (in-memory), Petastorm (streamed, train.in_memory_max_mb=0) and the labels reader."""
    import numpy as np
    import torch

    from pipelines.publish import table_uri
    from sae_model.data import load_table, open_source, read_labels
    from tests.train_data import manifold, write_features

    root = tmp_path / name
    x, labels = manifold(120, 8, seed=1)
    write_features(root, x, labels)
    uri = table_uri(str(root), "features")
    ids, mat = load_table(uri, 8)
    assert mat.shape == (120, 8)
    streamed = open_source(uri, 8, 0.0, torch.device("cpu"), in_memory_max_mb=0, workers=1)
    assert streamed.streaming
    got = np.concatenate([b.numpy() for b in streamed.batches("train", 50, shuffle=False, seed=0)])
    assert sorted(map(tuple, got.round(6))) == sorted(map(tuple, x.round(6)))
    np.testing.assert_array_equal(read_labels(table_uri(str(root), "items"), ids), labels[(ids - 5) // 13])  # ids are 13 i + 5
