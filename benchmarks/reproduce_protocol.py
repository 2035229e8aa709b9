"""The field's yardstick (issue 19): train on an idx dataset's training split, score on its test split,
one table beside the published MNIST numbers.

    .venv/bin/python benchmarks/reproduce_protocol.py --data ../shared/data/mnist
    .venv/bin/python benchmarks/reproduce_protocol.py --data ~/fashion-mnist --root /tmp/fashion
    .venv/bin/python benchmarks/reproduce_protocol.py --data ../shared/data/mnist --quick   # smoke check
    .venv/bin/python benchmarks/reproduce_protocol.py --data DIR --preset mnist_protocol finetune.epochs=400

``--data`` is a folder in the MNIST idx layout (``train-images-idx3-ubyte[.gz]``,
``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``):
MNIST, Fashion-MNIST, KMNIST. The script runs the pipeline's own commands as child processes and
prints each one (copy-pasteable) with the seconds it took here:

1. ``sae ingest data.source=mnist``: every image, ``split`` = ``train`` / ``test`` in items/;
2. ``sae train --preset P train.split_column=split train.train_value=train`` for each ``--preset``
   (default ``mnist_protocol_30``, Hinton's 30-D code, then ``mnist_protocol``, the 2-D map): trained
   on the training split only; the evaluation at the end of the training scores the autoencoder,
   PCA and (with the preset's ``evaluate.umap``, when umap-learn is importable: the 2-D preset) UMAP
   of the same width, each fitted on the training split and scored on the test split: squared error per test image, 5-NN and 1-NN accuracy (classifier
   fitted on the training codes), trustworthiness at k=5 on training items (the published protocol)
   and on test items, continuity, fit seconds.

The table (``protocol.md``, with everything in ``protocol.json``, under ``--root``) puts those rows
beside the published MNIST numbers: Hinton & Salakhutdinov (2006) for the 30-D code and the table of
Sainburg, McInnes & Gentner (2021) for 2-D maps. ``--quick`` runs the same pipeline on at most
3,000 training / 1,000 test images with 1 pretraining epoch per layer and 2 fine-tuning epochs: a
smoke check in a few minutes, not a measurement. Extra ``key=value`` arguments are passed to every
command (they override the presets and ``--quick``'s settings).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESETS = ["mnist_protocol_30", "mnist_protocol"]
QUICK_ROWS = {"train": 3000, "test": 1000}
QUICK = ["pretrain.epochs=1", "finetune.epochs=2", "finetune.lr_decay_after=0", "finetune.recon_weight_after=0", "finetune.formation_sampling=null", "evaluate.max_items=1000", "evaluate.max_fit_items=5000"]
SPLIT = ["train.split_column=split", "train.train_value=train"]

HINTON = "Hinton & Salakhutdinov 2006"
SAINBURG = "Sainburg, McInnes & Gentner 2021"
# (code width, method, source, published values on MNIST). Hinton & Salakhutdinov (2006), Science
# 313:504, Fig. 2: squared error per test image of the 30-D codes. Sainburg, McInnes & Gentner (2021),
# Neural Computation 33(11), the MNIST 2-D embeddings: 5-NN accuracy on the test images with the
# classifier fitted on training embeddings, trustworthiness at k=5 on 10,000 training images.
PUBLISHED: list[tuple[int, str, str, dict[str, float]]] = [
    (30, "autoencoder, RBM-pretrained", HINTON, {"squared_error": 3.00}),
    (30, "logistic PCA", HINTON, {"squared_error": 8.01}),
    (30, "PCA", HINTON, {"squared_error": 13.87}),
    (2, "Parametric UMAP", SAINBURG, {"knn_accuracy": 0.961, "trustworthiness_train": 0.957}),
    (2, "UMAP", SAINBURG, {"knn_accuracy": 0.954, "trustworthiness_train": 0.960}),
    (2, "UMAP + reconstruction", SAINBURG, {"knn_accuracy": 0.954, "trustworthiness_train": 0.968}),
    (2, "t-SNE", SAINBURG, {"knn_accuracy": 0.950, "trustworthiness_train": 0.987}),
    (2, "parametric t-SNE", SAINBURG, {"knn_accuracy": 0.938, "trustworthiness_train": 0.966}),
    (2, "autoencoder", SAINBURG, {"knn_accuracy": 0.793, "trustworthiness_train": 0.966}),
    (2, "PCA", SAINBURG, {"knn_accuracy": 0.420, "trustworthiness_train": 0.743}),
]
# Our baselines are the same method as the published row of that name and width.
BASELINES = {"pca": "PCA", "umap": "UMAP"}


def columns(k_knn: str, k_tw: str) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(this run's columns, the published MNIST columns): (header, metric suffix, format)."""
    ours = [
        ("squared error / test item", "squared_error", "{:.2f}"),
        (f"{k_knn}-NN", "knn_accuracy", "{:.3f}"),
        ("1-NN", "knn1_accuracy", "{:.3f}"),
        (f"trust@{k_tw}, train items", "trustworthiness_train", "{:.3f}"),
        (f"trust@{k_tw}, test items", "trustworthiness", "{:.3f}"),
        (f"continuity@{k_tw}, test items", "continuity", "{:.3f}"),
        ("fit s", "fit_seconds", "{:.0f}"),
    ]
    published = [
        ("MNIST published: squared error", "squared_error", "{:.2f}"),
        ("MNIST published: 5-NN", "knn_accuracy", "{:.3f}"),
        ("MNIST published: trust@5, train items", "trustworthiness_train", "{:.3f}"),
    ]
    return ours, published


