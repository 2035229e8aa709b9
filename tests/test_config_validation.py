"""Config validation by pydantic (issue 18): every former hand-written range check still refuses its bad
value with one line ``<dotted key>: ...`` and accepts the value at its edge; unknown keys are named in
full; the resolved configs, and so their hashes (checkpoint directories, the nightly's fingerprints), are
those of the hand-written implementation.

``config_golden.json`` holds ``hash()``, ``resume_fingerprint()`` and (single-layer configs)
``to_dict()`` as computed by the hand-written dataclass implementation at 51a175e, before pydantic.
Rewrite it (``python tests/test_config_validation.py``) only when a config key, default or preset is
changed on purpose: that changes the hashes, so existing checkpoints are not resumed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, conf_dir, load_config, presets
from sae_model.config import DistributedConfig, FinetuneConfig

GOLDEN = Path(__file__).with_name("config_golden.json")
REWRITE = ("if a config key, default or preset changed on purpose (new hashes: checkpoints of the old ones are "
           "not resumed), rewrite tests/config_golden.json with `PYTHONPATH=. python tests/test_config_validation.py`")


def _load(name: str):
    """``FILE+PRESET`` (``base`` = no --config file, ``-`` = no preset) -> the resolved config."""
    file, preset = name.split("+")
    return load_config(None if file == "base" else conf_dir() / file, preset=None if preset == "-" else preset)


@pytest.mark.parametrize("name", list(json.loads(GOLDEN.read_text())))
def test_resolved_config_and_hashes_are_those_before_pydantic(name):
    want = json.loads(GOLDEN.read_text())[name]
    cfg = _load(name)
    if "to_dict" in want:
        assert cfg.to_dict() == want["to_dict"], REWRITE
        assert cfg.to_yaml() == yaml.safe_dump(want["to_dict"], sort_keys=False), REWRITE  # the same key order
    assert (cfg.hash(), cfg.resume_fingerprint()) == (want["hash"], want["resume_fingerprint"]), REWRITE


def test_golden_file_covers_local_yaml_and_every_preset():
    names = set(json.loads(GOLDEN.read_text()))
    assert {"base+-", "local.yaml+-", "cluster.yaml+-"} <= names
    assert {f"base+{p}" for p in presets()} | {f"local.yaml+{p}" for p in presets()} <= names, REWRITE


# (bad override(s), the key the error must start with, a value at the edge that is accepted)
RANGE_CHECKS = [
    ("model.layers=[784]", "model.layers", "model.layers=[784,2]"),
    ("model.layers=[784,0,2]", "model.layers[1]", "model.layers=[784,1,2]"),
    ("pretrain.epochs=-1", "pretrain.epochs", "pretrain.epochs=0"),
    ("pretrain.lr=0", "pretrain.lr", "pretrain.lr=1e-9"),
    ("pretrain.batch_size=0", "pretrain.batch_size", "pretrain.batch_size=1"),
    ("pretrain.corruption=1.0", "pretrain.corruption", "pretrain.corruption=0.99"),
    ("pretrain.corruption=-0.1", "pretrain.corruption", "pretrain.corruption=0"),
    ("pretrain.cd_k=0", "pretrain.cd_k", "pretrain.cd_k=1"),
    ("finetune.epochs=-1", "finetune.epochs", "finetune.epochs=0"),
    ("finetune.lr=0", "finetune.lr", "finetune.lr=1e-9"),
    ("finetune.batch_size=0", "finetune.batch_size", "finetune.batch_size=1"),
    ("finetune.recon_weight=-1", "finetune.recon_weight", "finetune.recon_weight=0"),
    ("finetune.corruption=1", "finetune.corruption", "finetune.corruption=0.5"),
    ("finetune.neighbor_batch_size=1", "finetune.neighbor_batch_size", "finetune.neighbor_batch_size=2"),
    ("finetune.perplexity=0", "finetune.perplexity", "finetune.perplexity=0.5"),
    ("finetune.tsne_dof=0", "finetune.tsne_dof", "finetune.tsne_dof=0.5"),
    ("finetune.n_neighbors=1", "finetune.n_neighbors", "finetune.n_neighbors=2"),
    ("finetune.spread=0", "finetune.spread", "finetune.spread=0.1"),
    ("finetune.min_dist=-0.1", "finetune.min_dist", "finetune.min_dist=0"),
    ("finetune.min_dist=3.0", "finetune.min_dist", "finetune.min_dist=2.99"),
    ("finetune.epochs=5 finetune.lr_decay_after=5", "finetune.lr_decay_after", "finetune.epochs=5 finetune.lr_decay_after=4"),
    ("finetune.negative_sample_rate=-1", "finetune.negative_sample_rate", "finetune.negative_sample_rate=0"),
    ("finetune.epochs=5 finetune.loss=umap finetune.recon_weight=1 finetune.recon_weight_after=5", "finetune.recon_weight_after",
     "finetune.epochs=5 finetune.loss=umap finetune.recon_weight=1 finetune.recon_weight_after=4"),
    ("finetune.loss=umap finetune.recon_weight_after=1", "finetune.recon_weight_after",
     "finetune.loss=umap finetune.recon_weight=0.5 finetune.recon_weight_after=1"),
    ("finetune.tsne_exaggeration=2", "finetune.tsne_exaggeration", "finetune.loss=tsne finetune.tsne_exaggeration=2"),
    ("finetune.tsne_exaggeration=0.5", "finetune.tsne_exaggeration", "finetune.tsne_exaggeration=1"),
    ("finetune.tsne_exaggeration=1001", "finetune.tsne_exaggeration", "finetune.loss=tsne finetune.tsne_exaggeration=1000"),
    ("finetune.loss=umap finetune.graph_sampling=rows", "finetune.graph_sampling",
     "finetune.loss=umap finetune.graph_sampling=rows finetune.neighbor_graph=global"),
    ("finetune.loss=umap finetune.neighbor_graph=global finetune.formation_sampling=edges", "finetune.formation_sampling",
     "finetune.loss=umap finetune.neighbor_graph=global finetune.formation_sampling=edges finetune.epochs=5 "
     "finetune.recon_weight=1 finetune.recon_weight_after=2"),
    ("finetune.loss=tsne finetune.loss_reduction=sum", "finetune.loss_reduction", "finetune.loss=mse finetune.loss_reduction=sum"),
    ("train.distributed.num_processes=0", "train.distributed.num_processes", "train.distributed.num_processes=1"),
    ("train.distributed.timeout_s=0", "train.distributed.timeout_s", "train.distributed.timeout_s=1"),
    ("train.val_fraction=1", "train.val_fraction", "train.val_fraction=0"),
    ("train.reader_cache_mb=-1", "train.reader_cache_mb", "train.reader_cache_mb=0"),
    ("train.in_memory_max_mb=-1", "train.in_memory_max_mb", "train.in_memory_max_mb=0"),
    ("train.split_column=split train.train_value=", "train.train_value", "train.split_column=split train.train_value=test"),
    ("evaluate.k_knn=0", "evaluate.k_knn", "evaluate.k_knn=1"),
    ("evaluate.k_tw=0", "evaluate.k_tw", "evaluate.k_tw=1"),
    ("evaluate.max_items=24", "evaluate.max_items", "evaluate.max_items=25"),
    ("evaluate.max_fit_items=0", "evaluate.max_fit_items", "evaluate.max_fit_items=1"),
    ("data.limit=-1", "data.limit", "data.limit=0"),
    ("data.since=2024-13-01", "data.since", "data.since=2024-12-01"),
    ("data.synthetic.items=0", "data.synthetic.items", "data.synthetic.items=1"),
    ("data.synthetic.tags=0", "data.synthetic.tags", "data.synthetic.tags=1"),
    ("data.synthetic.genres=0", "data.synthetic.genres", "data.synthetic.genres=1"),
    ("data.synthetic.defect_rate=1", "data.synthetic.defect_rate", "data.synthetic.defect_rate=0.99"),
    ("data.logs.vocab_size=0", "data.logs.vocab_size", "data.logs.vocab_size=1"),
    ("data.logs.min_support=0", "data.logs.min_support", "data.logs.min_support=1"),
    ("data.ratings.width=0", "data.ratings.width", "data.ratings.width=1"),
    ("data.jdbc.table=t data.jdbc.query=q", "data.jdbc.query", "data.jdbc.table= data.jdbc.query=q"),
    ("data.jdbc.num_partitions=0", "data.jdbc.num_partitions", "data.jdbc.num_partitions=1"),
    ("data.jdbc.partition_column=id data.jdbc.upper_bound=0", "data.jdbc.upper_bound",
     "data.jdbc.partition_column=id data.jdbc.upper_bound=1"),
    ("data.jdbc.url=jdbc:postgresql://u:pw@h/db", "data.jdbc.url", "data.jdbc.url=jdbc:postgresql://h/db"),
    ("data.text.vocab_size=0", "data.text.vocab_size", "data.text.vocab_size=1"),
    ("data.text.min_df=0", "data.text.min_df", "data.text.min_df=0.01"),
    ("data.text.min_token_length=0", "data.text.min_token_length", "data.text.min_token_length=1"),
    ("data.text.encoding=klingon", "data.text.encoding", "data.text.encoding=latin-1"),
    ("data.table.format=xls", "data.table.format", "data.table.format=orc"),
    ("data.table.id_column=", "data.table.id_column", "data.table.id_column=x"),
    ("data.events.top_k=0", "data.events.top_k", "data.events.top_k=1"),
    ("data.events.min_support=0", "data.events.min_support", "data.events.min_support=1"),
    ("data.events.bm25_k1=-0.1", "data.events.bm25_k1", "data.events.bm25_k1=0"),
    ("data.events.bm25_b=1.1", "data.events.bm25_b", "data.events.bm25_b=1"),
    ("publish.keep=0", "publish.keep", "publish.keep=1"),
    ("infer.k=0", "infer.k", "infer.k=1"),
    ("infer.layer=0", "infer.layer", "infer.layer=1"),
    ("infer.layer=-2", "infer.layer", "infer.layer=-1"),
    *[(f"infer.{k}=0", f"infer.{k}", f"infer.{k}=1")
      for k in ("exact_max_items", "batch_size", "tile_items", "lsh_tables", "lsh_bucket_items")],
    *[(f"infer.{k}=-1", f"infer.{k}", f"infer.{k}=0") for k in ("torch_threads", "recall_sample", "map_max_points")],
    ("nightly.date=tomorrow", "nightly.date", "nightly.date=2026-11-30"),
    ("nightly.margin=1", "nightly.margin", "nightly.margin=0"),
    *[(f"nightly.{k}=0", f"nightly.{k}", f"nightly.{k}=1")
      for k in ("align_max_items", "baseline_max_items", "lock_stale_after_s")],
]


@pytest.mark.parametrize(("bad", "key", "edge"), RANGE_CHECKS, ids=[c[0] for c in RANGE_CHECKS])
def test_each_range_check_names_its_key_and_accepts_its_edge(bad, key, edge):
    with pytest.raises(ConfigError) as exc:
        load_config(None, bad.split(" "))
    message = str(exc.value)
    assert message.startswith(f"{key}: ") and "\n" not in message, message
    load_config(None, edge.split(" "))  # the value at the edge of the range is valid


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("finetune.perplexity=0", "finetune.perplexity: must be > 0, got 0"),
        ("train.val_fraction=1.5", "train.val_fraction: must be < 1, got 1.5"),
        ("model.layers=[784,0,2]", "model.layers[1]: must be >= 1, got 0"),
        ("train.seed=true", "train.seed: expected an integer, got True"),  # pydantic alone would read 1
        ("pretrain.lr=yes", "pretrain.lr: expected a number, got True"),
        ("train.progress=maybe", "train.progress: expected true or false, got 'maybe'"),
        ("spark=3", "spark: expected a mapping of settings, got 3"),
        ("evaluate.max_items=20", "evaluate.max_items: must exceed 2 * evaluate.k_tw = 24, got 20"),
    ],
)
def test_error_lines_read_as_before(bad, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [bad])
    assert str(exc.value) == message


def test_unknown_nested_key_is_named_in_full(tmp_path):
    with pytest.raises(ConfigError, match=r"^override 'train.distributed.num_procs=2': unknown config key "
                                          r"'train.distributed.num_procs'; known keys here: \['local_mode', 'num_processes'"):
        load_config(None, ["train.distributed.num_procs=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  synthetic:\n    itemz: 5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'data.synthetic.itemz'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"^unknown config key 'train.distributed.num_procs'"):
        DistributedConfig(num_procs=2)


def test_a_later_layer_may_fix_an_earlier_layers_value(tmp_path):
    """Values are checked once the layers are merged: a file's min_dist beyond 3 * spread is fine when
    an override widens the spread."""
    f = tmp_path / "c.yaml"
    f.write_text("finetune:\n  min_dist: 4.0\n")
    with pytest.raises(ConfigError, match="^finetune.min_dist: "):
        load_config(f)
    assert load_config(f, ["finetune.spread=2"]).finetune.min_dist == 4.0


def test_sections_stay_frozen_dataclasses_validated_on_replace():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.val_fraction = 0.5  # type: ignore[misc]
    assert dataclasses.replace(cfg.finetune, perplexity=5).perplexity == 5.0
    with pytest.raises(ConfigError, match=r"^finetune.perplexity: must be > 0, got -1$"):
        dataclasses.replace(cfg.finetune, perplexity=-1)
    with pytest.raises(ConfigError, match=r"^finetune.min_dist: "):
        FinetuneConfig(min_dist=3.0)


def test_yaml_scalars_in_text_fields_keep_their_text(tmp_path):
    """YAML reads these as a date, a number and a boolean; text settings keep them as text, as str() did."""
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  since: 2024-01-31\nspark:\n  driver_memory: 4\n  conf:\n    spark.sql.ansi.enabled: false\n")
    cfg = load_config(f)
    assert (cfg.data.since, cfg.spark.driver_memory, cfg.spark.conf) == ("2024-01-31", "4", {"spark.sql.ansi.enabled": "False"})
    assert isinstance(load_config(None, ["pretrain.lr=1"]).pretrain.lr, float)  # an int in a float field hashes as before


def test_cli_prints_one_config_error_line_and_exits_2(capsys, tmp_path):
    from jobs import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["train", f"paths.root={tmp_path / 'root'}", "train.distributed.timeout_s=0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "config error: train.distributed.timeout_s: must be >= 1, got 0\n"
    assert not (tmp_path / "root").exists()


def _write_golden() -> None:
    out = {}
    for file in ("base", "local.yaml", "cluster.yaml"):
        for preset in ("-", *presets()):
            if file == "cluster.yaml" and preset != "-":
                continue
            name = f"{file}+{preset}"
            cfg = _load(name)
            out[name] = {"hash": cfg.hash(), "resume_fingerprint": cfg.resume_fingerprint()}
            if file == "base" or preset == "-":
                out[name]["to_dict"] = cfg.to_dict()
    GOLDEN.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in out.items()) + "\n}\n")


if __name__ == "__main__":
    _write_golden()
    sys.exit(0)
