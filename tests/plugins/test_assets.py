"""Which dataset version a training run trains (plugins/sdxl_lora/assets.py)."""

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowSkipException

from sdxl_lora import assets
from sdxl_lora.settings import Settings


def event(version, hour: int = 0):
    extra = {"version": version} if version is not None else {}
    return SimpleNamespace(extra=extra, timestamp=datetime(2026, 11, 26, hour, tzinfo=timezone.utc))


def test_one_definition_names_proc_dataset_of_the_settings():
    asset = assets.processed_dataset(Settings(bucket="b1", prefix="team/sdxl"))
    assert asset.uri == "s3://b1/team/sdxl/proc_dataset" and asset.name == "sdxl_processed_dataset"
    assert asset == assets.processed_dataset(Settings(bucket="b1", prefix="team/sdxl"))


def test_the_param_wins_then_the_logical_date():
    assert assets.choose_version("v9", "scheduled", "2026-11-26").version == "v9"
    assert not assets.choose_version("v9", "scheduled", "2026-11-26").skip_when_missing
    scheduled = assets.choose_version(None, "scheduled", "2026-11-02")
    assert scheduled.version == "2026-11-02" and scheduled.skip_when_missing
    assert assets.choose_version(None, "backfill", "2026-11-03").skip_when_missing
    manual = assets.choose_version(None, "manual", "2026-11-26")
    assert manual.version == "2026-11-26" and not manual.skip_when_missing


def test_the_log_names_the_run_type_as_users_know_it_not_as_its_enum():
    """Airflow hands run_type as a str enum, whose f-string form was 'DagRunType.SCHEDULED' in the skip reason."""
    from airflow.utils.types import DagRunType

    scheduled = assets.choose_version(None, DagRunType.SCHEDULED, "2026-11-02")
    assert scheduled.source == "the scheduled run's logical date" and scheduled.skip_when_missing
    with pytest.raises(Exception, match="no raw dataset version 2026-11-02 landed for this backfill run's date"):
        assets.require_raw_files("2026-11-02", DagRunType.BACKFILL_JOB, "s3://b/raw/2026-11-02/", 0)


def test_an_asset_triggered_run_queues_one_run_per_event_in_event_order():
    consumed = [event("v1", 1)]
    seen = [event("v1", 1), event("v3", 3), event("v2", 2), event("v1", 4)]  # v1 prepared again at 4
    runs = assets.version_runs(consumed, seen)
    assert [r["conf"]["dataset_version"] for r in runs] == ["v1", "v2", "v3", "v1"]
    assert runs[0] == {"trigger_run_id": "dataset_v1__2026-11-26T01:00:00.000000",
                       "run_after": "2026-11-26T01:00:00+00:00", "conf": {"dataset_version": "v1"}}
    # A later Asset-triggered run handed v2 and v3 (and seeing what came since) finds the same runs by their ids.
    again = assets.version_runs([event("v2", 2), event("v3", 3)], [event("v2", 2), event("v3", 3), event("v1", 4)])
    assert [r["trigger_run_id"] for r in again] == [r["trigger_run_id"] for r in runs[1:]]


@pytest.mark.parametrize("events, message", [
    ([event(None)], "names no version"),
    ([event("../etc")], "'../etc' is not a name"),
])
def test_an_unusable_event_is_refused_naming_it(events, message):
    with pytest.raises(assets.DatasetVersionError, match=f"the Asset event of 2026-11-26T00:00:00\\+00:00.*{message}"):
        assets.version_runs(events, [])


def test_an_unusable_param_is_refused():
    with pytest.raises(assets.DatasetVersionError, match="'a b' is not a name"):
        assets.choose_version("a b", "manual", "2026-11-26")


def test_a_scheduled_run_without_its_dataset_skips_with_the_reason():
    choice = assets.choose_version(None, "scheduled", "2026-11-02")
    with pytest.raises(AirflowSkipException, match="no processed dataset version 2026-11-02 .*this run is skipped"):
        assets.require_prepared(choice, "s3://b/p/proc_dataset/2026-11-02/", prepared=False)
    assets.require_prepared(choice, "s3://b/p/proc_dataset/2026-11-02/", prepared=True)


@pytest.mark.parametrize("requested, run_type", [("v9", "scheduled"), (None, "manual")])
def test_any_other_missing_version_fails(requested, run_type):
    choice = assets.choose_version(requested, run_type, "2026-11-26")
    with pytest.raises(assets.DatasetVersionError, match="run sdxl_dataset_prepare for it first"):
        assets.require_prepared(choice, "s3://b/p/proc_dataset/x/", prepared=False)


def test_a_scheduled_or_backfill_prepare_without_raw_files_skips_and_a_triggered_one_fails():
    for run_type in ("scheduled", "backfill"):
        with pytest.raises(AirflowSkipException, match="no raw dataset version 2026-11-02 landed for this "
                                                        f"{run_type} run's date"):
            assets.require_raw_files("2026-11-02", run_type, "s3://b/p/raw_dataset/2026-11-02/", 0)
    with pytest.raises(ValueError, match="raw_dataset/v1/ holds no files: upload the raw images of version v1"):
        assets.require_raw_files("v1", "manual", "s3://b/p/raw_dataset/v1/", 0)
    assets.require_raw_files("v1", "scheduled", "s3://b/p/raw_dataset/v1/", 3)


def test_the_retrain_variable_updates_the_preset_and_is_checked_as_the_job_checks():
    from ml.contract.hyperparameters import preset

    production = preset("production")
    assert assets.retrain_hyperparameters(production, None) == production
    assert assets.retrain_hyperparameters(production, "  ") == production
    tiny = assets.retrain_hyperparameters(production, '{"resolution": 32, "mixed_precision": "no"}')
    assert tiny == {**production, "resolution": 32, "mixed_precision": "no"}
    for text, message in (("{", "is not JSON"), ("[1]", "must be a JSON object of hyperparameters, got list"),
                          ('{"resolutoin": 32}', "unknown hyperparameters: resolutoin"),
                          ('{"rank": 0}', r"rank: must be in \[1, 1024\], got 0")):
        with pytest.raises(ValueError, match=f"Variable sdxl_lora_retrain_hyperparameters.*{message}"):
            assets.retrain_hyperparameters(production, text)
