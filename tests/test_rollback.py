"""Rollback restores a consistent pair: @previous's model and the codes/neighbours it published.

Three nights (promote v1, promote v2, reject v3 and republish v2) run the nightly's real publish
step, retention and rollback against a real MLflow registry (sqlite); only the scoring itself is
replaced by a stub (and Spark by a stand-in naming a local master) that writes ``codes/`` (carrying ``model_version``) and ``neighbors/`` through
the real ``predict_batch`` contract (``publishing`` with the options it is given). ``publish.keep=2``
so that, without the protection of @champion's and @previous's tables, v1's codes would be gone by
night 3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from pipelines.publish import history, pin, publishing, version_path

NAMES = ["a", "b", "c"]


SPARK = SimpleNamespace(sparkContext=SimpleNamespace(master="local[1]"))  # read, never used to compute


@pytest.fixture
def stub_scoring(monkeypatch):
    from pipelines import inference
    from sae_model import registry
    from sae_model.registry import ResolvedModel

    def resolve_model(uri, *a, **k):
        return ResolvedModel(uri=uri, run_id=None, version=uri.rsplit("/", 1)[1])

    def predict_batch(spark, model, root, infer, log_maps=True, alignment=None, publish=None, ingest=None, split=None):
        opts = dict(publish or {})
        meta = {**opts.pop("meta", {}), "model_version": model.version}
        with publishing(root, ["codes", "neighbors"], spark, meta=meta, **opts) as pub:
            for t in ("codes", "neighbors"):
                Path(pub.staging(t)).mkdir()
            codes = {"item_id": [1, 2], "code": [[0.0, 1.0], [1.0, 0.0]], "model_version": [model.version] * 2}
            pq.write_table(pa.table(codes), f"{pub.path}/codes/part-0.parquet")
            pq.write_table(pa.table({"item_id": [1], "neighbor_id": [2]}), f"{pub.path}/neighbors/part-0.parquet")
        return {"scores_version": pub.version, "items": 2, "method": "exact"}

    monkeypatch.setattr(registry, "resolve_model", resolve_model)  # the one resolver, imported at call time
    monkeypatch.setattr(inference, "predict_batch", predict_batch)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """A registry with versions 1..3 of ``sae``, made once (a new sqlite store migrates for seconds)."""
    import mlflow

    from pipelines.nightly import FEATURES_TAG, _names_sha

    db = tmp_path_factory.mktemp("registry") / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    client.create_registered_model("sae")
    for v in range(3):
        client.create_model_version("sae", source=str(db.parent / f"model{v}"))
        client.set_model_version_tag("sae", str(v + 1), FEATURES_TAG, _names_sha(NAMES))
    return db


def three_nights(root: Path, registry: Path):
    """Nights 1 and 2 promote v1 and v2; night 3 keeps v2 (v3 rejected). Returns the config."""
    import mlflow

    from pipelines.nightly import NightState, step_publish

    cfg = load_config(None, [f"paths.root={root}", "publish.keep=2", "nightly.align=false", "mlflow.registered_model=sae"])
    shutil.copy(registry, root / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    with publishing(str(root), ["features", "items", "quarantine"]) as pub:  # the ingest set the models fit
        for t in ("features", "items", "quarantine"):
            Path(pub.staging(t)).mkdir()
        Path(pub.path, "features", "_manifest.json").write_text(json.dumps({"feature_names": NAMES}))
    for date, (promoted, serving) in zip(["d1", "d2", "d3"], [(True, "1"), (True, "2"), (False, "2")], strict=True):
        state = NightState(path=root / f"{date}.json", date=date)
        state.results["promote"] = {"promoted": promoted, "serving_version": serving}
        step_publish(SPARK, cfg, state)
    return cfg


def codes_versions(root: str) -> set[str]:
    return set(pq.read_table(pin(root, "scores").path("codes"))["model_version"].to_pylist())


def champion(alias: str = "champion") -> str:
    import mlflow

    return str(mlflow.MlflowClient().get_model_version_by_alias("sae", alias).version)


def test_rollback_after_promote_promote_reject_restores_v1_and_its_codes(tmp_path, registry, stub_scoring):
    from jobs import rollback

    cfg = three_nights(tmp_path, registry)
    events = history(str(tmp_path), "scores")
    assert [e["model_version"] for e in events] == ["1", "2", "2"]
    assert champion() == "2" and champion("previous") == "1" and codes_versions(str(tmp_path)) == {"2"}
    out = rollback.run(cfg)
    assert out["champion"] == "1" and out["rolled_back_from"] == "2" and out["rescored"] is False
    assert champion() == "1" and champion("previous") == "2"
    assert codes_versions(str(tmp_path)) == {"1"}  # the codes carry the restored champion's version
    assert out["scores_version"] == events[0]["version"]  # night 1's own tables, kept by protection
    assert set(pq.read_table(tmp_path / "codes")["model_version"].to_pylist()) == {"1"}  # the links follow
    assert history(str(tmp_path), "scores")[-1]["event"] == "rollback"


def test_rollback_without_its_tables_rescores_or_refuses(tmp_path, registry, stub_scoring):
    from pipelines.nightly import NightlyError, rollback_champion

    cfg = three_nights(tmp_path, registry)
    night1 = history(str(tmp_path), "scores")[0]["version"]
    shutil.rmtree(version_path(str(tmp_path), "scores", night1))  # v1's tables are gone
    with pytest.raises(NightlyError, match="version 1 published are gone .*needs a SparkSession"):
        rollback_champion(cfg)
    assert champion() == "2" and codes_versions(str(tmp_path)) == {"2"}  # refused: nothing changed

    import mlflow

    mlflow.MlflowClient().set_model_version_tag("sae", "1", "feature_names_sha", "another-set")
    with pytest.raises(NightlyError, match="trained on another feature set"):
        rollback_champion(cfg, SPARK)
    assert champion() == "2" and codes_versions(str(tmp_path)) == {"2"}

    mlflow.MlflowClient().delete_model_version_tag("sae", "1", "feature_names_sha")
    out = rollback_champion(cfg, SPARK)
    assert out["rescored"] is True and champion() == "1" and codes_versions(str(tmp_path)) == {"1"}
