"""`sae sweep`: pure expansion of grids and random searches, and a tiny real sweep in MLflow."""

from __future__ import annotations

import math
import random

import mlflow
import numpy as np
import pytest

from jobs import sweep
from pipelines.config import ConfigError
from pipelines.sweep import (
    Range,
    best_trial,
    grid_trials,
    parse_grid,
    parse_ranges,
    random_trials,
    split_values,
)
from tests.train_data import manifold, write_features

pytestmark = pytest.mark.usefixtures("one_thread", "mlflow_reset")


def test_values_split_on_top_level_commas_only():
    assert split_values("rbm,autoencoder, none") == ["rbm", "autoencoder", "none"]
    assert split_values("[784,256,2],[784,64,2]") == ["[784,256,2]", "[784,64,2]"]
    with pytest.raises(ConfigError, match="unbalanced"):
        split_values("[784,256")
    with pytest.raises(ConfigError, match="empty value"):
        split_values("a,,b")


def test_grid_is_every_combination_in_order():
    g = parse_grid(["pretrain.method=rbm,none", "model.layers=[784,256,2],[784,2]", "finetune.lr=0.1"])
    assert grid_trials(g) == [
        ["pretrain.method=rbm", "model.layers=[784,256,2]", "finetune.lr=0.1"],
        ["pretrain.method=rbm", "model.layers=[784,2]", "finetune.lr=0.1"],
        ["pretrain.method=none", "model.layers=[784,256,2]", "finetune.lr=0.1"],
        ["pretrain.method=none", "model.layers=[784,2]", "finetune.lr=0.1"],
    ]
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["a.b=1", "a.b=2"])
    with pytest.raises(ConfigError, match="expected dotted.key=VALUES"):
        parse_grid(["pretrain.method"])


def test_random_search_is_seeded_and_stays_in_its_ranges():
    r = parse_ranges(["finetune.lr=0.001:0.1:log", "finetune.epochs=2:8", "train.seed=0.5:1.5"])
    assert r["finetune.lr"] == Range(0.001, 0.1, log=True, integer=False)
    assert r["finetune.epochs"].integer and not r["train.seed"].integer
    choices = {"pretrain.method": ["rbm", "autoencoder", "none"]}
    a = random_trials(50, choices, r, seed=3)
    assert a == random_trials(50, choices, r, seed=3) and a != random_trials(50, choices, r, seed=4)
    vals = [dict(o.split("=", 1) for o in t) for t in a]
    lrs = [float(v["finetune.lr"]) for v in vals]
    assert all(0.001 <= x <= 0.1 for x in lrs)
    # log-uniform: about half the draws below the geometric middle 0.01 (binomial sd ~3.5 of 50)
    assert 15 <= sum(x < 0.01 for x in lrs) <= 35
    assert {int(v["finetune.epochs"]) for v in vals} <= set(range(2, 9))
    assert {v["pretrain.method"] for v in vals} == {"rbm", "autoencoder", "none"}
    assert Range(1, 3, integer=True).draw(random.Random(0)) in (1, 2, 3)
    for bad in ("finetune.lr=0.1:0.01", "finetune.lr=0:1:log", "finetune.lr=a:b", "finetune.lr=1"):
        with pytest.raises(ConfigError, match="--range"):
            parse_ranges([bad])
    with pytest.raises(ConfigError, match="both as --grid choices and as --range"):
        random_trials(2, {"finetune.lr": ["0.1"]}, {"finetune.lr": Range(0.1, 1)}, 0)


def test_best_trial_by_min_or_max_skips_failed_trials():
    scores = [0.5, None, float("nan"), 0.9, 0.9, 0.1]
    assert best_trial(scores, "max") == 3  # first of the tied best
    assert best_trial(scores, "min") == 5
    assert best_trial([None, math.nan], "max") is None


def test_expand_checks_the_flags():
    assert sweep.expand(["pretrain.method=rbm,none"], [], 0, 0) == [["pretrain.method=rbm"], ["pretrain.method=none"]]
    assert len(sweep.expand(["pretrain.method=rbm,none"], ["finetune.lr=0.01:0.1"], 5, 1)) == 5
    with pytest.raises(ConfigError, match="--range needs --random"):
        sweep.expand([], ["finetune.lr=0.01:0.1"], 0, 0)
    with pytest.raises(ConfigError, match="paths.\\* and mlflow.\\*"):
        sweep.expand(["paths.root=a,b"], [], 0, 0)
    with pytest.raises(ConfigError, match="nothing to sweep"):
        sweep.expand([], [], 0, 0)


def test_a_bad_key_fails_before_any_trial_trains(tmp_path):
    calls = []
    with pytest.raises(ConfigError, match=r"model.layerz=\[8,2\]': unknown config key"):
        sweep.run(None, None, [f"paths.root={tmp_path}"], [["model.layers=[8,2]"], ["model.layerz=[8,2]"]],
                  "m", train_fn=lambda cfg, extra_tags: calls.append(cfg))
    assert calls == []


def test_tiny_grid_makes_child_runs_under_a_parent_and_picks_the_best(tmp_path, capsys):
    x, labels = manifold(300, 16, seed=5)
    write_features(tmp_path, x, labels)
    rc = sweep.main([
        f"paths.root={tmp_path}", "pretrain.method=none", "finetune.epochs=2", "finetune.batch_size=20", "finetune.optimizer=adam",
        "train.progress=false", "train.val_fraction=0.3", "evaluate.k_tw=5", "mlflow.registered_model=must-not-register",
        "--grid", "model.layers=[16,8,2]", "--grid", "finetune.lr=0.01,0.0001",
        "--metric", "ae_squared_error", "--mode", "min", "--name", "tiny",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("sae")
    parent = client.search_runs([exp.experiment_id], "tags.stage = 'sweep'")[0]
    assert parent.info.run_name == "tiny" and parent.info.status == "FINISHED"
    assert parent.data.params["sweep.metric"] == "ae_squared_error" and parent.data.params["sweep.trials"] == "2"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    got = sorted((c.data.params["model.layers"], c.data.params["finetune.lr"]) for c in children)
    assert got == [("[16, 8, 2]", "0.0001"), ("[16, 8, 2]", "0.01")]
    # The best child by the children's own logged metric, and the parent says the same.
    best = min(children, key=lambda c: c.data.metrics["ae_squared_error"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_ae_squared_error"] == pytest.approx(best.data.metrics["ae_squared_error"])
    assert parent.data.tags["best_overrides"] == best.data.tags["sweep.overrides"]
    assert f"(run {best.info.run_id})" in printed
    assert len(client.get_metric_history(parent.info.run_id, "trial/ae_squared_error")) == 2
    # The lr 1e-4 trials barely move from init: the sweep must not pick one of them.
    assert best.data.params["finetune.lr"] == "0.01"
    assert client.search_registered_models() == []  # trials are not registered by default


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    from sae_model.trainer import TrainingDiverged

    def fake(cfg, extra_tags):
        if cfg.finetune.lr > 1:
            raise TrainingDiverged("diverged")
        return {"run_id": f"r{cfg.finetune.lr}", "metrics": {"m": -abs(np.log10(cfg.finetune.lr) + 2)}}

    out = sweep.run(None, None, [f"paths.root={tmp_path}"], [[f"finetune.lr={v}"] for v in (0.1, 100, 0.01, 0.001)],
                    "m", "max", train_fn=fake)
    assert [t["status"][:6] for t in out["trials"]] == ["ok", "failed", "ok", "ok"]
    assert out["best"] == 2
    assert "best: trial 2 finetune.lr=0.01" in sweep.format_results(out)
