"""The trainer's callback base class: the hooks ``sae_model.trainer.Trainer`` calls.

Its own module so that callbacks living beside what they serve (``sae_model.health``,
``sae_model.pretrain``) can subclass it without importing the trainer, which imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sae_model.trainer import EpochRecord, Stage, Trainer


class Callback:
    """Hooks the trainer calls; all optional. Callbacks travel to the ranks of distributed training
    with the ``TrainRequest``, so they must pickle."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first stage of ``fit`` (also when resuming)."""
        ...

    def on_stage_start(self, trainer: Trainer, stage: Stage) -> None:
        """Before the first epoch run of ``stage``, after its optimizer is made (also when resuming into it)."""
        ...

    def on_checkpoint(self, trainer: Trainer, stage: Stage, epoch: int, finished: bool) -> None:
        """After rank 0 wrote the checkpoint of ``epoch`` of ``stage`` (``finished``: the last one)."""

    def on_epoch_end(self, trainer: Trainer, stage: Stage, record: EpochRecord) -> None:
        """After ``record``'s epoch of ``stage``, before its checkpoint is written; ``trainer.history``
        already holds it."""
        ...
