"""Roll back a bad night: @champion goes back to @previous, codes/ and neighbors/ to their previous version.

    sae rollback --config conf/local.yaml
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import log, new_parser, resolve, setup_logging
from pipelines.config import Config

DESCRIPTION = "Swap the @champion and @previous aliases and point codes/ and neighbors/ at their previous versions."
TABLES = ("codes", "neighbors")


def run(cfg: Config) -> dict:
    import mlflow

    from jobs.nightly import lock_path
    from pipelines.lock import run_lock
    from pipelines.nightly import rollback_champion, tracking_uri
    from pipelines.publish import local_path, rollback, versions

    with run_lock(lock_path(cfg), stale_after=cfg.nightly.lock_stale_after_s):  # never under a running night
        for t in TABLES:  # check first: a half rollback (aliases but not tables) would mix models
            current = (local_path(cfg.paths.root) / t).resolve()
            if not any(v.name < current.name for v in versions(cfg.paths.root, t)):
                raise RuntimeError(f"no previous version of {t!r} under {cfg.paths.root} to roll back to")
        mlflow.set_tracking_uri(tracking_uri(cfg))
        champion, rolled_back = rollback_champion(cfg)
        tables = {t: str(rollback(cfg.paths.root, t)) for t in TABLES}
    log.info("rolled back: champion version %s (was %s); tables %s", champion, rolled_back, tables)
    return {"champion": champion, "rolled_back_from": rolled_back, "tables": tables}


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
    for table, path in out["tables"].items():
        print(f"{table}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
