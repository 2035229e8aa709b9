"""Training health (issue 22 item 2, issue 16 kind 10): a collapsed or dead run is never published silently."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from sae_model import health
from sae_model.config import FinetuneConfig, ModelConfig, PretrainConfig, TrainConfig
from sae_model.trainer import MlflowSettings, train
from tests.train_data import manifold, write_features

pytestmark = pytest.mark.usefixtures("one_thread", "mlflow_reset")  # conftest's shared fixtures


def test_collapsed_codes_are_found_and_spread_codes_pass():
    rng = np.random.default_rng(0)
    # The talk's settings on the real slice: 177 movies within sd 0.00017 of (-75.02, 68.98).
    collapsed = np.array([-75.02, 68.98]) + rng.normal(0, 0.00017, (177, 2))
    v = health.check_codes(collapsed)
    assert [f.measure for f in v.findings] == ["code_spread", "shared_code"]
    assert v.measures["code_relative_spread"] == pytest.approx(0.00024 / 101.9, rel=0.2)
    assert "finetune.lr" in v.findings[0].keys and "pretrain.lr" in v.findings[0].keys
    spread = rng.normal(3.0, 1.0, (177, 2))
    assert health.check_codes(spread).ok
    # Saturated sigmoid codes: 60 % of the items on (1, 0), the rest spread.
    sat = np.vstack([np.tile([1.0, 0.0], (60, 1)), rng.uniform(0, 1, (40, 2))])
    v = health.check_codes(sat)
    assert [f.measure for f in v.findings] == ["shared_code"] and v.measures["shared_code_share"] == pytest.approx(0.6)


def test_a_loss_that_never_moved_is_flagged():
    flat = [{"stage_name": "finetune", "train_loss": 0.149209, "val_loss": 0.150363} for _ in range(75)]
    v = health.check_history(flat)
    assert [(f.stage, f.measure) for f in v.findings] == [("finetune", "loss_unmoved")]
    assert "finetune.lr" in v.findings[0].message()
    moving = [{"stage_name": "finetune", "train_loss": 0.15 - 0.001 * e, "val_loss": 0.15 - 0.001 * e} for e in range(5)]
    assert health.check_history(moving).ok
    assert not health.loss_unmoved([0.2, 0.2])  # two epochs say nothing yet


def test_pretraining_that_explodes_stops_naming_the_layer_and_pretrain_lr(tmp_path):
    x, labels = manifold(300, 32, seed=3)
    write_features(tmp_path, x, labels)
    with pytest.raises(health.UnhealthyTraining, match=r"pretrain/layer0: loss_worse_than_mean .*try pretrain\.lr") as exc:
        train(
            ModelConfig(layers=[32, 16, 2]),
            PretrainConfig(method="autoencoder", epochs=2, lr=1e38, momentum=0.0, batch_size=20),
            FinetuneConfig(epochs=2, lr=1.0, batch_size=20),
            TrainConfig(seed=1, progress=False),
            "file://" + str(tmp_path / "features"), None, MlflowSettings("", enabled=False), tmp_path / "ck",
        )
    assert "finetune.lr" not in str(exc.value)


@pytest.fixture(scope="module")
def saturated(tmp_path_factory):
    """A root whose only model saturated in training: (root, training result, tracking URI)."""
    tmp = tmp_path_factory.mktemp("saturated")
    root = tmp / "root"
    x, labels = manifold(300, 32, seed=3)
    write_features(root, x, labels)
    db = f"sqlite:///{root}/mlflow.db"
    # Sigmoid code units and an absurd step: every code saturates onto one corner of the square.
    result = train(
        ModelConfig(layers=[32, 16, 2], code_activation="sigmoid"),
        PretrainConfig(method="none"),
        FinetuneConfig(epochs=3, lr=1e10, momentum=0.0, batch_size=20),
        TrainConfig(seed=1, progress=False),
        "file://" + str(root / "features"), None, MlflowSettings(db, "sae", "sae"), tmp / "ck",
    )
    return root, result, db


def test_a_saturated_model_is_not_registered_and_infer_refuses_it(saturated, capsys):
    from jobs import cli

    root, result, db = saturated
    assert result.health == "unhealthy" and result.model_version is None
    assert any("shared_code 1 " in f for f in result.health_findings)
    mlflow.set_tracking_uri(db)
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.tags[health.HEALTH_TAG] == "unhealthy" and "finetune.lr" in run.data.tags[health.FINDINGS_TAG]
    assert run.data.metrics["health/shared_code_share"] == 1.0
    assert client.search_registered_models() == []  # nothing registered, nothing to promote

    argv = ["infer", f"paths.root={root}", "--config", "conf/local.yaml", "infer.k=3"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "marked unhealthy" in err and "--force" in err
    assert not (root / "codes").exists() and not (root / "neighbors").exists()


@pytest.mark.slow  # a whole inference run
def test_a_saturated_model_is_published_when_forced(spark, saturated):
    from jobs import cli

    root, _, _ = saturated
    assert cli.main(["infer", f"paths.root={root}", "--config", "conf/local.yaml", "infer.k=3", "--force"]) == 0
    assert (root / "codes").exists()
