"""Issues 19 and 20's measurements on a real split, driving the trainer directly (no Spark).

Reads the four idx files of ``--data`` (60,000 training / 10,000 test images, pixels in [0, 1]),
trains 784-1000-500-250-{2,30} on the training images only (``Trainer`` with an in-memory source,
``train.val_fraction`` of them held out for the validation loss) and scores the test images with the
published protocol: a ``KNeighborsClassifier`` (k = 5 and 1) fitted on the training images' codes and
scored on the test images' codes; trustworthiness k = 5 on a seeded sample of 10,000 training images
and on the 10,000 test images (``sae_model.evaluation``: exact, blockwise); continuity k = 5 on the
test images; squared error per test image summed over the 784 pixels. The RBM-pretrained weights are
cached under ``--out`` so several fine-tunings can share them.

    python benchmarks/protocol_experiments.py --code 2 --eval-at 50,100,200 finetune.loss=umap ...
    python benchmarks/protocol_experiments.py --code 30 --pre-weight-decay 0.001 finetune.loss=bce ...
    python benchmarks/protocol_experiments.py --baselines pca umap          # PCA-2/30 and umap-learn

``--root ROOT --train-value V`` reads a published root instead (``features/``, and ``items/`` with
``label`` and ``split``; rows whose split is V train, all others are scored), e.g. the 20 Newsgroups
posts of ``sae ingest --preset news20`` with ``--hidden 500,250,125 --activation relu``;
``--pretrain none`` skips the layer-wise stage.

Each evaluation is appended to ``--out``/results.jsonl as one JSON object (the settings, epoch,
seconds and metrics). Used for docs/mnist_protocol_results.md and docs/news20_results.md;
``reproduce_protocol.py`` and ``reproduce_news20.py`` are the pipeline's own reproductions.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from sae_model.callbacks import Callback
from sae_model.config import FinetuneConfig, ModelConfig, PretrainConfig, TrainConfig
from sae_model.data import InMemorySource
from sae_model.evaluation import PCA, continuity, trustworthiness
from sae_model.placement import refine_codes
from sae_model.trainer import Trainer, build_model

log = logging.getLogger("protocol")


def load_split(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train (60000, 784) float32 in [0, 1], y_train int64, x_test, y_test), by the ingest's own idx reader."""
    from pipelines.sources.mnist import load

    parts = {p["split"]: p for p in load(str(data))[0]}
    out = []
    for split in ("train", "test"):
        out += [parts[split]["images"].astype(np.float32) / np.float32(255.0), parts[split]["labels"].astype(np.int64)]
    return tuple(out)


def load_published(root: Path, train_value: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x float32 (n, dim), labels (n,) str, training mask (n,) bool) of a published root, in the order of
    its features: the width from the ingest's manifest, labels by ``sae_model.data.read_labels``; training
    rows are those whose ``split`` is ``train_value`` (``sae_model.data.read_split``: DataError when none
    is). Also ``reproduce_news20.py``'s reader."""
    from sae_model.data import MANIFEST, load_table, read_labels, read_split, to_uri

    dim = json.loads((Path(root) / "features" / MANIFEST).read_text(encoding="utf-8"))["dim"]
    ids, x = load_table(to_uri(Path(root) / "features"), dim)
    items = to_uri(Path(root) / "items")
    train = np.isin(ids, read_split(items, "split", train_value, 0.0).train_ids)
    return x, read_labels(items, ids).astype(str), train