def idx_splits(data: Path) -> dict[str, tuple[Path, Path]]:
    """split -> (images file, labels file) of the idx folder; exits 2 naming the folder unless it holds a
    ``train`` and a ``t10k`` (test) pair, the layout ``sae ingest data.source=mnist`` reads."""
    from pipelines.sources import InputError
    from pipelines.sources.mnist import pairs

    try:
        found = {split: (img, lab) for split, img, lab in pairs(str(data))}
        if set(found) != {"train", "test"}:
            raise InputError(f"{data}: expected train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz] with "
                             f"their labels files, found the splits {sorted(found)}")
    except InputError as exc:
        print(f"input error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return found


def image_size(images: Path) -> int:
    """Pixels per image from the idx3 header (rows x columns)."""
    from pipelines.sources.csvfiles import open_input

    with open_input(images) as fh:
        head = fh.read(16)
    return int.from_bytes(head[8:12], "big") * int.from_bytes(head[12:16], "big")


def quick_subset(found: dict[str, tuple[Path, Path]], out: Path) -> bool:
    """Write the first ``QUICK_ROWS[split]`` images and labels of each split as idx files under ``out``
    (same names, uncompressed); False (nothing written) when every split is already that small."""
    from pipelines.sources.mnist import IMAGES_MAGIC, LABELS_MAGIC, parse_idx
    from sae_model.idx import write_idx

    # Every file parsed (raising InputError for a damaged one) before anything is written.
    parts = {split: (parse_idx(img, IMAGES_MAGIC, 3), parse_idx(lab, LABELS_MAGIC, 1)) for split, (img, lab) in found.items()}
    if all(len(parts[s][0]) <= QUICK_ROWS[s] for s in parts):
        return False
    prefix = {"train": "train", "test": "t10k"}
    for split, (images, labels) in parts.items():
        n = QUICK_ROWS[split]
        write_idx(out / f"{prefix[split]}-images-idx3-ubyte", images[:n])
        write_idx(out / f"{prefix[split]}-labels-idx1-ubyte", labels[:n])
    return True


def sae() -> list[str]:
    """The console command of this interpreter's environment (``.venv/bin/sae``)."""
    exe = Path(sys.executable).parent / "sae"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "jobs.cli"]


