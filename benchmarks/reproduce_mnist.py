"""Hinton & Salakhutdinov's MNIST maps, reproduced on the embedded real MNIST test set.

Ingests ``data/mnist`` once (10,000 real test images), then trains and evaluates six models:
784-1000-500-250-{30,2} x pretrain.method in {rbm, autoencoder, none}, on the hash split
``train.val_fraction=0.2`` (8,030 training / 1,970 validation images). Each is evaluated on the
validation images against PCA of the same width fitted on the training images, and one table is
printed (squared error per image, 5-NN accuracy, trustworthiness/continuity at k=12, seconds).

    .venv/bin/python benchmarks/reproduce_mnist.py                      # the preset's 15 + 5 epochs
    .venv/bin/python benchmarks/reproduce_mnist.py --pretrain-epochs 3 --finetune-epochs 10
    .venv/bin/python benchmarks/reproduce_mnist.py --codes 2 --methods rbm finetune.lr=0.05

Everything lands under ``--root`` (features/, items/, mlflow.db with one run per model in the
experiment ``mnist-repro``); extra ``key=value`` arguments override the config of every model.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from jobs.common import setup_logging
from pipelines.config import load_config

REPO = Path(__file__).resolve().parent.parent
HINTON = "Hinton & Salakhutdinov (60,000 training images): 30-D autoencoder 3.00 vs PCA 13.87 squared error per image"
COLUMNS = [
    ("code", "code_dim", "{:.0f}"),
    ("pretrain", "method", "{}"),
    ("epochs", "epochs", "{}"),
    ("AE sq.err", "ae_squared_error", "{:.2f}"),
    ("PCA sq.err", "pca_squared_error", "{:.2f}"),
    ("AE 5-NN", "ae_knn_accuracy", "{:.3f}"),
    ("PCA 5-NN", "pca_knn_accuracy", "{:.3f}"),
    ("AE trust", "ae_trustworthiness", "{:.3f}"),
    ("PCA trust", "pca_trustworthiness", "{:.3f}"),
    ("AE cont", "ae_continuity", "{:.3f}"),
    ("PCA cont", "pca_continuity", "{:.3f}"),
    ("seconds", "seconds", "{:.0f}"),
]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [head, "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        cells = [fmt.format(r[key]) if key in r else "-" for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="out/mnist-repro")
    p.add_argument("--codes", type=int, nargs="+", default=[30, 2])
    p.add_argument("--methods", nargs="+", default=["rbm", "autoencoder", "none"])
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    setup_logging()
    logging.getLogger("sae_model.trainer").setLevel(logging.WARNING)

    base = [
        f"paths.root={args.root}", "data.source=mnist", f"data.input={REPO / 'data' / 'mnist'}",
        "spark.master=local[2]", "train.val_fraction=0.2", "train.progress=false",
        "mlflow.experiment=mnist-repro", "mlflow.registered_model=",
        f"pretrain.epochs={args.pretrain_epochs}", f"finetune.epochs={args.finetune_epochs}",
    ]
    conf = str(REPO / "conf" / "local.yaml")
    if not (Path(args.root) / "features" / "_manifest.json").exists():
        from jobs import ingest

        t0 = time.monotonic()
        ingest.run(load_config(conf, base, preset="mnist"))
        logging.info("ingest: %.0fs", time.monotonic() - t0)

    from jobs import train

    rows: list[dict] = []
    text = ""
    for width in args.codes:
        for method in args.methods:
            over = base + [f"model.layers=[784,1000,500,250,{width}]", f"pretrain.method={method}", *args.overrides]
            cfg = load_config(conf, over, preset="mnist")
            t0 = time.monotonic()
            out = train.run(cfg)
            seconds = time.monotonic() - t0
            pre = 0 if method == "none" else cfg.pretrain.epochs
            row = dict(out["metrics"], method=method, seconds=seconds, run_id=out["run_id"],
                       epochs=f"{pre}x4+{cfg.finetune.epochs}" if pre else f"{cfg.finetune.epochs}")
            rows.append(row)
            logging.info("done %s:\n%s", method, table([row]))
            # Written after every model, so a long run that is stopped still leaves its rows.
            text = f"{table(rows)}\n\n{HINTON}\n"
            (Path(args.root) / "reproduce_mnist.md").write_text(text, encoding="utf-8")
            (Path(args.root) / "reproduce_mnist.json").write_text(json.dumps(rows, indent=1, default=str), encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