def load_root(root: Path, train_value: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of a published root (:func:`load_published`); every row that is
    not a training row is a test row."""
    x, y, train = load_published(root, train_value)
    return x[train], y[train], x[~train], y[~train]


class _Neighbourhoods:
    """Input-space distances of one fixed sample (float32 n x n, self at +inf), computed once, so each of
    the many intermediate scorings of a run costs seconds: trustworthiness and continuity (Venna &
    Kaski, as ``sae_model.evaluation``) from them and the codes. Distances in float32 rather than the
    exact float64 of ``sae_model.evaluation``: ties within float32 rounding may rank differently
    (checked against it on the final models: ``--exact``)."""

    def __init__(self, x: np.ndarray, k: int, block: int = 500) -> None:
        xt = torch.from_numpy(x)
        sq = (xt * xt).sum(1)
        d = (sq[:, None] + sq[None, :] - 2.0 * (xt @ xt.T)).clamp_min_(0)
        d.fill_diagonal_(float("inf"))
        self.d, self.k, self.block, self.n = d, k, block, len(x)
        self.knn = torch.topk(d, k, dim=1, largest=False).indices

    def _penalty(self, rank_d: torch.Tensor | None, codes: torch.Tensor, nn: torch.Tensor) -> float:
        total = 0
        for s in range(0, self.n, self.block):
            if rank_d is None:  # code space ranks: distances of this block to all codes
                dr = torch.cdist(codes[s : s + self.block], codes).pow_(2)
                dr[torch.arange(dr.shape[0]), torch.arange(s, s + dr.shape[0])] = float("inf")
            else:
                dr = rank_d[s : s + self.block]
            j = nn[s : s + self.block]
            dj = dr.gather(1, j)
            rank = 1 + (dr[:, None, :] < dj[:, :, None]).sum(2)
            total += int((rank - self.k).clamp_min(0).sum())
        return float(total)

    def scores(self, codes: np.ndarray) -> tuple[float, float]:
        """(trustworthiness, continuity) at k of ``codes`` (n x c) against the sample."""
        z = torch.from_numpy(np.ascontiguousarray(codes, np.float64))
        n, k = self.n, self.k
        zd = torch.cdist(z, z).pow_(2)
        zd.fill_diagonal_(float("inf"))
        code_nn = torch.topk(zd, k, dim=1, largest=False).indices
        norm = 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0))
        trust = 1.0 - norm * self._penalty(self.d, z, code_nn)
        cont = 1.0 - norm * self._penalty(zd, z, self.knn)
        return trust, cont


class Scorer:
    """The protocol's measures of one model (or of given codes) on a fixed split."""

    def __init__(self, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, max_items: int = 10000,
                 exact: bool = False, place: bool = False) -> None:
        self.x_tr, self.y_tr, self.x_te, self.y_te = x_tr, y_tr, x_te, y_te
        self.sample = np.sort(np.random.default_rng(0).choice(len(x_tr), size=min(max_items, len(x_tr)), replace=False))
        self.exact = exact
        self.place = place
        self.nb_tr = self.nb_te = None

    def codes(self, codes_tr: np.ndarray, codes_te: np.ndarray, recon_te: np.ndarray | None = None) -> dict[str, float]:
        from sklearn.neighbors import KNeighborsClassifier

        t0 = time.perf_counter()
        out: dict[str, float] = {}
        for k in (5, 1):
            clf = KNeighborsClassifier(n_neighbors=k).fit(codes_tr, self.y_tr)
            out[f"knn{k}"] = float(clf.score(codes_te, self.y_te))
        if self.exact:
            out["trust_train"] = trustworthiness(self.x_tr[self.sample], codes_tr[self.sample], k=5)
            out["trust_test"] = trustworthiness(self.x_te, codes_te, k=5)
            out["cont_test"] = continuity(self.x_te, codes_te, k=5)
        else:
            if self.nb_tr is None:
                self.nb_tr, self.nb_te = _Neighbourhoods(self.x_tr[self.sample], 5), _Neighbourhoods(self.x_te, 5)
            out["trust_train"], out["cont_train"] = self.nb_tr.scores(codes_tr[self.sample])
            out["trust_test"], out["cont_test"] = self.nb_te.scores(codes_te)
        if recon_te is not None:
            out["sq_error"] = float(((recon_te.astype(np.float64) - self.x_te) ** 2).sum(1).mean())
        out["score_seconds"] = time.perf_counter() - t0
        return out

    @torch.no_grad()
    def model(self, model: torch.nn.Module) -> dict[str, float]:
        m = model.eval()

        def enc(x: np.ndarray) -> np.ndarray:
            return torch.cat([m.encode(torch.from_numpy(x[s : s + 4096])) for s in range(0, len(x), 4096)]).float().numpy()

        codes_te = enc(self.x_te)
        recon = m.decode(torch.from_numpy(codes_te)).numpy()
        codes_tr = enc(self.x_tr)
        out = self.codes(codes_tr, codes_te, recon)
        if self.place:  # the test codes refined against the training map, as `infer.placement=refine`
            t0 = time.perf_counter()
            placed = self.codes(codes_tr, refine_codes(self.x_te, codes_te, self.x_tr, codes_tr))
            out.update({f"placed_{k}": v for k, v in placed.items() if k in ("knn5", "knn1", "trust_test", "cont_test")})
            out["placed_seconds"] = time.perf_counter() - t0
        m.train()
        return out


class _NoCheckpoint(Trainer):
    """Experiments are not resumed: skip the per-epoch checkpoint (tens of MB a step here). The global
    neighbour graph is cached under ``graph_cache`` (its build is the exact kNN of all training rows,
    minutes at 60,000), keyed by the settings that shape it."""

    graph_cache: Path | None = None

    def save(self, stage, epoch, finished=False) -> None:  # noqa: ANN001
        pass

    def _graph(self):  # noqa: ANN202
        if self.graph is not None or not self.fine.uses_global_graph or self.graph_cache is None:
            return super()._graph()
        f = self.fine
        key = hashlib.sha1(repr((f.loss, f.n_neighbors, f.perplexity, self.source.n_train)).encode()).hexdigest()[:10]
        path = self.graph_cache / f"graph-{key}.pt"
        if path.exists():
            from sae_model.neighbor_graph import NeighbourGraph

            g = self.graph = NeighbourGraph.from_joint(torch.load(path), self.device)
            log.info("neighbour graph from %s (%d edges)", path, g.n_edges)
            return g
        g = super()._graph()
        torch.save(g.joint, path)
        return g


class _EvalAt(Callback):
    def __init__(self, at: set[int], fn) -> None:  # noqa: ANN001
        self.at, self.fn = at, fn

    def on_epoch_end(self, trainer, stage, record) -> None:  # noqa: ANN001
        if stage.kind == "finetune" and record.epoch + 1 in self.at:
            self.fn(trainer, record.epoch + 1)


def table(rows: list[dict]) -> str:
    """The results file's rows as one Markdown table (method, 5-NN, 1-NN, trust train/test, continuity,
    squared error, fit seconds)."""
    cols = [("method", "{}"), ("epoch", "{}"), ("knn5", "{:.3f}"), ("knn1", "{:.3f}"), ("trust_train", "{:.3f}"),
            ("trust_test", "{:.3f}"), ("cont_test", "{:.3f}"), ("sq_error", "{:.2f}"), ("fit_seconds", "{:.0f}")]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        r = dict(row, method=row.get("method") or row.get("tag"))
        lines.append("| " + " | ".join(f.format(r[c]) if r.get(c) is not None else "-" for c, f in cols) + " |")
    return "\n".join(lines)


def parse_overrides(pairs: list[str], cls: type) -> dict:
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    out = {}
    for p in pairs:
        key, val = p.split("=", 1)
        key = key.removeprefix("finetune.")
        if key not in types:
            raise SystemExit(f"config error: finetune.{key}: unknown key")
        t = str(types[key])
        out[key] = int(val) if t == "int" else float(val) if t == "float" else val
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("/work/shared/data/mnist"))
    p.add_argument("--root", type=Path, default=None,
                   help="a published root (features/ + items/ with label and split) instead of --data's idx files")
    p.add_argument("--train-value", default="train", help="with --root: the split value of the training rows")
    p.add_argument("--hidden", default="1000,500,250", help="hidden widths between the input and the code")
    p.add_argument("--pre-lr", type=float, default=0.1)
    p.add_argument("--activation", default="sigmoid", help="model.activation of the hidden layers")
    p.add_argument("--output-activation", default="sigmoid", help="model.output_activation")
    p.add_argument("--pre-optimizer", default="sgd")
    p.add_argument("--pre-visible", default="model", help="pretrain.rbm_visible: model or constrained_poisson")
    p.add_argument("--pre-count-scale", type=float, default=1.0, help="pretrain.rbm_count_scale")
    p.add_argument("--out", type=Path, default=Path("/tmp/proto"))
    p.add_argument("--tag", default="")
    p.add_argument("--code", type=int, default=2)
    p.add_argument("--pretrain", default="rbm")
    p.add_argument("--pre-epochs", type=int, default=15)
    p.add_argument("--pre-weight-decay", type=float, default=0.0)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--eval-at", default="", help="fine-tuning epochs after which to score (the last always is)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--init", type=Path, default=None,
                   help="start fine-tuning from this state dict (a model-TAG-EPOCH.pt of --out), not from pretraining")
    p.add_argument("--place", action="store_true",
                   help="also score the test codes refined against the training map (sae_model.placement)")
    p.add_argument("--exact", action="store_true", help="trust/continuity by sae_model.evaluation (float64, slow)")
    p.add_argument("--rows", type=int, default=0, help="smoke check: only the first ROWS training/test images")
    p.add_argument("--baselines", nargs="*", default=None, help="pca and/or umap: score them and stop")
    p.add_argument("--table", action="store_true", help="print --out's results as a Markdown table and stop")
    p.add_argument("overrides", nargs="*", metavar="finetune.key=value")
    args = p.parse_args()
    if args.table:
        print(table([json.loads(line) for line in (args.out / "results.jsonl").read_text().splitlines() if line]))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    x_tr, y_tr, x_te, y_te = load_root(args.root, args.train_value) if args.root else load_split(args.data)
    if args.rows:
        x_tr, y_tr, x_te, y_te = x_tr[: args.rows], y_tr[: args.rows], x_te[: args.rows], y_te[: args.rows]
    scorer = Scorer(x_tr, y_tr, x_te, y_te, exact=args.exact, place=args.place)

    def record(row: dict) -> None:
        log.info("%s", row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")

    if args.baselines is not None:
        for b in args.baselines:
            if b == "pca":
                t0 = time.perf_counter()
                pca = PCA(args.code).fit(x_tr)
                fit = time.perf_counter() - t0
                c_te = pca.transform(x_te)
                record({"method": f"pca-{args.code}", "fit_seconds": fit,
                        **scorer.codes(pca.transform(x_tr), c_te, pca.inverse_transform(c_te))})
            elif b == "umap":
                import umap  # type: ignore[import-not-found]

                t0 = time.perf_counter()
                red = umap.UMAP(n_components=args.code, random_state=0).fit(x_tr)
                fit = time.perf_counter() - t0
                t1 = time.perf_counter()
                c_te = red.transform(x_te)
                record({"method": f"umap-learn-{args.code}", "fit_seconds": fit, "transform_seconds": time.perf_counter() - t1,
                        **scorer.codes(red.embedding_, c_te)})
        return

    layers = [x_tr.shape[1], *(int(w) for w in args.hidden.split(",") if w), args.code]
    device = torch.device("cpu")
    tc = TrainConfig(seed=0, val_fraction=args.val_fraction, progress=False, auto_resume=False)
    source = InMemorySource(np.arange(len(x_tr), dtype=np.int64), x_tr, args.val_fraction, device)
    pre = PretrainConfig(method=args.pretrain, epochs=args.pre_epochs, lr=args.pre_lr, momentum=0.9, batch_size=100,
                         weight_decay=args.pre_weight_decay, optimizer=args.pre_optimizer, rbm_visible=args.pre_visible,
                         rbm_count_scale=args.pre_count_scale)
    mc = ModelConfig(layers=layers, activation=args.activation, output_activation=args.output_activation)
    # The root and a non-default model enter the key only when given. (The pretraining settings'
    # repr gained pretrain.rbm_visible and rbm_count_scale on 2026-12-01: caches from before are not
    # found, and rebuilt.)
    extra = ((str(args.root),) if args.root else ()) + ((mc,) if mc != ModelConfig(layers=layers) else ())
    key = hashlib.sha1(repr((layers, pre, args.val_fraction, args.rows, *extra)).encode()).hexdigest()[:10]
    cache = args.out / f"pre-{key}.pt"
    model = build_model(mc, 0)
    if cache.exists():
        model.load_state_dict(torch.load(cache))
        pre_seconds = json.loads(cache.with_suffix(".json").read_text())["seconds"]
        log.info("pretrained weights from %s (%.0f s)", cache, pre_seconds)
    else:
        t0 = time.perf_counter()
        _NoCheckpoint(model, pre, FinetuneConfig(epochs=0), tc, source, device, args.out / "ck").fit()
        pre_seconds = time.perf_counter() - t0
        torch.save(model.state_dict(), cache)
        cache.with_suffix(".json").write_text(json.dumps({"seconds": pre_seconds, "pre": repr(pre)}))
    if args.init is not None:
        model.load_state_dict(torch.load(args.init))
        settings_init = str(args.init)
        log.info("fine-tuning starts from %s", args.init)
    else:
        settings_init = None
    fine = FinetuneConfig(**parse_overrides(args.overrides, FinetuneConfig))
    at = {int(e) for e in args.eval_at.split(",") if e} | {fine.epochs}
    t_start = time.perf_counter()
    scoring = [0.0]
    settings = {"tag": args.tag, "code": args.code, "layers": layers, "activation": args.activation, "root": str(args.root) if args.root else None, "pre": f"{args.pretrain} {args.pre_epochs} wd {args.pre_weight_decay}" + (f" {args.pre_visible} x{args.pre_count_scale:g}" if args.pre_visible != "model" else ""),
                "overrides": args.overrides, "init": settings_init, "val_fraction": args.val_fraction, "threads": torch.get_num_threads()}

    def evaluate(tr: Trainer, epoch: int) -> None:
        t0 = time.perf_counter()
        fit_s = t0 - t_start - scoring[0]
        metrics = scorer.model(tr.model)
        scoring[0] += time.perf_counter() - t0
        torch.save(tr.model.state_dict(), args.out / f"model-{args.tag or key}-{epoch}.pt")
        record({**settings, "epoch": epoch, "pretrain_seconds": pre_seconds, "finetune_seconds": fit_s,
                "fit_seconds": pre_seconds + fit_s, **metrics})

    tr = _NoCheckpoint(model, PretrainConfig(method="none"), fine, tc, source, device, args.out / "ck",
                       callbacks=[_EvalAt(at, evaluate)])
    tr.graph_cache = args.out
    tr.fit()


if __name__ == "__main__":
    main()
