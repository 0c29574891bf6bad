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


def test_the_param_wins_then_the_event_then_the_logical_date():
    assert assets.choose_version("v9", [event("v1")], "asset_triggered", "2026-11-26").version == "v9"
    chosen = assets.choose_version(None, [event("v1")], "asset_triggered", "2026-11-26")
    assert chosen.version == "v1" and "triggering Asset event" in chosen.source and not chosen.skip_when_missing
    scheduled = assets.choose_version(None, [], "scheduled", "2026-11-02")
    assert scheduled.version == "2026-11-02" and scheduled.skip_when_missing
    assert assets.choose_version(None, [], "backfill", "2026-11-03").skip_when_missing
    manual = assets.choose_version(None, [], "manual", "2026-11-26")
    assert manual.version == "2026-11-26" and not manual.skip_when_missing


def test_coalesced_events_train_the_latest_and_name_the_others():
    chosen = assets.choose_version(None, [event("v2", 5), event("v1", 1), event("v3", 3)], "asset_triggered", "d")
    assert chosen.version == "v2" and "earlier events of this run named v1, v3" in chosen.source


@pytest.mark.parametrize("events, requested, message", [
    ([event(None)], None, "names no version"),
    ([event("../etc")], None, "'../etc' is not a name"),
    ([], "a b", "'a b' is not a name"),
])
def test_an_unusable_version_is_refused_naming_where_it_came_from(events, requested, message):
    with pytest.raises(assets.DatasetVersionError, match=message):
        assets.choose_version(requested, events, "asset_triggered", "2026-11-26")


def test_a_scheduled_run_without_its_dataset_skips_with_the_reason():
    choice = assets.choose_version(None, [], "scheduled", "2026-11-02")
    with pytest.raises(AirflowSkipException, match="no processed dataset version 2026-11-02 .*this run is skipped"):
        assets.require_prepared(choice, "s3://b/p/proc_dataset/2026-11-02/", prepared=False)
    assets.require_prepared(choice, "s3://b/p/proc_dataset/2026-11-02/", prepared=True)


@pytest.mark.parametrize("requested, events, run_type", [("v9", [], "scheduled"), (None, [event("v1")], "asset_triggered"),
                                                         (None, [], "manual")])
def test_any_other_missing_version_fails(requested, events, run_type):
    choice = assets.choose_version(requested, events, run_type, "2026-11-26")
    with pytest.raises(assets.DatasetVersionError, match="run sdxl_dataset_prepare for it first"):
        assets.require_prepared(choice, "s3://b/p/proc_dataset/x/", prepared=False)
