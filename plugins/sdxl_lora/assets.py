"""The processed-dataset Asset, defined once, and which dataset version a run trains or prepares.

`sdxl_dataset_prepare` emits an event on the Asset whose extra names the version it prepared;
`sdxl_lora_train` is scheduled on the Asset or its cron. Every event's version is trained once, in a
run of its own, in the order the events came: an Asset-triggered run trains nothing itself, it
queues one run per event (`version_runs`, run id `dataset_<version>__<event time>`, so a second
look at the same event finds its run instead of queuing another). Other runs train, in this order:
the version their `dataset_version` Param names; the version of their logical date (one version per
date). Never "the newest" version in S3: what a run trains follows from the run alone. A scheduled
or backfill run whose date has no prepared version is skipped, with the reason in its log, because
a cron firing before any dataset exists is not a failure; any other missing version is an error.

Why a run per event: the train DAG runs one run at a time (a comparison with what serves never
races a deployment), and Airflow then gives the events that arrive meanwhile to one later run, which
is handed only those up to the first of them (its queue entry keeps the first event's time); the
rest would wait for yet another event. So the Asset-triggered run also reads the Asset's events
from its first one on (its inlet) and queues a run for each.

Dates name versions as `YYYY-MM-DD` (dag_common.run_date: the logical date's day in UTC), so
`airflow backfill create --dag-id sdxl_dataset_prepare --from-date 2026-11-01 --to-date 2026-11-03`
prepares `raw_dataset/2026-11-01/` to `.../2026-11-03/` (a date with no raw files is skipped) and each
prepared version's event trains it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timezone

from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowSkipException

from sdxl_lora.settings import Settings

VERSION_PATTERN = r"^[A-Za-z0-9._-]+$"
SCHEDULED_RUN_TYPES = ("scheduled", "backfill")
log = logging.getLogger(__name__)


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


def choose_version(requested: str | None, run_type: str, run_date: str) -> VersionChoice:
    """The version a run that is not Asset-triggered trains: the Param's, else its date's."""
    run_type = _run_type(run_type)
    if requested:
        return VersionChoice(_checked(requested, "the dataset_version Param"), "the dataset_version Param", False)
    if run_type in SCHEDULED_RUN_TYPES:
        return VersionChoice(run_date, f"the {run_type} run's logical date", True)
    return VersionChoice(run_date, f"the {run_type} run's date (no dataset_version given)", False)


def version_runs(consumed: Sequence, seen: Sequence) -> list[dict]:
    """TriggerDagRunOperator arguments of one run per event, in event order: consumed, the events Airflow
    gave an Asset-triggered run; seen, the Asset's events from the first of those on (objects with `extra`
    and `timestamp`). Each run's id is made from its version and its event's time, so a retried task, or a
    later run seeing the same event, finds that run; run_after is the event's time, so queued runs start
    in event order."""
    runs: dict[str, dict] = {}
    for event in sorted([*consumed, *seen], key=lambda event: event.timestamp):
        when = event.timestamp.astimezone(timezone.utc)
        source = f"the Asset event of {when.isoformat()}"
        version = (event.extra or {}).get("version")
        if not isinstance(version, str):
            raise DatasetVersionError(f"{source} names no version (its extra is {event.extra!r}); "
                                      "sdxl_dataset_prepare's publish task sets {'version': ...}")
        run_id = f"dataset_{_checked(version, source)}__{when.strftime('%Y-%m-%dT%H:%M:%S.%f')}"
        runs.setdefault(run_id, {"trigger_run_id": run_id, "run_after": when.isoformat(),
                                 "conf": {"dataset_version": version}})
    return list(runs.values())


def require_prepared(choice: VersionChoice, location: str, prepared: bool) -> None:
    """Skip (scheduled or backfill run) or fail when the chosen version was never prepared."""
    if prepared:
        return
    message = f"no processed dataset version {choice.version} (from {choice.source}): {location} has no manifest.json"
    if choice.skip_when_missing:
        _skip(f"{message}; nothing to retrain for this date, so this run is skipped (run sdxl_dataset_prepare "
              "for it, or trigger with dataset_version)")
    raise DatasetVersionError(f"{message}; run sdxl_dataset_prepare for it first, or name a prepared version "
                              "in dataset_version")


RETRAIN_VARIABLE = "sdxl_lora_retrain_hyperparameters"


def retrain_hyperparameters(preset: dict, variable: str | None) -> dict:
    """The hyperparameters of a run no one chose them for (cron, Asset event, backfill without
    --dag-run-conf): the preset, updated with the Airflow Variable sdxl_lora_retrain_hyperparameters
    (a JSON object of hyperparameters) when it is set. Checked as the job checks them."""
    from ml.contract.hyperparameters import to_sagemaker

    if variable is None or not variable.strip():
        return dict(preset)
    try:
        overrides = json.loads(variable)
    except ValueError as error:
        raise ValueError(f"Airflow Variable {RETRAIN_VARIABLE} is not JSON: {error}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"Airflow Variable {RETRAIN_VARIABLE} must be a JSON object of hyperparameters, "
                         f"got {type(overrides).__name__}")
    merged = {**preset, **overrides}
    try:
        to_sagemaker(merged)
    except ValueError as error:
        raise ValueError(f"Airflow Variable {RETRAIN_VARIABLE}: {error}") from None
    return merged


def require_raw_files(version: str, run_type: str, location: str, files: int) -> None:
    """sdxl_dataset_prepare's check: a scheduled or backfill run whose date has no raw files skips (no
    dataset landed that day); any other run without raw files fails."""
    if files:
        return
    run_type = _run_type(run_type)
    message = f"{location} holds no files"
    if run_type in SCHEDULED_RUN_TYPES:
        _skip(f"{message}: no raw dataset version {version} landed for this {run_type} run's date, so there is "
              "nothing to prepare and this run is skipped")
    raise ValueError(f"{message}: upload the raw images of version {version} there first")


def _run_type(run_type) -> str:
    """A DagRun's run_type as its value ("scheduled"): Airflow hands a str enum, whose f-string form is
    "DagRunType.SCHEDULED"."""
    return str(getattr(run_type, "value", run_type))


def _skip(reason: str) -> None:
    """Skip the task, saying why in its log (Airflow logs only "Skipping task.", not the exception's text)."""
    log.warning("%s", reason)
    raise AirflowSkipException(reason)


def _checked(version: str, source: str) -> str:
    if not re.fullmatch(VERSION_PATTERN, version):
        raise DatasetVersionError(f"{source}: dataset version {version!r} is not a name of letters, digits, "
                                  "'.', '_' and '-'")
    return version
