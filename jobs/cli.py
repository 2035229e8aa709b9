"""The `sae` console command: one subcommand per stage."""

from __future__ import annotations

import argparse
import importlib
import sys

from jobs.common import KEYS_HELP, add_config_args, guarded
from pipelines.config import SOURCES, presets

# subcommand -> (module under jobs/, one-line help). Each module has DESCRIPTION and command(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("jobs.ingest", "raw data -> validated Parquet feature vectors"),
    "train": ("jobs.train", "pretrain + fine-tune the autoencoder on features/, log to MLflow"),
    "infer": ("jobs.infer", "score every item, publish codes/ and neighbors/, draw the maps"),
    "map": ("jobs.map", "redraw map.html and map.png from the published codes/ without scoring again"),
    "neighbors": ("jobs.neighbors", "print the nearest items to a title or id"),
    "run": ("jobs.run", "ingest -> train -> infer in one command"),
    "nightly": ("jobs.nightly", "scheduled retraining: ingest, train, compare, promote, publish, report"),
    "rollback": ("jobs.rollback", "restore the previous champion and its codes/ and neighbors/"),
    "evaluate": ("jobs.evaluate", "score a trained map against PCA on the held-out items (test split or validation), log to MLflow"),
    "sweep": ("jobs.sweep", "grid or random search over config keys as MLflow child runs; print the best"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae",
        description="Learn 2-D maps of high-dimensional data with a stacked autoencoder, on Spark.",
        epilog="Run `sae COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name,
            help=help_,
            description=getattr(mod, "DESCRIPTION", help_),
            epilog=KEYS_HELP.format(sources=", ".join(SOURCES), presets=", ".join(presets())),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
        add_config_args(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``sae COMMAND ...``. A command's options, positionals and ``key=value`` overrides may come in
    any order (``parse_intermixed_args``); argparse refuses intermixed parsing across subparsers, so
    the command's own parser reads everything after the command name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
        args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)  # help, or the error listing the commands
    return guarded(lambda: args._module.command(args), argv)


if __name__ == "__main__":
    sys.exit(main())
