"""Sweep job: train and evaluate one model per trial, as MLflow child runs under one parent run.

    sae sweep --config conf/local.yaml --grid pretrain.method=rbm,autoencoder,none \\
        --grid 'model.layers=[784,256,2]' --metric ae_knn_accuracy --mode max
    sae sweep --config conf/local.yaml --random 8 --seed 1 --grid pretrain.method=rbm,none \\
        --range finetune.lr=0.001:0.1:log --range finetune.epochs=2:8 --metric ae_squared_error --mode min

Trials are config overrides layered over the usual config (so any key works); every trial is
resolved before the first one trains, so a bad key fails at once. Each trial is ``sae train`` (with
its evaluation) in a child run tagged ``mlflow.parentRunId``; the parent run records the metric per
trial and the best one. A trial that fails (divergence, bad data) is recorded and the sweep goes on.
Trials are not registered in the model registry unless ``--register``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.common import guarded, log, new_parser, setup_logging, training_session
from pipelines.config import Config, ConfigError, load_config
from pipelines.sweep import best_trial, grid_trials, parse_grid, parse_ranges, random_trials

DESCRIPTION = "Grid or random search over config keys: one MLflow child run per trial under a parent run; prints the best."
FIXED_PREFIXES = ("paths.", "mlflow.")  # every trial must share the data and the tracking store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="values of one key (a YAML value each; lists in brackets); repeat for more keys")
    parser.add_argument("--range", action="append", default=[], metavar="KEY=LOW:HIGH[:log]",
                        help="a numeric range (random search only); ints when both ends are ints")
    parser.add_argument("--random", type=int, default=0, metavar="N", help="N random trials instead of the full grid")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random search")
    parser.add_argument("--metric", default="ae_knn_accuracy", help="metric that picks the best trial")
    parser.add_argument("--mode", choices=("min", "max"), default="max")
    parser.add_argument("--name", default="", help="parent run name (default: sweep-<UTC time>)")
    parser.add_argument("--register", action="store_true", help="register every trial's model (default: none)")


def expand(grid: list[str], ranges: list[str], n_random: int, seed: int) -> list[list[str]]:
    """The trials' overrides from the command-line flags."""
    choices, rng = parse_grid(grid), parse_ranges(ranges)
    for key in [*choices, *rng]:
        if key.startswith(FIXED_PREFIXES):
            raise ConfigError(f"sweep key {key!r}: paths.* and mlflow.* must be the same for every trial")
    if n_random:
        return random_trials(n_random, choices, rng, seed)
    if rng:
        raise ConfigError("--range needs --random N (a grid takes explicit values: --grid KEY=V1,V2)")
    if not choices:
        raise ConfigError("nothing to sweep: give --grid KEY=V1,V2 (and/or --random N with --range)")
    return grid_trials(choices)


def train_trial(cfg: Config, extra_tags: dict[str, str]) -> dict[str, Any]:
    """One trial: what ``sae train`` does (``pipelines.training.train_and_evaluate``), in a child run."""
    from pipelines.training import train_and_evaluate

    with training_session(cfg) as spark:
        return train_and_evaluate(cfg, spark, extra_tags=extra_tags)


