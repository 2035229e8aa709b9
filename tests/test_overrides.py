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
