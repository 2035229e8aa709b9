import dataclasses

import pytest

from pipelines.config import Config, ConfigError, load_config


def test_defaults_layer_base_then_file_then_preset_then_overrides(tmp_path):
    local = tmp_path / "local.yaml"
    local.write_text("paths:\n  root: /tmp/x\nfinetune:\n  epochs: 3\n")
    cfg = load_config(local, ["finetune.epochs=7", "model.layers=[10,4,2]"], preset="tag_genome")
    assert cfg.paths.root == "/tmp/x"  # from the file
    assert cfg.data.source == "tag_genome"  # from the preset
    assert cfg.pretrain.lr == 1.0 and cfg.pretrain.batch_size == 5  # the talk's settings
    assert cfg.finetune.epochs == 7  # override beats preset beats file
    assert cfg.model.layers == [10, 4, 2]


def test_presets_reproduce_the_talk():
    tg = load_config(preset="tag_genome")
    assert tg.model.layers == [1128, 1000, 500, 250, 2]
    assert (tg.pretrain.epochs, tg.pretrain.lr, tg.finetune.epochs, tg.finetune.lr) == (15, 1.0, 75, 0.1)
    assert tg.finetune.loss == "mse" and tg.finetune.batch_size == 5
    mn = load_config(preset="mnist")
    assert mn.model.layers == [784, 1000, 500, 250, 2]
    assert (mn.pretrain.epochs, mn.finetune.epochs) == (15, 5)


@pytest.mark.parametrize("name", ["mnist_tsne", "tag_genome_tsne"])
def test_tsne_presets_fine_tune_the_talks_stacks(name):
    cfg = load_config(preset=name)
    base = load_config(preset=name.removesuffix("_tsne"))
    # The same pretraining but for the RBM weight cost, measured to help reconstruction, not the maps.
    assert cfg.model.layers == base.model.layers and cfg.pretrain == dataclasses.replace(base.pretrain, weight_decay=0.0)
    # In-batch affinities: the perplexity must stay well below the batch size to be local.
    assert cfg.finetune.loss == "tsne" and cfg.finetune.effective_batch_size >= 50 * cfg.finetune.perplexity


def test_umap_preset_uses_the_global_graph_on_the_mnist_stack():
    cfg, base = load_config(preset="mnist_umap"), load_config(preset="mnist")
    assert cfg.model.layers == base.model.layers and cfg.pretrain == dataclasses.replace(base.pretrain, weight_decay=0.0)
    assert (cfg.finetune.loss, cfg.finetune.neighbor_graph) == ("umap", "global")
    assert cfg.train.distributed.num_processes == 1  # the global graph needs one process


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.sourc=mnist", "data.*sourc"),
        ("nope.x=1", "nope"),
        ("data.source=parquet", "data.source: must be one of"),
        ("train.seed=abc", "train.seed: expected an integer"),
        ("pretrain.lr=-1", "pretrain.lr"),
        ("model.layers=[784,0,2]", "model.layers"),
        ("finetune.loss=l1", "finetune.loss"),
        ("train.reader_cache_mb=-1", "train.reader_cache_mb"),
        ("finetune.corruption=1.5", "finetune.corruption"),
        ("justakey", "expected dotted.key=value"),
        ("infer.placement=refine", "infer.placement: refine .* needs train.split_column"),
        ("infer.placement=umap", "infer.placement"),
    ],
)
def test_bad_keys_and_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark:\n  mastr: local[1]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*mastr"):
        load_config(bad)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="no such preset"):
        load_config(preset="imagenet")


def test_free_form_spark_conf_keeps_dotted_key():
    cfg = load_config(None, ["spark.conf.spark.sql.ansi.enabled=false"])
    assert cfg.spark.conf == {"spark.sql.ansi.enabled": "False"} or cfg.spark.conf == {"spark.sql.ansi.enabled": "false"}


def test_flat_and_hash_are_stable():
    a, b = load_config(), load_config()
    assert a.hash() == b.hash()
    assert load_config(None, ["train.seed=1"]).hash() != a.hash()
    flat = a.flat()
    assert flat["model.layers"] == Config().model.layers and "pretrain.method" in flat


@pytest.mark.parametrize(("name", "code"), [("mnist_protocol", 2), ("mnist_protocol_30", 30)])
def test_protocol_presets_train_on_the_training_split_and_score_the_published_way(name, code):
    cfg = load_config(preset=name)
    assert cfg.model.layers == [784, 1000, 500, 250, code] and cfg.pretrain.method == "rbm"
    assert (cfg.train.split_column, cfg.train.train_value) == ("split", "train")
    # Sainburg et al. 2021 / Hinton & Salakhutdinov 2006: 5-NN and trustworthiness at k=5 on 10,000
    # items, every one of the 60,000 training images fitted (PCA too).
    ev = cfg.evaluate
    assert (ev.k_knn, ev.k_tw, ev.max_items, ev.max_fit_items) == (5, 5, 10000, 60000)
    if code == 2:
        assert (cfg.finetune.loss, cfg.finetune.neighbor_graph) == ("umap", "global")
        assert cfg.train.distributed.num_processes == 1  # the global graph needs one process
    else:
        assert cfg.finetune.loss == "bce"  # Hinton's cross-entropy fine-tuning