def run_command(argv: list[str], done: list[dict]) -> dict:
    """Run one command from the repository root (its log passes through; stdout is kept, its last JSON
    line parsed), print it and its seconds, and append ``{command, argv, seconds, rc, output}`` to ``done``."""
    line = shlex.join(argv)
    print(f"$ {line}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
    seconds = time.monotonic() - t0
    out = next((json.loads(s) for s in reversed(proc.stdout.splitlines()) if s.startswith("{")), None)
    print(f"# {seconds:.0f} s, exit {proc.returncode}", flush=True)
    done.append({"command": line, "argv": argv, "seconds": seconds, "rc": proc.returncode, "output": out})
    return done[-1]


def fmt(value: object, spec: str) -> str:
    return spec.format(value) if isinstance(value, int | float) and math.isfinite(value) else "–"


def table_rows(runs: list[dict]) -> list[dict]:
    """One row per method and code width: this run's metrics (``ours``) and the published MNIST values
    (``published``) where the method is the same (PCA, UMAP), then the published-only rows."""
    rows: list[dict] = []
    widths = list(dict.fromkeys(r["code"] for r in runs))
    for width in widths:
        pub = {m: (src, v) for c, m, src, v in PUBLISHED if c == width}
        for r in (r for r in runs if r["code"] == width):
            m = r.get("metrics") or {}
            label = f"sae-maps autoencoder, `--preset {r['preset']}` (fine-tuning loss {r['loss']})"
            if r["rc"] != 0:
                label += f" (failed: exit {r['rc']})"
            rows.append({"code": width, "kind": "ae", "method": label, "source": "this run", "ours": pick(m, "ae"), "published": {}})
            for prefix, name in BASELINES.items():
                if any(k.startswith(prefix + "_") for k in m):
                    src, values = pub.pop(name, ("", {}))
                    rows.append({"code": width, "kind": prefix, "method": f"{name}-{width}" if prefix == "pca" else f"{name} (umap-learn)",
                                 "source": "this run" + (f"; published: {src}" if src else ""),
                                 "ours": pick(m, prefix), "published": values})
        rows += [{"code": width, "kind": "published", "method": name, "source": src, "ours": {}, "published": values}
                 for name, (src, values) in pub.items()]
    return rows


def pick(metrics: dict, prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix + "_"): v for k, v in metrics.items() if k.startswith(prefix + "_")}


