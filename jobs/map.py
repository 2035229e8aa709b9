"""Redraw the maps from the published tables, without scoring again.

    sae map --config conf/local.yaml --colour genre --max-points 200000 --out /tmp/movies.html
    sae map --log      # also log map.png and map.html to the MLflow run that made codes/
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import log, new_parser, resolve, setup_logging, spark_session
from pipelines.config import Config, tracking_uri

DESCRIPTION = (
    "Draw map.html (interactive, self-contained) and map.png from the published codes/, items/, "
    "neighbors/ and features/ under paths.root; nothing is scored again."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--colour", "--color", default="auto",
                        help="colour key: auto (label, else first genre), none, genre, or a column of items/")
    parser.add_argument("--max-points", type=int, default=None,
                        help="items drawn (a seeded sample above this; default infer.map_max_points)")
    parser.add_argument("--out", default=None, help="output directory, or an .html path (default <paths.root>/maps)")
    parser.add_argument("--log", action="store_true", help="log the maps to the MLflow run recorded in codes/")


def run(cfg: Config, colour: str = "auto", max_points: int | None = None, out: str | None = None, log_run: bool = False) -> list:
    """Paths of the written maps. Raises ValueError for a bad colour key or sample size, FileNotFoundError without codes/."""
    from pyspark.errors import AnalysisException

    from pipelines.inference import draw_maps
    from pipelines.publish import is_local, local_path, pin

    if max_points is not None and max_points < 1:
        raise ValueError(f"--max-points: must be >= 1, got {max_points}")
    scores = pin(cfg.paths.root, "scores")  # one version for the run id and the drawing alike
    codes = scores.path("codes")
    if is_local(codes) and not local_path(codes).exists():
        raise FileNotFoundError(f"no codes/ under {cfg.paths.root}: run `sae infer` first")
    with spark_session(cfg) as spark:
        run_id = None
        if log_run:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri(cfg))
            try:
                first = spark.read.parquet(codes).select("run_id").first()
            except AnalysisException as exc:
                raise FileNotFoundError(f"no codes/ under {cfg.paths.root}: run `sae infer` first") from exc
            run_id = first.run_id if first else None
        paths = draw_maps(
            spark, cfg.paths.root, cfg.infer, out=out, colour=colour, max_points=max_points, run_id=run_id, scores=scores
        )
    log.info("maps: %s", ", ".join(map(str, paths)))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("sae map", DESCRIPTION)
    add_arguments(parser)
    return command(parser.parse_args(argv))


def command(args: argparse.Namespace) -> int:
    setup_logging()
    cfg = resolve(args)
    try:
        paths = run(cfg, args.colour, args.max_points, args.out, args.log)
    except (ValueError, FileNotFoundError) as exc:
        print(f"input error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"map:        {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