def run(
    config_file: str | None,
    preset: str | None,
    overrides: list[str],
    trials: list[list[str]],
    metric: str,
    mode: str = "max",
    name: str = "",
    register: bool = False,
    train_fn: Callable[..., dict] | None = None,
) -> dict[str, Any]:
    """Run ``trials`` (override lists) as child runs of a new parent run; returns the trials and the best."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.config import tracking_uri
    from sae_model.data import DataError
    from sae_model.tracking import git_commit, use_experiment
    from sae_model.trainer import TrainingDiverged

    train_fn = train_fn or train_trial
    base = list(overrides) + ([] if register else ["mlflow.registered_model="])
    cfgs: list[Config] = [load_config(config_file, base + t, preset) for t in trials]  # fail fast on a bad key
    base_cfg = load_config(config_file, base, preset)
    exp_id = use_experiment(base_cfg.mlflow.experiment, tracking_uri(base_cfg))
    client = MlflowClient()
    name = name or time.strftime("sweep-%Y%m%dT%H%M%S", time.gmtime())
    parent = client.create_run(exp_id, run_name=name, tags={
        "stage": "sweep", "git_commit": git_commit(Path(__file__).resolve().parent.parent),
    }).info.run_id
    client.log_batch(parent, params=[
        mlflow.entities.Param(k, str(v)[:6000]) for k, v in {
            "sweep.metric": metric, "sweep.mode": mode, "sweep.trials": len(trials),
            "sweep.overrides": " ".join(overrides), "sweep.keys": ",".join(dict.fromkeys(
                t.split("=", 1)[0] for tr in trials for t in tr)),
        }.items()
    ])
    log.info("sweep %s (parent run %s): %d trials, best by %s (%s)", name, parent, len(trials), metric, mode)
    results: list[dict[str, Any]] = []
    status = "FINISHED"
    try:
        for i, (trial, cfg) in enumerate(zip(trials, cfgs, strict=True)):
            tags = {"mlflow.parentRunId": parent, "mlflow.runName": f"{name}-trial-{i}", "sweep.trial": str(i),
                    "sweep.overrides": " ".join(trial)}
            t0 = time.monotonic()
            row: dict[str, Any] = {"trial": i, "overrides": trial, "run_id": None, "value": None, "status": "ok"}
            try:
                out = train_fn(cfg, extra_tags=tags)
                row["run_id"] = out["run_id"]
                row["value"] = out["metrics"].get(metric)
                if row["value"] is None:
                    row["status"] = f"no metric {metric!r} (have: {', '.join(sorted(out['metrics']))})"
            except (ConfigError, DataError, TrainingDiverged) as exc:
                row["status"] = f"failed: {exc}"[:500]
                log.warning("trial %d (%s) failed: %s", i, " ".join(trial), exc)
            row["seconds"] = time.monotonic() - t0
            results.append(row)
            if row["value"] is not None and math.isfinite(row["value"]):
                client.log_metric(parent, f"trial/{metric}", float(row["value"]), step=i)
            log.info("trial %d/%d %s: %s=%s (%.0fs)", i + 1, len(trials), " ".join(trial), metric, row["value"], row["seconds"])
    except BaseException:
        status = "KILLED"
        raise
    finally:
        best = best_trial([r["value"] for r in results], mode)  # type: ignore[arg-type]
        if best is not None:
            b = results[best]
            client.log_metric(parent, f"best_{metric}", float(b["value"]))
            client.set_tag(parent, "best_run_id", b["run_id"])
            client.set_tag(parent, "best_overrides", " ".join(b["overrides"]))
        elif status == "FINISHED":
            status = "FAILED"
        client.set_terminated(parent, status)
    return {"parent_run_id": parent, "name": name, "metric": metric, "mode": mode, "trials": results, "best": best}


def format_results(out: dict[str, Any]) -> str:
    lines = [f"sweep {out['name']} (parent run {out['parent_run_id']}), best by {out['metric']} ({out['mode']}):"]
    for r in out["trials"]:
        mark = "*" if r["trial"] == out["best"] else " "
        value = "-" if r["value"] is None else f"{r['value']:.6g}"
        note = "" if r["status"] == "ok" else f"  [{r['status']}]"
        lines.append(f"{mark} {r['trial']:3d}  {out['metric']}={value:<10}  {r['run_id'] or '-':32}  {' '.join(r['overrides'])}{note}")
    if out["best"] is None:
        lines.append("no trial produced the metric")
    else:
        b = out["trials"][out["best"]]
        lines.append(f"best: trial {b['trial']} {' '.join(b['overrides'])} -> {out['metric']}={b['value']:.6g} (run {b['run_id']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("sae sweep", DESCRIPTION)
    add_arguments(parser)
    return command(parser.parse_intermixed_args(argv))


def command(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        trials = expand(args.grid, args.range, args.random, args.seed)
        out = run(args.config, args.preset, list(args.overrides), trials, args.metric, args.mode, args.name, args.register)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(format_results(out))
    print(json.dumps({"parent_run_id": out["parent_run_id"], "best": out["best"]}))
    return 0 if out["best"] is not None else 1


if __name__ == "__main__":
    sys.exit(guarded(main))
