import os
from pathlib import Path

import pytest

from pipelines.publish import publishing, rollback, versions


def _write(path: str, text: str) -> None:
    Path(path).mkdir(parents=True)
    (Path(path) / "part-0").write_text(text)


def test_publish_swaps_all_tables_and_keeps_previous(tmp_path):
    root = str(tmp_path)
    for n in range(3):
        with publishing(root, ["features", "items"]) as pub:
            _write(pub.staging("features"), f"f{n}")
            _write(pub.staging("items"), f"i{n}")
    assert (tmp_path / "features" / "part-0").read_text() == "f2"
    assert (tmp_path / "items" / "part-0").read_text() == "i2"
    assert len(versions(root, "features")) == 2  # current + previous, older ones collected
    rollback(root, "features")
    assert (tmp_path / "features" / "part-0").read_text() == "f1"


def test_failed_job_leaves_previous_outputs(tmp_path):
    root = str(tmp_path)
    with publishing(root, ["features"]) as pub:
        _write(pub.staging("features"), "good")
    with pytest.raises(RuntimeError, match="boom"), publishing(root, ["features"]) as pub:
        _write(pub.staging("features"), "half")
        raise RuntimeError("boom")
    assert (tmp_path / "features" / "part-0").read_text() == "good"
    assert len(versions(root, "features")) == 1  # the aborted staging dir is gone


def test_incomplete_publication_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="never written"), publishing(str(tmp_path), ["features", "items"]) as pub:
        _write(pub.staging("features"), "x")
    assert not os.path.lexists(tmp_path / "features")


def test_plain_directory_from_older_layout_is_kept(tmp_path):
    _write(str(tmp_path / "features"), "old")
    with publishing(str(tmp_path), ["features"]) as pub:
        _write(pub.staging("features"), "new")
    assert (tmp_path / "features" / "part-0").read_text() == "new"
    rollback(str(tmp_path), "features")
    assert (tmp_path / "features" / "part-0").read_text() == "old"
