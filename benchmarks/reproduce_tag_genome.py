"""The talk's Tag Genome movie map, reproduced on the real slice (issue 22).

Ingests ``--input`` (default ``../shared/data/tag-genome-slice``: 177 complete movies x 1,128 tags)
once under ``--root``, trains each row of ``ROWS`` (a preset plus overrides, ``conf/local.yaml`` under
it) without MLflow, and scores every map on all the movies (the talk mapped every movie; the hash
split's 18 validation movies are too few for rank measures): the share of each movie's 5 nearest
that share a genre with it (``knn_label_share``), trustworthiness and continuity at k=12, the codes'
relative spread (``sae_model.health``), the run's health verdict, and seconds. PCA-2 and UMAP (when
umap-learn is installed; it is not a dependency) are scored the same way. Writes ``tag_genome.md``
and ``map.png`` (the first row's map with a few titles written on it) under ``--out``.

    .venv/bin/python benchmarks/reproduce_tag_genome.py --root /tmp/tg --out /tmp/tg/report
    .venv/bin/python benchmarks/reproduce_tag_genome.py --rows tag_genome --png docs/tag_genome_map.png
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from jobs.common import setup_logging
from pipelines.config import load_config
from pipelines.publish import table_uri
from sae_model import health
from sae_model.data import load_table
from sae_model.evaluation import (
    PCA,
    continuity,
    knn_label_share,
    read_label_sets,
    trustworthiness,
    umap_codes,
)
from sae_model.trainer import MlflowSettings, TrainingDiverged, train

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("reproduce_tag_genome")

# name -> (preset, overrides). The first row is drawn.
ROWS: dict[str, tuple[str, list[str]]] = {
    "tag_genome": ("tag_genome", []),
    "tag_genome_tsne": ("tag_genome_tsne", []),
    # The preset as it was before issue 22: mean-reduced L2 and PyTorch's default init.
    "talk, mean L2 (before)": (
        "tag_genome",
        ["pretrain.loss_reduction=mean", "finetune.loss_reduction=mean", "model.init=default",
         "pretrain.decoder_bias=default", "pretrain.linear_code_lr_scale=1.0"],
    ),
}
# Titles written on the map: two animations, two horror films, hero and SF films of the slice.
LABELLED = ["Toy Story (1995)", "Pocahontas (1995)", "Balto (1995)", "Casper (1995)", "Jumanji (1995)",
            "Copycat (1995)", "Dracula: Dead and Loving It (1995)", "From Dusk Till Dawn (1996)",
            "Vampire in Brooklyn (1995)", "Heat (1995)", "GoldenEye (1995)", "Judge Dredd (1995)",
            "Twelve Monkeys (a.k.a. 12 Monkeys) (1995)", "Sense and Sensibility (1995)"]
GROUPS = ["Animation", "Children", "Horror", "Sci-Fi", "Action", "Drama", "Comedy"]


def scores(x: np.ndarray, codes: np.ndarray, genres: list) -> dict[str, float]:
    return {
        "hit5": knn_label_share(codes, genres, 5),
        "trust": trustworthiness(x, codes, 12),
        "cont": continuity(x, codes, 12),
        "spread": health.relative_spread(codes),
    }


def train_row(root: str, name: str, preset: str, overrides: list[str]) -> tuple[np.ndarray | None, dict]:
    cfg = load_config(str(REPO / "conf/local.yaml"), [f"paths.root={root}", "train.progress=false", *overrides], preset)
    ids, x = load_table(table_uri(root, "features"), cfg.model.layers[0])
    t0 = time.perf_counter()
    try:
        result = train(
            cfg.model, cfg.pretrain, cfg.finetune, cfg.train, table_uri(root, "features"), table_uri(root, "items"),
            MlflowSettings("", enabled=False), Path(root) / "report-ckpt" / name.replace(" ", "_").replace(",", ""),
        )
    except (health.UnhealthyTraining, TrainingDiverged) as exc:
        return None, {"seconds": time.perf_counter() - t0, "health": f"stopped: {str(exc)[:160]}"}
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        codes = result.model.cpu().eval().encode(torch.from_numpy(x)).double().numpy()
    verdict = result.health if result.health == "ok" else "unhealthy: " + "; ".join(f.split(":")[1] for f in result.health_findings)
    return codes, {"seconds": seconds, "health": verdict}


def draw(path: Path, codes: np.ndarray, titles: list[str], genres: list, heading: str) -> None:
    """The map with movies coloured by their first genre among GROUPS and a few titles written on it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 6.2), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = dict(zip(GROUPS, ["#e6194b", "#f032e6", "#000000", "#4363d8", "#f58231", "#3cb44b", "#bfbf00"], strict=True))
    group = [next((g for g in GROUPS if g in s), "other") for s in genres]
    for g in [*GROUPS, "other"]:
        m = np.array([k == g for k in group])
        if m.any():
            ax.scatter(codes[m, 0], codes[m, 1], s=14, c=colours.get(g, "#c0c0c0"), label=f"{g} ({m.sum()})", alpha=0.8)
    for t in LABELLED:
        if t in titles:
            i = titles.index(t)
            ax.annotate(t.rsplit(" (", 1)[0][:28], codes[i], fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.legend(fontsize=7, loc="best", title="first of these genres", title_fontsize=7)
    ax.set_title(heading, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(REPO.parent / "shared/data/tag-genome-slice"))
    ap.add_argument("--root", default="/tmp/tg")
    ap.add_argument("--out", default=None, help="default: <root>/report")
    ap.add_argument("--png", default=None, help="also copy the map here (e.g. docs/tag_genome_map.png)")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), help=f"rows to train, of {list(ROWS)}")
    args = ap.parse_args()
    setup_logging(logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root, out = args.root, Path(args.out or f"{args.root}/report")
    if not (Path(root) / "features").exists():
        from jobs import ingest

        ingest.run(load_config(str(REPO / "conf/local.yaml"),
                               [f"paths.root={root}", "data.source=tag_genome", f"data.input={args.input}"]))
    ids, x = load_table(table_uri(root, "features"), 1128)
    genres, _ = read_label_sets(table_uri(root, "items"), ids)
    import pyarrow.parquet as pq

    items = pq.read_table(Path(root) / "items", columns=["item_id", "title"]).to_pandas().set_index("item_id")
    titles = items["title"].reindex(ids).fillna("").tolist()
    x64 = x.astype(np.float64)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, dict]] = []
    drawn = None
    for name in args.rows:
        preset, overrides = ROWS[name]
        codes, info = train_row(root, name, preset, overrides)
        if codes is not None and np.isfinite(codes).all():
            info.update(scores(x64, codes, genres))
            slug = name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
            np.savez(out / f"codes-{slug}.npz", ids=ids, codes=codes)
            draw(out / f"map-{slug}.png", codes, titles, genres, f"{name}: genre hit@5 {info['hit5']:.2f}, "
                 f"trustworthiness {info['trust']:.2f}")
            if drawn is None:
                drawn = (name, codes, info)
        rows.append((name, info))
        log.warning("%s: %s", name, info)
    t0 = time.perf_counter()
    pca = PCA(2).fit(x64).transform(x64)
    rows.append(("PCA-2", {**scores(x64, pca, genres), "seconds": time.perf_counter() - t0, "health": ""}))
    u = umap_codes(x64, x64, dim=2, seed=0)
    rows.append(("UMAP (umap-learn)", {**scores(x64, u[0], genres), "seconds": u[1], "health": ""} if u else
                 {"health": "not measured: umap-learn is not installed"}))
    lines = [f"{len(ids)} movies x {x.shape[1]} tags; every movie scored (genre hit: share of the 5 nearest sharing a genre)",
             "", "| map | genre hit@5 | trustworthiness@12 | continuity@12 | relative spread | health | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        def f(k: str, fmt: str = "{:.3f}", r: dict = r) -> str:
            return fmt.format(r[k]) if k in r else "–"
        lines.append(f"| {name} | {f('hit5')} | {f('trust')} | {f('cont')} | {f('spread', '{:.3g}')} | {r.get('health', '')} | "
                     f"{f('seconds', '{:.0f}')} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "tag_genome.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if drawn is not None:
        name, codes, info = drawn
        heading = (f"--preset {name} on the real slice ({len(ids)} movies): genre hit@5 {info['hit5']:.2f}, "
                   f"trustworthiness {info['trust']:.2f}")
        draw(out / "map.png", codes, titles, genres, heading)
        if args.png:
            draw(Path(args.png), codes, titles, genres, heading)
        print(f"map: {out / 'map.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
