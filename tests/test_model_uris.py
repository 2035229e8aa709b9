"""Kinds 5 and 6 of the bad-input contract: model URIs that don't resolve, and stores that move.

Cases ``mlflow-alias-missing`` and ``mlflow-store-moved``. One resolver (``sae_model.registry``)
serves every command, so its one-line errors hold for ``sae infer``, ``sae evaluate`` and nightly.
"""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pytest
import torch

from jobs.cli import main
from pipelines.config import load_config, tracking_uri
from sae_model import tracking
from sae_model.loading import Encoder, load_encoder, log_model
from sae_model.model import StackedAutoencoder
from sae_model.registry import ModelURIError, resolve_model


def _store(root) -> tuple[str, list]:
    """paths.root=root with the pipeline's own sqlite store: model 'sae' versions 1 and 2, @champion -> 2."""
    uri = tracking_uri(load_config(None, [f"paths.root={root}"]))
    tracking.use_experiment("sae", uri)
    infos = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with mlflow.start_run():
            infos.append(log_model(StackedAutoencoder([6, 4, 2]), registered_model_name="sae"))
    mlflow.MlflowClient().set_registered_model_alias("sae", "champion", "2")
    return uri, infos


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base") / "a"
    _, infos = _store(root)
    mlflow.set_tracking_uri("")
    return root, infos


@pytest.fixture
def store(tmp_path, base):
    """A copy of the base paths.root at tmp_path/a (itself a copied store, repointed on first use)."""
    shutil.copytree(base[0], tmp_path / "a", symlinks=True)
    uri = tracking_uri(load_config(None, [f"paths.root={tmp_path / 'a'}"]))
    mlflow.set_tracking_uri(uri)
    yield tmp_path, uri, base[1]
    mlflow.set_tracking_uri("")


@pytest.mark.parametrize(
    "uri, message",
    [
        ("models:/sae@prod", "model URI models:/sae@prod: no alias 'prod'; model 'sae' has versions: 1, 2; aliases: champion -> 2"),
        ("models:/sae/7", "model URI models:/sae/7: no version '7'; model 'sae' has versions: 1, 2; aliases: champion -> 2"),
        ("models:/sea@champion", "model URI models:/sea@champion: no registered model 'sea' (registered models: sae)"),
        ("models:/sea/1", "model URI models:/sea/1: no registered model 'sea' (registered models: sae)"),
        ("runs:/0123456789abcdef/model", "model URI runs:/0123456789abcdef/model: no run '0123456789abcdef' in the tracking store"),
        ("models:/m-0123", "model URI models:/m-0123: no logged model 'm-0123'"),
    ],
)
def test_unresolvable_uri_lists_what_exists(store, uri, message):
    with pytest.raises(ModelURIError) as err:
        resolve_model(uri)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_alias_and_version_pin_the_same_model(store):
    _, _, infos = store
    by_alias, by_version = resolve_model("models:/sae@champion"), resolve_model("models:/sae/2")
    assert by_alias.uri == "models:/sae/2" and by_alias.version == by_version.version == "2"
    assert by_alias.run_id == by_version.run_id == infos[1].run_id


@pytest.mark.parametrize("command", ["evaluate", "infer"])
def test_cli_gives_one_line_and_exit_2(store, capsys, command):
    tmp, _, _ = store
    code = main([command, f"paths.root={tmp / 'a'}", "infer.model_uri=models:/sae@prod"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == "error: model URI models:/sae@prod: no alias 'prod'; model 'sae' has versions: 1, 2; aliases: champion -> 2"
    assert not any("Traceback" in line for line in err)


def test_a_moved_root_scores_and_logs_in_its_new_place(store):
    tmp, _, infos = store
    x = np.random.default_rng(0).random((5, 6), dtype=np.float32)
    want = load_encoder(infos[1].model_uri).encode(x)
    shutil.move(tmp / "a", tmp / "b")
    new_uri = tracking_uri(load_config(None, [f"paths.root={tmp / 'b'}"]))
    mlflow.set_tracking_uri(new_uri)
    r = resolve_model("models:/sae@champion", download_to=str(tmp / "dl"))
    np.testing.assert_array_equal(Encoder(load_encoder(r.local_dir).model).encode(x), want)
    # New runs write their artefacts into the moved store, not the old (gone) folder.
    tracking.use_experiment("sae", new_uri)
    with mlflow.start_run() as run:
        mlflow.log_text("x", "note.txt")
    assert run.info.artifact_uri.startswith((tmp / "b" / "mlartifacts").as_uri())
    assert (tmp / "b" / "mlartifacts" / run.info.run_id / "artifacts" / "note.txt").exists()
    assert not (tmp / "a").exists()
    # Rolling back is an alias switch in the moved store; the previous version loads from b/ too.
    mlflow.MlflowClient().set_registered_model_alias("sae", "champion", "1")
    r1 = resolve_model("models:/sae@champion", download_to=str(tmp / "dl1"))
    assert r1.version == "1" and str(tmp / "dl1") in r1.local_dir


def test_a_store_moved_without_its_artefacts_names_where_they_were(store, caplog):
    tmp, _, _ = store
    (tmp / "b").mkdir()
    shutil.move(tmp / "a" / "mlflow.db", tmp / "b" / "mlflow.db")
    shutil.rmtree(tmp / "a")
    with caplog.at_level("WARNING", logger="sae_model.tracking"):
        mlflow.set_tracking_uri(tracking_uri(load_config(None, [f"paths.root={tmp / 'b'}"])))
    assert f"its artefacts were in {tmp / 'a' / 'mlartifacts'}, which no longer exists" in caplog.text
    assert f"copied to {tmp / 'b' / 'mlartifacts'}" in caplog.text
    with pytest.raises(ModelURIError, match=r"no saved autoencoder among its artefacts at .*copy that folder beside mlflow.db"):
        resolve_model("models:/sae@champion", download_to=str(tmp / "dl"))


def test_paths_with_hash_space_percent_and_non_ascii_keep_one_store(tmp_path):
    root = tmp_path / "run #1 100% ü;x"
    uri, infos = _store(root)
    try:
        assert tracking.sqlite_path(uri) == root / "mlflow.db" and (root / "mlflow.db").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]  # nothing cut at '#' or '%'
        assert resolve_model("models:/sae@champion").run_id == infos[1].run_id
    finally:
        mlflow.set_tracking_uri("")


@pytest.mark.parametrize("name", ["run #1", "a?b", "100%41", "100% ü;x", "plain"])
def test_sqlite_uri_round_trips_as_sqlalchemy_reads_it(tmp_path, name):
    from sqlalchemy.engine import make_url

    uri = tracking.sqlite_uri(tmp_path / name / "mlflow.db")
    assert make_url(uri).database == str(tmp_path / name / "mlflow.db") == str(tracking.sqlite_path(uri))
