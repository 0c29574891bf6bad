"""The processed-dataset Asset, defined once, and which dataset version a training run trains.

`sdxl_dataset_prepare` emits an event on the Asset whose extra names the version it prepared;
`sdxl_lora_train` is scheduled on the Asset or its cron. A run trains, in this order: the version
its `dataset_version` Param names; the version its triggering Asset event names; the version of
its logical date (one version per date, so backfills train each). Never "the newest" version in
S3: what a run trains follows from the run alone. A scheduled or backfill run whose date has no
prepared version is skipped, with the reason in its log, because a cron firing before any dataset
exists is not a failure; any other missing version is an error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowSkipException

from sdxl_lora.settings import Settings

VERSION_PATTERN = r"^[A-Za-z0-9._-]+$"
SCHEDULED_RUN_TYPES = ("scheduled", "backfill")


def processed_dataset(settings: Settings) -> Asset:
    """proc_dataset/ of the configured bucket and prefix; each event's extra names its version."""
    return Asset(name="sdxl_processed_dataset", uri=settings.uri("proc_dataset"),
                 extra={"layout": "proc_dataset/<version>/"})


class DatasetVersionError(ValueError):
    """No usable dataset version for a run that must have one; the message says why."""


@dataclass(frozen=True)
class VersionChoice:
    version: str
    source: str  # where the version came from, for the log
    skip_when_missing: bool  # a scheduled or backfill run whose date has no prepared version


def choose_version(requested: str | None, events: Sequence, run_type: str, run_date: str) -> VersionChoice:
    """The version a run trains. events: its triggering events on the processed-dataset Asset
    (objects with `extra` and `timestamp`); several are coalesced into one run: it trains the latest."""
    if requested:
        return VersionChoice(_checked(requested, "the dataset_version Param"), "the dataset_version Param", False)
    if events:
        latest = max(events, key=lambda event: event.timestamp)
        source = f"the triggering Asset event of {latest.timestamp.isoformat()}"
        version = (latest.extra or {}).get("version")
        if not isinstance(version, str):
            raise DatasetVersionError(f"{source} names no version (its extra is {latest.extra!r}); "
                                      "sdxl_dataset_prepare's publish task sets {'version': ...}")
        others = sorted({(e.extra or {}).get("version") for e in events if e is not latest} - {version}, key=str)
        if others:
            source += (f"; earlier events of this run named {', '.join(map(str, others))}: trigger with "
                       "dataset_version to train them")
        return VersionChoice(_checked(version, source), source, False)
    if run_type in SCHEDULED_RUN_TYPES:
        return VersionChoice(run_date, f"the {run_type} run's logical date", True)
    return VersionChoice(run_date, f"the {run_type} run's date (no dataset_version given)", False)


def require_prepared(choice: VersionChoice, location: str, prepared: bool) -> None:
    """Skip (scheduled or backfill run) or fail when the chosen version was never prepared."""
    if prepared:
        return
    message = f"no processed dataset version {choice.version} (from {choice.source}): {location} has no manifest.json"
    if choice.skip_when_missing:
        raise AirflowSkipException(f"{message}; nothing to retrain for this date, so this run is skipped "
                                   "(run sdxl_dataset_prepare for it, or trigger with dataset_version)")
    raise DatasetVersionError(f"{message}; run sdxl_dataset_prepare for it first, or name a prepared version "
                              "in dataset_version")


def _checked(version: str, source: str) -> str:
    if not re.fullmatch(VERSION_PATTERN, version):
        raise DatasetVersionError(f"{source}: dataset version {version!r} is not a name of letters, digits, "
                                  "'.', '_' and '-'")
    return version
