"""Launch distributed training on Spark: TorchDistributor runs ``sae_model.distributed.train_worker``.

The one place that knows TorchDistributor; ``sae_model`` stays free of pyspark.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from sae_model.config import DistributedConfig

log = logging.getLogger(__name__)


class DistributedTrainingError(RuntimeError):
    """A training process failed; the message says which and ends with the processes' output."""


def run_distributed(spark: Any, cfg: DistributedConfig, request: Any) -> dict[str, Any]:
    """Train ``request`` (a ``sae_model.trainer.TrainRequest``) with ``cfg.num_processes`` processes;
    returns rank 0's summary (model_uri, run_id, ...).

    ``local_mode=True`` starts them on the driver (torchrun); ``False`` runs one per Spark task in a
    barrier stage, so the cluster needs ``num_processes`` free task slots at once. ``spark`` must be
    the active session (TorchDistributor finds it itself; passing it keeps that dependency visible).
    """
    from pyspark.ml.torch.distributor import TorchDistributor

    from sae_model.distributed import failures_dir, read_failures, train_worker

    if spark is None:
        raise ValueError("run_distributed needs the active SparkSession")
    log.info(
        "distributed training: %d processes, %s, %s", cfg.num_processes,
        "GPU/nccl" if cfg.use_gpu else "CPU/gloo", "on the driver" if cfg.local_mode else "one per Spark task",
    )
    checkpoint_dir = request.checkpoint_dir
    shutil.rmtree(failures_dir(checkpoint_dir), ignore_errors=True)
    distributor = TorchDistributor(num_processes=cfg.num_processes, local_mode=cfg.local_mode, use_gpu=cfg.use_gpu)
    try:
        out = distributor.run(train_worker, request, cfg.use_gpu, cfg.timeout_s)
    except Exception as exc:
        ranks = read_failures(checkpoint_dir)
        why = "; ".join(ranks) if ranks else "no rank left an error (killed?); see the processes' output"
        raise DistributedTrainingError(
            f"distributed training with {cfg.num_processes} processes failed "
            f"({'local mode' if cfg.local_mode else 'barrier tasks'}): {why}. Launcher: {str(exc)[:2000]}"
        ) from exc
    if not isinstance(out, dict) or "run_id" not in out:
        raise DistributedTrainingError(f"distributed training returned no result from rank 0: {out!r}")
    return out
