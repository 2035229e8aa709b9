"""``sae_model.idx``, the one idx parser, used by the ingest and, without pyspark, by bench_train."""

from __future__ import annotations

import gzip
import subprocess
import sys

import numpy as np
import pytest

from sae_model.idx import IMAGES_MAGIC, LABELS_MAGIC, IdxError, read_idx, write_idx
from tests.conftest import ROOT, load_file


@pytest.mark.parametrize("name", ["x-images-idx3-ubyte", "x-images-idx3-ubyte.gz"])
def test_round_trip_plain_and_gzip(tmp_path, name):
    x = (np.arange(3 * 5 * 4) % 256).astype(np.uint8).reshape(3, 5, 4)
    assert (read_idx(write_idx(tmp_path / name, x), IMAGES_MAGIC, 3) == x).all()


def test_gzip_is_known_by_its_bytes_not_its_name(tmp_path):
    labels = np.array([7, 0, 9], np.uint8)
    path = tmp_path / "y-labels-idx1-ubyte"  # gunzip -k forgotten: gzip bytes under the plain name
    path.write_bytes(gzip.compress(write_idx(tmp_path / "plain", labels).read_bytes()))
    assert read_idx(path, LABELS_MAGIC, 1).tolist() == [7, 0, 9]


def test_truncated_wrong_magic_and_damaged_gzip_name_the_file(tmp_path):
    path = write_idx(tmp_path / "z-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(IdxError, match=r"z-images-idx3-ubyte: 1574 bytes, expected 1584 .*truncated"):
        read_idx(path, IMAGES_MAGIC, 3)
    with pytest.raises(IdxError, match="z-images-idx3-ubyte: magic number 0x00000803, expected 0x00000801"):
        read_idx(path, LABELS_MAGIC, 1)
    bad = tmp_path / "w.gz"
    bad.write_bytes(gzip.compress(b"\x00" * 100)[:20])
    with pytest.raises(IdxError, match="w.gz: cannot be read"):
        read_idx(bad, IMAGES_MAGIC, 3)


def test_bench_train_reads_the_shipped_images_without_pyspark():
    # The GPU image has no pyspark: bench_train must import and read idx files without it.
    code = ("import sys; sys.modules['pyspark'] = None\n"
            "import importlib.util as u\n"
            f"s = u.spec_from_file_location('b', {str(ROOT / 'benchmarks' / 'bench_train.py')!r})\n"
            "m = u.module_from_spec(s); s.loader.exec_module(m)\n"
            f"x = m.read_mnist(__import__('pathlib').Path({str(ROOT / 'data' / 'mnist')!r}), 50)\n"
            "print(x.shape, x.dtype, float(x.max()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["(50,", "784)", "float32", "1.0"]


def test_bench_train_damaged_file_is_one_input_error_line(tmp_path, capsys):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(SystemExit) as exit_:
        load_file("benchmarks/bench_train.py").read_mnist(tmp_path, 5)
    assert exit_.value.code == 2 and capsys.readouterr().out == f"input error: {tmp_path}: 4 MNIST images, 5 asked for\n"
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 12)
    with pytest.raises(SystemExit) as exit_:
        load_file("benchmarks/bench_train.py").read_mnist(tmp_path, 1)
    assert exit_.value.code == 2
    assert capsys.readouterr().out.startswith(f"input error: {tmp_path}/train-images-idx3-ubyte: magic number 0x00000801")
