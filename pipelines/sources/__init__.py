"""Ingest sources. Each turns raw input into a :class:`SourceResult`; the ingest core
(``pipelines.ingest``) validates it, writes the manifest and publishes the tables atomically.

A source module registers itself in :data:`SOURCES` by name (``data.source``) with two functions:

``check(cfg) -> None``
    Cheap checks before Spark starts (files exist, headers are right); raise
    :class:`InputError` naming the file and what was expected.
``read(spark, cfg) -> SourceResult``
    Pure Spark transforms from the input to the three DataFrames. No writing here.
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
    # item_id long (unique), features array<float> of width len(feature_names)
    features: DataFrame
    # item_id long + whatever metadata the source has (title, genres, label, ...)
    items: DataFrame
    # source_file string, raw string, reason string (pipelines.schemas.QUARANTINE)
    quarantine: DataFrame
    feature_names: list[str]
    input_files: list[str]
    # Extra manifest entries a source wants to record (e.g. vocabulary size, since-date).
    extra: dict[str, Any] = field(default_factory=dict)
    # Tables beyond the three that this source publishes with them (e.g. incremental state).
    extra_tables: dict[str, DataFrame] = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    check: Callable[[Any], None]
    read: Callable[[Any, Any], SourceResult]


SOURCES: dict[str, Source] = {}


def register(name: str, check: Callable[[Any], None], read: Callable[[Any, Any], SourceResult]) -> None:
    SOURCES[name] = Source(check=check, read=read)
