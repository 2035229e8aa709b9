"""Roll back a bad night: @champion goes back to @previous, and codes/ and neighbors/ to the version
that model published (re-scored when retention removed it), or a refusal that says why.

    sae rollback --config conf/local.yaml
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import guarded, log, new_parser, resolve, setup_logging, spark_session
from pipelines.config import Config

DESCRIPTION = (
    "Make @previous the champion again together with the codes/ and neighbors/ it published "
    "(scoring them again if they were removed)."
)


def run(cfg: Config) -> dict:
    import mlflow

    from pipelines.config import tracking_uri
    from pipelines.lock import run_lock
    from pipelines.nightly import lock_path, rollback_champion, rollback_target

    with run_lock(lock_path(cfg), stale_after=cfg.nightly.lock_stale_after_s):  # never under a running night
        mlflow.set_tracking_uri(tracking_uri(cfg))
        if rollback_target(cfg)[2] is not None:
            out = rollback_champion(cfg)
        else:  # its tables are gone: only then is Spark needed, to score them again
            with spark_session(cfg) as spark:
                out = rollback_champion(cfg, spark)
    log.info("rolled back: %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    return command(new_parser("sae rollback", DESCRIPTION).parse_intermixed_args(argv))


def command(args: argparse.Namespace) -> int:
    from pipelines.lock import LockHeld
    from pipelines.nightly import NightlyError

    setup_logging()
    cfg = resolve(args)
    try:
        out = run(cfg)
    except (LockHeld, NightlyError, RuntimeError) as exc:
        print(f"sae rollback: {exc}", file=sys.stderr)
        return 1
    print(f"champion: version {out['champion']} (was {out['rolled_back_from']})")
    how = "scored again" if out["rescored"] else "restored"
    print(f"codes/, neighbors/: scores version {out['scores_version']} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
