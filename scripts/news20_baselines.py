"""Baselines for the 20 Newsgroups document map: LSA (truncated SVD of tf-idf) and PCA codes of the
ingested posts, scored on the test posts as issue 20 asks -- 5-NN accuracy of the newsgroup with the
kNN fitted on the training posts' codes, and trustworthiness (k=12) on a seeded sample of test posts.

    sae ingest --preset news20 data.input=../shared/data/news20/20news-bydate.tar.gz paths.root=out/news20
    python scripts/news20_baselines.py out/news20 [--dims 2 10] [--sample 2000]

Reads features/ and items/ (split and label) under the root; expects weighting=log1p (the preset).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow.parquet as pq
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.neighbors import KNeighborsClassifier

from sae_model.evaluation import trustworthiness


def load(root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    feats = pq.read_table(f"{root}/features").to_pandas()
    items = pq.read_table(f"{root}/items", columns=["item_id", "label", "split"]).to_pandas()
    df = feats.merge(items, on="item_id")
    x = np.stack(df["features"].to_numpy()).astype(np.float64)
    return x, df["label"].to_numpy(), df["split"].str.endswith("train").to_numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 10])
    ap.add_argument("--sample", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    x, y, train = load(args.root)
    counts = np.expm1(x)  # log1p inputs back to counts for tf-idf
    rng = np.random.default_rng(args.seed)
    test_idx = np.flatnonzero(~train)
    sample = rng.choice(test_idx, size=min(args.sample, test_idx.size), replace=False)
    print(f"{train.sum()} training / {(~train).sum()} test posts, {x.shape[1]} words")
    print("| method | dim | 5-NN test accuracy | trustworthiness (k=12) | fit s |")
    print("|---|---|---|---|---|")
    for dim in args.dims:
        t = time.perf_counter()
        tfidf = TfidfTransformer().fit(counts[train])
        svd = TruncatedSVD(dim, random_state=args.seed).fit(tfidf.transform(counts[train]))
        lsa = svd.transform(tfidf.transform(counts))
        t_lsa = time.perf_counter() - t
        t = time.perf_counter()
        pca = PCA(dim, random_state=args.seed).fit(x[train]).transform(x)
        t_pca = time.perf_counter() - t
        for name, codes, secs in (("LSA (tf-idf SVD)", lsa, t_lsa), ("PCA (log1p)", pca, t_pca)):
            knn = KNeighborsClassifier(5).fit(codes[train], y[train])
            acc = float((knn.predict(codes[~train]) == y[~train]).mean())
            tw = trustworthiness(x[sample], codes[sample], k=12)
            print(f"| {name} | {dim} | {acc:.3f} | {tw:.3f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
