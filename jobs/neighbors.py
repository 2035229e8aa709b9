"""Look up an item's nearest neighbours in the published tables.

    sae neighbors "toy story" --k 5 --config conf/local.yaml
    sae neighbors 1234
"""

from __future__ import annotations

import argparse
import re
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from jobs.common import guarded, resolve, setup_logging
from pipelines.publish import Pinned, scored_pair
from pipelines.schemas import genre_names

DESCRIPTION = (
    "Print the nearest items to QUERY: an item id, or a case-insensitive piece of a title "
    "(candidates are listed when several titles match). Reads the published neighbors/ and items/."
)
MAX_CANDIDATES = 20
OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+=")  # paths.root=..., data.synthetic.seed=...


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help="an item id or part of a title")
    parser.add_argument("--k", type=int, default=None, help="show at most this many neighbours (default: all published)")


def _dataset(root: str, version: Pinned, table: str) -> ds.Dataset:
    from pyarrow import fs

    uri = version.uri(table)
    filesystem, path = fs.FileSystem.from_uri(uri)
    try:
        return ds.dataset(path, filesystem=filesystem, format="parquet")
    except (FileNotFoundError, OSError) as exc:
        raise SystemExit(f"no {table}/ table under {root}: run `sae infer` first ({exc})") from None


def find_item(items: pa.Table, query: str) -> tuple[int | None, pa.Table]:
    """(item id, candidates): the id when the query names one item, else the matching rows."""
    q = query.strip()
    if q.lstrip("-").isdigit():
        hit = items.filter(pc.equal(items.column("item_id"), int(q)))
        if hit.num_rows:
            return int(q), hit
    if "title" not in items.column_names:
        return None, items.slice(0, 0)
    titles = pc.utf8_lower(pc.fill_null(items.column("title"), ""))
    hits = items.filter(pc.match_substring(titles, q.lower()))
    if hits.num_rows == 1:
        return int(hits.column("item_id")[0].as_py()), hits
    exact = hits.filter(pc.equal(pc.utf8_lower(hits.column("title")), q.lower()))
    if exact.num_rows == 1:
        return int(exact.column("item_id")[0].as_py()), exact
    return None, hits.sort_by("title")


def describe(row: dict) -> str:
    """One line for an item of any source: its title (else ``item ID``), ``[genres]``, ``label L``."""
    parts = [str(row.get("title") or f"item {row['item_id']}")]
    genres = genre_names(row.get("genres"))
    if genres:
        parts.append(f"[{', '.join(genres)}]")
    if row.get("label") is not None:
        parts.append(f"label {row['label']}")
    return " ".join(parts)


def lookup(root: str, query: str, k: int | None = None) -> int:
    scores, ingest = scored_pair(root)  # the neighbours and the items they were computed from
    item_ds = _dataset(root, ingest, "items")
    cols = [c for c in ("item_id", "title", "genres", "label") if c in item_ds.schema.names]
    items = item_ds.to_table(columns=cols)
    item_id, rows = find_item(items, query)
    if item_id is None:
        if rows.num_rows == 0:
            print(f"no item matches {query!r}", file=sys.stderr)
            return 1
        print(f"{rows.num_rows} items match {query!r}; be more specific or give an id:")
        for r in rows.slice(0, MAX_CANDIDATES).to_pylist():
            print(f"  {r['item_id']:>10}  {describe(r)}")
        if rows.num_rows > MAX_CANDIDATES:
            print(f"  ... and {rows.num_rows - MAX_CANDIDATES} more")
        return 1
    nb = _dataset(root, scores, "neighbors").to_table(filter=ds.field("item_id") == item_id).sort_by("rank")
    if k is not None:
        nb = nb.slice(0, k)
    meta = {r["item_id"]: r for r in items.filter(pc.is_in(items.column("item_id"), nb.column("neighbor_id"))).to_pylist()}
    print(f"nearest to {item_id}: {describe(rows.to_pylist()[0])}")
    for r in nb.to_pylist():
        m = meta.get(r["neighbor_id"], {"item_id": r["neighbor_id"]})
        print(f"  {r['rank']:>3}. {r['neighbor_id']:>10}  d={r['distance']:.4f}  {describe(m)}")
    if nb.num_rows == 0:
        print("  (no neighbours published for this item)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.common import add_config_args

    parser = argparse.ArgumentParser(prog="sae neighbors", description=DESCRIPTION)
    add_arguments(parser)
    add_config_args(parser)
    return command(parser.parse_intermixed_args(argv))


def split_query(args: argparse.Namespace) -> argparse.Namespace:
    """Tell the query from the ``key=value`` overrides wherever the user put them: argparse hands the
    first positional to ``query``, so ``sae neighbors paths.root=out/tg "toy story"`` would search for
    ``paths.root=out/tg``. An override is a dotted ``section.key=`` word; exactly one other word must remain."""
    words = [args.query, *args.overrides]
    overrides = [w for w in words if OVERRIDE.match(w)]
    queries = [w for w in words if not OVERRIDE.match(w)]
    if len(queries) != 1:
        print(f"input error: give exactly one query (an item id or part of a title), got {queries}", file=sys.stderr)
        raise SystemExit(2)
    return argparse.Namespace(**{**vars(args), "query": queries[0], "overrides": overrides})


def command(args: argparse.Namespace) -> int:
    setup_logging()
    args = split_query(args)
    cfg = resolve(args)
    return lookup(cfg.paths.root, args.query, args.k)


if __name__ == "__main__":
    sys.exit(guarded(main))
