import mlflow
import numpy as np
import torch

from sae_model.loading import Encoder, load_encoder, log_model
from sae_model.model import StackedAutoencoder


def test_logged_model_loads_by_run_and_alias(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("t")
    torch.manual_seed(1)
    model = StackedAutoencoder([8, 4, 2])
    x = np.random.default_rng(1).random((5, 8), dtype=np.float32)
    with mlflow.start_run() as run:
        info = log_model(model, registered_model_name="sae-test", input_example=x[:2])
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("sae-test", "champion", info.registered_model_version)
    want = Encoder(model).encode(x)
    for uri in (info.model_uri, f"runs:/{run.info.run_id}/model", "models:/sae-test@champion"):
        np.testing.assert_array_equal(load_encoder(uri).encode(x), want)
    # The pyfunc flavour gives the same codes (what mlflow.pyfunc.spark_udf would call).
    np.testing.assert_allclose(mlflow.pyfunc.load_model(info.model_uri).predict(x), want, atol=1e-6)
    mlflow.set_tracking_uri("")


def test_logged_requirements_are_the_installed_versions(tmp_path, mlflow_reset):
    from importlib.metadata import version
    from pathlib import Path

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("requirements")
    with mlflow.start_run():
        info = log_model(StackedAutoencoder([8, 4, 2]))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(tmp_path / "m")))
    lines = (local / "requirements.txt").read_text(encoding="utf-8").split()
    # What MLflow's inference found for this pyfunc, stated without its import subprocess.
    assert lines == [f"{d}=={version(d)}" for d in ("mlflow", "cloudpickle", "numpy", "sae-maps")]
