"""The `sae` command line: options, positionals and key=value overrides in any order; the neighbours printer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import cli, neighbors


def _parse(argv: list[str]):
    """What `sae ARGV` hands its command (the command itself is not run)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[argv[0]].parse_intermixed_args(argv[1:])


@pytest.mark.parametrize(
    "argv",
    [
        ["neighbors", "--config", "conf/local.yaml", "toy story", "paths.root=out/tg", "--k", "5"],
        ["neighbors", "toy story", "--k", "5", "paths.root=out/tg", "--config", "conf/local.yaml"],
        ["neighbors", "paths.root=out/tg", "--k", "5", "toy story", "--config", "conf/local.yaml"],
        ["neighbors", "--k", "5", "paths.root=out/tg", "--config", "conf/local.yaml", "toy story"],
    ],
)
def test_neighbors_takes_query_options_and_overrides_in_any_order(argv):
    args = neighbors.split_query(_parse(argv))
    assert args.query == "toy story"
    assert args.overrides == ["paths.root=out/tg"]
    assert args.k == 5 and args.config == "conf/local.yaml"


def test_neighbors_needs_exactly_one_query(capsys):
    with pytest.raises(SystemExit) as exc:
        neighbors.split_query(_parse(["neighbors", "toy story", "jumanji", "paths.root=x"]))
    assert exc.value.code == 2
    assert "exactly one query" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "paths.root=/tmp/x", "--preset", "tag_genome", "--resume", "train.seed=3"],
        ["train", "--resume", "paths.root=/tmp/x", "train.seed=3", "--preset", "tag_genome"],
    ],
)
def test_every_command_mixes_options_and_overrides(argv):
    args = _parse(argv)
    assert args.overrides == ["paths.root=/tmp/x", "train.seed=3"]
    assert args.preset == "tag_genome" and args.resume is True


def test_infer_force_flag_and_overrides_in_any_order():
    args = _parse(["infer", "paths.root=/tmp/x", "--force", "infer.k=3"])
    assert args.force is True and args.overrides == ["paths.root=/tmp/x", "infer.k=3"]


def test_cli_main_dispatches_intermixed_arguments(monkeypatch):
    seen = {}
    monkeypatch.setattr(neighbors, "command", lambda args: seen.setdefault("args", args) and 0)
    assert cli.main(["neighbors", "paths.root=/tmp/x", "1234", "--k", "2"]) == 0
    args = neighbors.split_query(seen["args"])
    assert (args.query, args.overrides, args.k) == ("1234", ["paths.root=/tmp/x"], 2)


# ---------------------------------------------------------------- the printer, on every source's items


def _publish(root, items: pa.Table, pairs: list[tuple[int, int]]) -> None:
    (root / "items").mkdir(parents=True)
    (root / "neighbors").mkdir()
    pq.write_table(items, root / "items" / "part-0.parquet")
    nb = pa.table({
        "item_id": pa.array([a for a, _ in pairs], pa.int64()),
        "neighbor_id": pa.array([b for _, b in pairs], pa.int64()),
        "rank": pa.array(list(range(1, len(pairs) + 1)), pa.int32()),
        "distance": pa.array(np.linspace(0.5, 1.0, len(pairs)), pa.float32()),
    })
    pq.write_table(nb, root / "neighbors" / "part-0.parquet")


def test_printer_on_list_genres(tmp_path, capsys):
    # Tag Genome's items/ (as ingest writes it): genres is a list column.
    items = pa.table({
        "item_id": pa.array([1, 2, 3], pa.int64()),
        "title": ["Toy Story (1995)", "Jumanji (1995)", "Heat (1995)"],
        "genres": pa.array([["Animation", "Children"], ["Adventure", "Fantasy"], []], pa.list_(pa.string())),
    })
    _publish(tmp_path, items, [(1, 2), (1, 3)])
    assert neighbors.lookup(str(tmp_path), "toy story", k=5) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "nearest to 1: Toy Story (1995) [Animation, Children]"
    assert out[1].endswith("Jumanji (1995) [Adventure, Fantasy]") and " 1. " in out[1]
    assert out[2].endswith("d=1.0000  Heat (1995)")


def test_printer_on_joined_genres_labels_and_bare_ids(tmp_path, capsys):
    assert neighbors.describe({"item_id": 4, "title": "Sabrina", "genres": "Comedy|Romance"}) == "Sabrina [Comedy, Romance]"
    # MNIST's items/: a label and no title.
    labels = pa.table({"item_id": pa.array([10, 11], pa.int64()), "label": pa.array([7, 1], pa.int64())})
    _publish(tmp_path / "mnist", labels, [(10, 11)])
    assert neighbors.lookup(str(tmp_path / "mnist"), "10") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["nearest to 10: item 10 label 7", "    1.         11  d=0.5000  item 11 label 1"]
    # No metadata at all: bare ids.
    bare = pa.table({"item_id": pa.array([5, 6], pa.int64())})
    _publish(tmp_path / "bare", bare, [(5, 6)])
    assert neighbors.lookup(str(tmp_path / "bare"), "5") == 0
    assert capsys.readouterr().out.splitlines() == ["nearest to 5: item 5", "    1.          6  d=0.5000  item 6"]



def test_train_help_names_the_split_protocol_keys(capsys):
    # `sae train --help` is where a newcomer looks for keys: the split protocol's two were not listed.
    import dataclasses

    from pipelines.config import load_config

    with pytest.raises(SystemExit):
        _parse(["train", "--help"])
    text = capsys.readouterr().out
    block = text[text.index("  train.*"):text.index("  infer.*")]
    fields = {f.name for f in dataclasses.fields(load_config(None, []).train)}
    for key in ("seed", "val_fraction", "device", "split_column", "train_value"):
        assert key in block and key in fields, key


def test_printed_mlflow_ui_command_pastes_with_a_space_in_the_root(capsys):
    # `sae infer` under paths.root="/tmp/my run" printed `mlflow ui --backend-store-uri sqlite:////tmp/my
    # run/mlflow.db`, which the shell splits in two.
    import shlex

    from jobs.common import print_summary

    uri = "sqlite:////tmp/my run #1/mlflow.db"
    print_summary({"codes": "c", "items": 3, "code_width": 2, "neighbors": "n", "method": "exact",
                   "model_uri": "runs:/r/model", "run_id": "r", "model_version": None, "tracking_uri": uri})
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "mlflow ui" in ln)
    assert shlex.split(line.split("open the UI with: ", 1)[1]) == ["mlflow", "ui", "--backend-store-uri", uri]