def markdown(rows: list[dict], k_knn: str, k_tw: str) -> str:
    ours, published = columns(k_knn, k_tw)
    head = ["code", "method", *(c[0] for c in ours), *(c[0] for c in published), "source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["code"]), r["method"], *(fmt(r["ours"].get(key), f) for _, key, f in ours),
                 *(fmt(r["published"].get(key), f) for _, key, f in published), r["source"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(data: Path, args: argparse.Namespace, runs: list[dict], done: list[dict], notes: list[str]) -> tuple[str, dict]:
    """The Markdown (caption, table, commands) and the JSON document."""
    ks = {(str(r["k_knn"]), str(r["k_tw"])) for r in runs}
    k_knn, k_tw = ks.pop() if len(ks) == 1 else ("k", "k")
    rows = table_rows(runs)
    m = next((r["metrics"] for r in runs if r.get("metrics")), {})
    n = f"{m['n_train']:,.0f} training / {m['n_test']:,.0f} test items" if "n_train" in m and "n_test" in m else "split sizes not reported"
    caption = [
        f"**Data: `{data}`** ({n}; split `train` trained on, every other item scored; the same split for every "
        f"method of a row group). This run's columns: kNN classifiers fitted on the training items' codes and "
        f"scored on the test items; trustworthiness and continuity on a seeded sample of at most "
        f"`evaluate.max_items` items. **The published columns are MNIST's** ({HINTON}: 30-D codes, squared "
        f"error per test image; {SAINBURG}: 2-D maps, 5-NN on the test images, trustworthiness k=5 on "
        f"10,000 training images): they compare with this run only when `{data.name}` is MNIST.",
        *notes,
    ]
    env = [f"cd {shlex.quote(str(REPO))}"]
    if os.environ.get("PYTHONPATH"):
        env.append(f"export PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])}")
    commands = [*env, *(f"{d['command']}   # {d['seconds']:.0f} s, exit {d['rc']}" for d in done)]
    machine = f"{os.cpu_count()} CPU cores, {gpu()}"
    text = "\n\n".join([
        "\n\n".join(caption), markdown(rows, k_knn, k_tw),
        f"Commands run, with their seconds on this machine ({machine}):", "```bash\n" + "\n".join(commands) + "\n```",
    ]) + "\n"
    doc = {"data": str(data), "quick": args.quick, "machine": machine, "commands": done, "runs": runs, "rows": rows,
           "published": [{"code": c, "method": mth, "source": s, **v} for c, mth, s, v in PUBLISHED]}
    return text, doc


def gpu() -> str:
    import torch

    return f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder in the MNIST idx layout (train-* and t10k-* files, .gz or not)")
    p.add_argument("--quick", action="store_true", help="smoke check: a subset, tiny epochs, a few minutes")
    p.add_argument("--root", default=None, help="where every output goes (default: out/protocol-<data folder name>)")
    p.add_argument("--preset", action="append", default=None,
                   help=f"a preset to train; repeat for several, trained in order (default: {' '.join(PRESETS)})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every command, after the script's own")
    args = p.parse_args(argv)
    from pipelines.config import ConfigError, load_config

    data = Path(args.data).expanduser().resolve()
    root = Path(args.root or f"out/protocol-{data.name}").expanduser().resolve()
    found = idx_splits(data)
    notes = []
    common = [f"paths.root={root}"]
    train_over = ["mlflow.experiment=protocol", "mlflow.registered_model=", *SPLIT, *(QUICK if args.quick else [])]
    pixels = image_size(found["train"][0])
    plans = []
    try:
        for preset in args.preset or PRESETS:
            over = [*common, *train_over]
            layers = load_config(None, [*over, *args.overrides], preset).model.layers
            if layers[0] != pixels:  # e.g. another image size in the idx layout: the input layer follows the data
                over.append("model.layers=" + json.dumps([pixels, *layers[1:]]).replace(" ", ""))
            cfg = load_config(None, [*over, *args.overrides], preset)
            plans.append((preset, cfg, over))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if any(cfg.evaluate.umap for _, cfg, _ in plans) and importlib.util.find_spec("umap") is None:
        notes.append("UMAP not measured: umap-learn is not installed (`pip install umap-learn==0.5.12 numba==0.61.2`).")
    # Only now, with every config valid, is anything written under --root (a typo leaves no quick-data/).
    data_in = data
    if args.quick:
        from pipelines.sources import InputError

        try:
            subset = quick_subset(found, root / "quick-data")
        except InputError as exc:  # a damaged idx file: the same one line as `sae ingest` gives
            print(f"input error: {exc}", file=sys.stderr)
            return 2
        if subset:
            notes.insert(0, f"**`--quick` smoke check, not a measurement:** the first {QUICK_ROWS['train']:,} training and "
                            f"{QUICK_ROWS['test']:,} test images of `{data}`, copied by the script to `{root / 'quick-data'}`; "
                            f"{' '.join(QUICK)}.")
            data_in = root / "quick-data"
        else:
            notes.insert(0, f"**`--quick` smoke check, not a measurement:** {' '.join(QUICK)}.")

    done: list[dict] = []
    ingest = run_command([*sae(), "ingest", "data.source=mnist", f"data.input={data_in}", *common, *args.overrides], done)
    if ingest["rc"] != 0:
        return ingest["rc"]
    runs: list[dict] = []
    for preset, cfg, over in plans:
        step = run_command([*sae(), "train", "--preset", preset, *over, *args.overrides], done)
        out = step["output"] or {}
        runs.append({"preset": preset, "code": cfg.model.layers[-1], "loss": cfg.finetune.loss, "k_knn": cfg.evaluate.k_knn, "k_tw": cfg.evaluate.k_tw,
                     "rc": step["rc"], "seconds": step["seconds"], "run_id": out.get("run_id"),
                     "model_uri": out.get("model_uri"), "health": out.get("health"), "metrics": out.get("metrics")})
        # Written after every model, so a long run that is stopped still leaves its rows.
        text, doc = report(data, args, runs, done, notes)
        (root / "protocol.md").write_text(text, encoding="utf-8")
        (root / "protocol.json").write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    print()
    print(text)
    print(f"(written to {root / 'protocol.md'} and protocol.json)")
    return next((r["rc"] for r in runs if r["rc"] != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
