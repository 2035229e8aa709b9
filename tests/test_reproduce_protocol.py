"""benchmarks/reproduce_protocol.py end to end with --quick on a tiny idx dataset (issue 19)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.sources.mnist import IMAGES_MAGIC, LABELS_MAGIC, parse_idx
from sae_model.idx import write_idx
from tests.conftest import ROOT, load_file

N_TRAIN, N_TEST = 300, 100


def tiny_idx(folder: Path) -> Path:
    """400 real MNIST test images (data/mnist) in the idx layout: the first 300 as the training split
    (gzipped), the next 100 as the test split (plain files)."""
    images = parse_idx(ROOT / "data/mnist/t10k-images-idx3-ubyte.gz", IMAGES_MAGIC, 3)
    labels = parse_idx(ROOT / "data/mnist/t10k-labels-idx1-ubyte.gz", LABELS_MAGIC, 1)
    write_idx(folder / "train-images-idx3-ubyte.gz", images[:N_TRAIN])
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[:N_TRAIN])
    write_idx(folder / "t10k-images-idx3-ubyte", images[N_TRAIN : N_TRAIN + N_TEST])
    write_idx(folder / "t10k-labels-idx1-ubyte", labels[N_TRAIN : N_TRAIN + N_TEST])
    return folder


def test_write_idx_reads_back(tmp_path):
    x = (np.arange(2 * 28 * 28) * 7 % 256).astype(np.uint8).reshape(2, 28, 28)
    for name in ("a-images-idx3-ubyte", "a-images-idx3-ubyte.gz"):
        assert (parse_idx(write_idx(tmp_path / name, x), IMAGES_MAGIC, 3) == x).all()


def test_a_folder_without_both_splits_is_an_input_error(tmp_path, capsys):
    script = load_file("benchmarks/reproduce_protocol.py")
    data = tmp_path / "only-test"
    write_idx(data / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(data / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(SystemExit) as exit_:
        script.main(["--data", str(data), "--quick", "--root", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"input error: {data}: expected train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz] with their "
        "labels files, found the splits ['test']")
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


@pytest.mark.slow
def test_quick_protocol_on_a_tiny_idx_folder(tmp_path):
    data = tiny_idx(tmp_path / "tiny-digits")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/reproduce_protocol.py"), "--data", str(data), "--quick",
         "--root", str(out), "evaluate.umap=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "protocol.json").read_text())
    # ingest, then the 30-D and the 2-D presets, each printed as a command with its seconds.
    assert [c["argv"][1:3] for c in doc["commands"]] == [["ingest", "data.source=mnist"], ["train", "--preset"],
                                                          ["train", "--preset"]]
    for c in doc["commands"]:
        assert c["command"] in proc.stdout and c["seconds"] > 0
    assert all("train.split_column=split" in c["argv"] for c in doc["commands"][1:])
    assert [r["code"] for r in doc["runs"]] == [30, 2]
    for run in doc["runs"]:
        assert run["metrics"]["n_test"] == N_TEST  # every test image scored, none trained on
        assert 0.8 * N_TRAIN <= run["metrics"]["n_train"] <= N_TRAIN
    ours = {(r["code"], r["kind"]): r["ours"] for r in doc["rows"] if r["kind"] != "published"}
    for code in (30, 2):
        for method in ("ae", "pca"):
            row = ours[(code, method)]
            assert row["squared_error"] > 0 and math.isfinite(row["squared_error"]), row
            for k in ("knn_accuracy", "knn1_accuracy", "trustworthiness", "trustworthiness_train", "continuity"):
                assert 0.0 <= row[k] <= 1.0, (code, method, k, row)
        # PCA fitted on 300 real digits separates them far above the 0.1 of chance (measured 0.81 / 0.50).
        assert ours[(code, "pca")]["knn_accuracy"] > 0.35
    table = (out / "protocol.md").read_text()
    assert f"`{data}`" in table and "MNIST published" in table and "13.87" in table and "0.961" in table


def test_a_config_error_writes_nothing_under_root(tmp_path, capsys, monkeypatch):
    # --quick copied its subset to <root>/quick-data before the overrides were checked, so a typo left files.
    script = load_file("benchmarks/reproduce_protocol.py")
    monkeypatch.setattr(script, "QUICK_ROWS", {"train": 4, "test": 2})  # so this folder needs a subset
    data = tmp_path / "idx"
    for prefix, n in (("train", 8), ("t10k", 4)):
        write_idx(data / f"{prefix}-images-idx3-ubyte", np.zeros((n, 28, 28), np.uint8))
        write_idx(data / f"{prefix}-labels-idx1-ubyte", np.zeros(n, np.uint8))
    assert script.main(["--data", str(data), "--quick", "--root", str(tmp_path / "out"), "train.seeed=1"]) == 2
    assert capsys.readouterr().err.startswith("config error: override 'train.seeed=1': unknown config key 'train.seeed'")
    assert not (tmp_path / "out").exists()


def test_quick_on_a_damaged_idx_file_is_one_input_error(tmp_path, capsys):
    # --quick parsed the files for its subset outside any handler: a cut-short .gz gave a traceback, exit 1.
    script = load_file("benchmarks/reproduce_protocol.py")
    data = tmp_path / "idx"
    for prefix, n in (("train", 8), ("t10k", 4)):
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz", (np.arange(n * 784) % 251).astype(np.uint8).reshape(n, 28, 28))
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(n, np.uint8))
    bad = data / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:40])
    assert script.main(["--data", str(data), "--quick", "--root", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"input error: {bad}: cannot be read")
    assert not (tmp_path / "out").exists()
