"""`spark-submit jobs/infer.py` on local Spark publishes codes/, neighbors/ and the maps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from sae_model.loading import Encoder
from tests.infer_data import log_test_model, write_inputs

pytestmark = pytest.mark.slow


def test_spark_submit_infer_publishes_tables_and_maps(tmp_path):
    import pyspark

    root = tmp_path / "root"
    x = write_inputs(root, n=400, dim=24)
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    model, info = log_test_model(tracking, [24, 16, 8, 2])
    mlflow.set_tracking_uri("")
    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    cmd = [
        str(submit), "--master", "local[2]", "--driver-memory", "1g", "jobs/infer.py",
        f"paths.root={root}", f"mlflow.tracking_uri={tracking}", "infer.k=5",
        "spark.conf.spark.ui.enabled=false", "infer.map_max_points=1000",
    ]
    out = subprocess.run(cmd, check=False, cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mlflow ui --backend-store-uri" in out.stdout

    codes = pq.read_table(root / "codes").to_pandas().sort_values("item_id")
    assert len(codes) == 400 and set(codes.model_uri) == {f"models:/sae/{info.registered_model_version}"}
    assert set(codes.run_id) == {info.run_id}
    got = np.stack(codes.code.to_numpy()).astype(np.float32)
    np.testing.assert_allclose(got, Encoder(model).encode(x), atol=1e-5)
    np.testing.assert_allclose(codes.x, got[:, 0])
    nb = pq.read_table(root / "neighbors").to_pandas()
    assert len(nb) == 400 * 5 and nb.groupby("item_id")["rank"].agg(lambda r: sorted(r) == [1, 2, 3, 4, 5]).all()
    assert (nb.item_id != nb.neighbor_id).all()
    for name in ("map.png", "map.html"):
        assert (root / "maps" / name).stat().st_size > 1000
    page = (root / "maps" / "map.html").read_text()
    assert "Toy Story (1995)" in page and "<script src" not in page  # data embedded, nothing fetched
    arts = mlflow.MlflowClient(tracking).list_artifacts(info.run_id, "maps")
    assert sorted(Path(a.path).name for a in arts) == ["map.html", "map.png"]

    # `sae neighbors` reads the published tables: ambiguous titles list candidates.
    from jobs.neighbors import lookup

    assert lookup(str(root), "toy story") == 1
    assert lookup(str(root), "Toy Story 2", k=3) == 0
