"""Ingest sources. Each turns raw input into a :class:`SourceResult`; the ingest core
(``pipelines.ingest``) validates it, writes the manifest and publishes the tables atomically.

A source module registers itself in :data:`SOURCES` by name (``data.source``) with two functions:

``check(cfg) -> None``
    Cheap checks before Spark starts (files exist, headers are right); raise
    :class:`InputError` naming the file and what was expected.
``read(spark, cfg) -> SourceResult``
    Pure Spark transforms from the input to the three DataFrames. No writing here.

Counting contract: every input record a source considers is either used (it went into a feature
vector) or sent to ``quarantine`` with a reason, so ``rows_in() == rows_used() + rows in
quarantine``; the core checks this before publishing anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import DataFrame


class InputError(ValueError):
    """The input is missing or not in the expected format; the message names the file."""


@dataclass
class SourceResult:
    """What a source's ``read`` returns: the ``features``, ``items`` and ``quarantine`` DataFrames (schemas in
    the comments below), feature names, input files, row counters and extra manifest entries and tables."""

    # item_id long (unique), features array<float> of width len(feature_names)
    features: DataFrame
    # item_id long + whatever metadata the source has (title, genres, label, ...)
    items: DataFrame
    # source_file string, raw string, reason string (pipelines.schemas.QUARANTINE)
    quarantine: DataFrame
    feature_names: list[str]
    input_files: list[str]
    # Input records considered. Called after the tables are written, so a source can answer
    # from state it cached while they were computed instead of reading its input again.
    rows_in: Callable[[], int]
    # Input records that went into feature vectors; None = one record per output item.
    rows_used: Callable[[], int] | None = None
    # Extra manifest entries a source wants to record (e.g. vocabulary size, since-date).
    extra: dict[str, Any] = field(default_factory=dict)
    # Manifest entries counted once the tables are written (e.g. items without metadata).
    report: Callable[[], dict[str, Any]] | None = None
    # Tables beyond the three that this source publishes with them (e.g. incremental state).
    extra_tables: dict[str, DataFrame] = field(default_factory=dict)
    # Called once the job is over (published or failed): unpersist caches, delete temp files.
    cleanup: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Source:
    """A registered ingest source: ``check(cfg)`` checks the input before any output is touched (raises
    ``InputError``), ``read(spark, cfg)`` builds its ``SourceResult``."""

    check: Callable[[Any], None]
    read: Callable[[Any, Any], SourceResult]


SOURCES: dict[str, Source] = {}


def register(name: str, check: Callable[[Any], None], read: Callable[[Any, Any], SourceResult]) -> None:
    """Register ``check`` and ``read`` as the source ``data.source=name`` selects, replacing any earlier one
    of that name."""
    SOURCES[name] = Source(check=check, read=read)
