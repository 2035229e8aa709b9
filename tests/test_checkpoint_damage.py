"""Kind 7 of the bad-input contract: a damaged checkpoint (case ``checkpoint-truncated``).

The newest state file cut short (a crash mid-copy, a full disk) falls back to the one before it with
a warning naming the bad file; with none readable the run starts afresh only when
``train.restart_on_bad_checkpoint=true`` asks for it, else one error line saying how.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from sae_model import checkpoint as ckpt
from sae_model.config import FinetuneConfig, ModelConfig, PretrainConfig, TrainConfig
from sae_model.trainer import Callback, MlflowSettings, TrainingError, train
from tests.train_data import manifold, write_features

OFF = MlflowSettings("", enabled=False)


class _Killed(Exception):
    pass


class _KillAt(Callback):
    """Stops the run at the end of epoch ``step`` (before it is checkpointed), as a kill would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_epoch_end(self, trainer, stage, record) -> None:  # noqa: ANN001
        if trainer.step == self.step:
            raise _Killed


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's shared fixtures


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    x, labels = manifold(300, 16, seed=3)
    return write_features(root, x, labels)


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _configs(**train_kw) -> tuple:
    return (
        ModelConfig(layers=[16, 8, 2]),
        PretrainConfig(method="autoencoder", epochs=1, lr=3.0, batch_size=20),
        FinetuneConfig(epochs=4, lr=3.0, batch_size=20),
        TrainConfig(seed=1, progress=False, **train_kw),
    )


def test_save_keeps_the_current_and_the_previous_checkpoint(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, {"model": {"w": torch.full((2,), float(step))}}, {"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta-000002.json", "meta-000003.json", "meta.json", "state-000002.pt", "state-000003.pt",
    ]


def test_truncated_newest_falls_back_with_a_warning_naming_it(tmp_path, caplog):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, {"model": {"w": torch.full((2,), float(step))}}, {"step": step})
    _cut(tmp_path / "state-000002.pt")
    with caplog.at_level(logging.WARNING, logger="sae_model.checkpoint"):
        state, meta = ckpt.load_checkpoint(tmp_path)
    assert meta["step"] == 1 and state["model"]["w"].tolist() == [1.0, 1.0]
    assert str(tmp_path / "state-000002.pt") in caplog.text
    # The next save (step 2 again) replaces the damaged file instead of keeping it as "newer".
    ckpt.save_checkpoint(tmp_path, {"model": {"w": torch.full((2,), 9.0)}}, {"step": 2})
    assert ckpt.load_checkpoint(tmp_path)[0]["model"]["w"].tolist() == [9.0, 9.0]


def test_none_readable_is_an_error_naming_every_file(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, {"model": {"w": torch.zeros(2)}}, {"step": step})
    _cut(tmp_path / "state-000002.pt")
    (tmp_path / "state-000001.pt").write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(ckpt.CheckpointError, match=r"state-000002.pt.*state-000001.pt"):
        ckpt.load_checkpoint(tmp_path)


def _killed_run(feats: str, ck: Path, at: int) -> None:
    with pytest.raises(_Killed):
        train(*_configs(), feats, None, OFF, ck, callbacks=[_KillAt(at)])


def test_resume_after_truncation_continues_from_the_previous_epoch_exactly(feats, tmp_path, caplog):
    ck = tmp_path / "ck"
    _killed_run(feats, ck, at=5)  # steps 1-4 done (2 pretraining epochs, 2 fine-tuning); 3 and 4 kept
    assert ckpt.load_meta(ck)["step"] == 4
    _cut(ck / "state-000004.pt")
    with caplog.at_level(logging.WARNING):
        train(*_configs(), feats, None, OFF, ck, resume=True)
    assert str(ck / "state-000004.pt") in caplog.text
    straight = tmp_path / "straight"
    train(*_configs(), feats, None, OFF, straight)
    got, want = ckpt.load_checkpoint(ck)[0]["model"], ckpt.load_checkpoint(straight)[0]["model"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)
    # Each epoch is in the history once: the damaged epoch was redone, not counted twice.
    assert [h["stage_name"] for h in ckpt.load_meta(ck)["history"]].count("finetune") == 4


def test_no_readable_checkpoint_stops_unless_asked_to_start_afresh(feats, tmp_path):
    ck = tmp_path / "ck"
    _killed_run(feats, ck, at=4)
    for f in ck.glob("state-*.pt"):
        _cut(f)
    with pytest.raises(TrainingError, match=r"no readable checkpoint in .*train.restart_on_bad_checkpoint=true"):
        train(*_configs(), feats, None, OFF, ck, resume=True)
    train(*_configs(restart_on_bad_checkpoint=True), feats, None, OFF, ck, resume=True)
    meta = ckpt.load_meta(ck)
    assert meta["finished"] and meta["step"] == 6 and len(meta["history"]) == 6  # 2 pretrain + 4 fine-tuning epochs
    train(*_configs(), feats, None, OFF, tmp_path / "straight")
    got, want = ckpt.load_checkpoint(ck)[0]["model"], ckpt.load_checkpoint(tmp_path / "straight")[0]["model"]
    for k in want:  # afresh means afresh: the same weights as a run that never had a checkpoint
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)


def test_resume_with_another_run_length_finds_the_training_it_continues(tmp_path):
    """Case checkpoint-truncated resumes with ``finetune.epochs=40`` a run started with 5000: another
    config hash, the same training. A change to what it learns (``finetune.lr``) is not found."""
    from pipelines.config import load_config
    from pipelines.training import checkpoint_dir_for

    first = load_config(None, [f"paths.root={tmp_path}", "finetune.epochs=5000"])
    again = load_config(None, [f"paths.root={tmp_path}", "finetune.epochs=40"])
    other = load_config(None, [f"paths.root={tmp_path}", "finetune.epochs=40", "finetune.lr=0.5"])
    assert first.hash() != again.hash() and first.resume_fingerprint() == again.resume_fingerprint()
    old = tmp_path / "checkpoints" / first.hash()
    ckpt.save_checkpoint(old, {"model": {}}, {"step": 3, "finished": False, "fingerprint": first.resume_fingerprint()})
    assert checkpoint_dir_for(again, resume=True) == str(old)
    assert checkpoint_dir_for(again, resume=False) == str(tmp_path / "checkpoints" / again.hash())
    assert checkpoint_dir_for(other, resume=True) == str(tmp_path / "checkpoints" / other.hash())
