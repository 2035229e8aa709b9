"""Hinton & Salakhutdinov's (2006) document maps on the real 20 Newsgroups posts: one table of the
autoencoder's 2-D map and 10-D code beside LSA, PCA and UMAP, scored on the test posts.

    sae ingest --preset news20 data.input=../shared/data/news20/20news-bydate.tar.gz paths.root=out/news20
    sae train  --preset news20 paths.root=out/news20 train.threads=1       # the 2-D map
    sae train  --preset news20 paths.root=out/news20 train.threads=1 'model.layers=[2000,500,250,125,10]'
    python benchmarks/reproduce_news20.py out/news20 --ae2 runs:/<2-D run>/model --ae10 runs:/<10-D run>/model

Every method is fitted on the training posts only (``items/`` split ``20news-bydate-train``) and
scored on the test posts: 5-NN accuracy of the newsgroup (``knn_classifier_accuracy``: scikit-learn's
kNN classifier fitted on the training posts' codes, every test post), trustworthiness at k = 5 and 12 against the
posts' vectors on a seeded sample of ``--sample`` test posts (its input distances cost n^2 x 2,000), and Hinton's retrieval measure (``sae_model.evaluation.retrieval_precision``: the
share of same-group training posts among a test post's nearest training posts at each recall level).
"AE-2 placed" is the 2-D map with the test posts' codes refined against the training posts' map
(``sae_model.placement.refine_codes``, umap-learn's ``transform`` started from the encoder's codes).
LSA is the truncated SVD of the tf-idf of the features (log(1 + count) as the term frequency); PCA
and UMAP (umap-learn, when installed) work on the features themselves. ``--ae2``/``--ae10`` take a model URI (``runs:/``,
``models:/``; the tracking store is ``<root>/mlflow.db``) or a saved-model directory; a row is left
out when its model is not given.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# The published root's reader shared with the harness (this script's folder is on sys.path when run).
from protocol_experiments import load_published
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfTransformer

from sae_model.evaluation import (
    PCA,
    knn_classifier_accuracy,
    retrieval_precision,
    trustworthiness,
    umap_codes,
)
from sae_model.placement import refine_split

log = logging.getLogger("reproduce_news20")
TRAIN = "20news-bydate-train"
RECALL = (0.001, 0.01, 0.05, 0.1, 0.2, 0.5)


def ae_method(uri: str, root: str) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], float | None]:
    """Codes of all posts from the trained model at ``uri`` (it saw only the training posts), and its
    training's seconds as ``sae train`` logged them (``ae_fit_seconds`` of its run; None for a saved-model
    directory or a run without it)."""
    import mlflow

    from sae_model.loading import load_encoder

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    encoder = load_encoder(uri)
    seconds = None
    if not Path(uri).is_dir():
        run_id = mlflow.models.get_model_info(uri).run_id
        seconds = mlflow.MlflowClient().get_run(run_id).data.metrics.get("ae_fit_seconds") if run_id else None
    return (lambda x, train: encoder.encode(x.astype(np.float32)).astype(np.float64)), seconds


def lsa_method(dim: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def fit(x: np.ndarray, train: np.ndarray) -> np.ndarray:
        # tf = the features (log(1 + count), sublinear tf); tf-idf rows are L2-normalised, so a
        # normalised ingest (data.text.normalize) gives the same LSA.
        tfidf = TfidfTransformer().fit(x[train])
        svd = TruncatedSVD(dim, random_state=0).fit(tfidf.transform(x[train]))
        return svd.transform(tfidf.transform(x))

    return fit


def pca_method(dim: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return lambda x, train: PCA(dim).fit(x[train]).transform(x)


def umap_method(dim: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    def fit(x: np.ndarray, train: np.ndarray) -> np.ndarray:
        out = umap_codes(x[train], x, dim=dim, seed=0)
        if out is None:
            raise RuntimeError("umap-learn is not installed")
        return out[0]

    try:
        import umap  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return None
    return fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--ae2", help="the 2-D map's model URI or saved-model directory")
    ap.add_argument("--ae10", help="the 10-D code's model URI or saved-model directory")
    ap.add_argument("--methods", nargs="+", default=["AE-2", "AE-2 placed", "AE-10", "LSA-2", "LSA-10", "PCA-2", "PCA-10", "UMAP-2"])
    ap.add_argument("--recall", type=float, nargs="+", default=list(RECALL))
    ap.add_argument("--sample", type=int, default=2000, help="test posts (seeded) for trustworthiness")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    x, y, train = load_published(Path(args.root), TRAIN)
    test = ~train
    rng = np.random.default_rng(0)
    test_idx = np.flatnonzero(test)
    sample = np.sort(rng.choice(test_idx, size=min(args.sample, test_idx.size), replace=False))
    print(f"{train.sum()} training / {test.sum()} test posts, {x.shape[1]} words; trustworthiness on {sample.size}")
    methods = {
        "LSA-2": lsa_method(2), "LSA-10": lsa_method(10), "PCA-2": pca_method(2), "PCA-10": pca_method(10),
        "UMAP-2": umap_method(2),
    }
    # The autoencoders were trained by `sae train`: their fit seconds are that training's, not the encoding's.
    trained = {name: ae_method(uri, args.root) for name, uri in (("AE-2", args.ae2), ("AE-10", args.ae10)) if uri}
    methods.update({name: fn for name, (fn, _) in trained.items()})
    if "AE-2" in trained:
        # The test posts' codes refined against the training posts' map, as umap-learn's transform
        # places new points (sae_model.placement); "fit s" adds the placement's seconds to the training's.
        encode2 = trained["AE-2"][0]
        methods["AE-2 placed"] = lambda x, train: refine_split(x, encode2(x, train), train).astype(np.float64)
    recall = "|".join(f" P@R={r:g} " for r in args.recall)
    print(f"| method | 5-NN accuracy | trust k=5 | trust k=12 |{recall}| fit s |")
    print("|---|---|---|---|" + "---|" * len(args.recall) + "---|")
    xs = x[sample].astype(np.float64)
    for name in args.methods:
        fit = methods.get(name)
        if fit is None:
            print(f"| {name} | (no model given, or not installed) |")
            continue
        t0 = time.perf_counter()
        codes = fit(x, train)
        secs = time.perf_counter() - t0
        model = name.removesuffix(" placed")  # a placed map: its model's training plus the placement
        if model in trained:
            ae_s = trained[model][1]
            secs = None if ae_s is None else ae_s + (secs if model != name else 0.0)
        acc = knn_classifier_accuracy(codes[train], y[train], codes[test], y[test], k=5)
        t1 = time.perf_counter()
        tw = [trustworthiness(xs, codes[sample], k=k) for k in (5, 12)]
        t2 = time.perf_counter()
        prec = retrieval_precision(codes[test], y[test], codes[train], y[train], args.recall)
        fit_s = "-" if secs is None else f"{secs:.0f}"
        log.info("%s: fit %s s, kNN and trustworthiness %.0f s, retrieval %.0f s", name, fit_s, t2 - t1,
                 time.perf_counter() - t2)
        cells = " | ".join(f"{prec[r]:.3f}" for r in args.recall)
        print(f"| {name} | {acc:.3f} | {tw[0]:.3f} | {tw[1]:.3f} | {cells} | {fit_s} |", flush=True)


if __name__ == "__main__":
    main()
