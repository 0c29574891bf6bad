"""Every DAG file parses, carries its documentation, retries and typed Params, and stays light."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
from conftest import DAGS

EXPECTED = {"sdxl_dataset_prepare", "sdxl_lora_grid_search", "sdxl_lora_deploy", "sdxl_lora_train",
            "sdxl_lora_tune"}
HEAVY = ("torch", "diffusers", "transformers", "peft", "PIL", "sagemaker")


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert EXPECTED <= set(dagbag.dag_ids)


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_docs_tags_and_retries(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.doc_md and dag.doc_md.strip().startswith("###")
    assert {"sdxl", "lora", "sagemaker"} <= set(dag.tags)
    assert all(task.retries >= 1 for task in dag.tasks)
    for name in dag.params:
        param = dag.params.get_param(name)
        assert param.schema.get("type") and param.description, name  # the trigger form shows both


def test_training_tasks_run_in_the_pool(dagbag):
    train = dagbag.dags["sdxl_lora_grid_search"].get_task("train_trial")
    assert train.partial_kwargs["pool"] == "sagemaker_training"
    assert dagbag.dags["sdxl_lora_tune"].get_task("tune").pool == "sagemaker_training"


def test_tune_params_offer_the_strategies_and_reject_bad_input(dagbag):
    dag = dagbag.dags["sdxl_lora_tune"]
    good = _validated(dag, {"strategy": "Random", "ranks": [4, 150, 256, 512, 1024], "max_jobs": 20,
                            "max_parallel_jobs": 4, "random_seed": 7, "early_stopping": True})
    assert good["strategy"] == "Random"
    from airflow.sdk.definitions.param import ParamValidationError

    for bad in ({"strategy": "Grid"}, {"learning_rate_min": 0}, {"max_train_steps_min": 0}, {"ranks": []},
                {"ranks": [4, 4]}, {"max_jobs": 0}, {"max_parallel_jobs": 0}, {"random_seed": -1}):
        with pytest.raises(ParamValidationError):
            _validated(dag, bad)


def _validated(dag, conf: dict):
    params = copy.deepcopy(dag.params)
    for key, value in conf.items():
        params[key] = value
    return params.validate()


def test_grid_params_accept_the_original_grid_and_reject_bad_input(dagbag):
    dag = dagbag.dags["sdxl_lora_grid_search"]
    good = _validated(dag, {"learning_rates": [0.0001, 0.00015, 0.0002], "max_train_steps": [500, 1000, 2000, 3000],
                            "ranks": [4, 150, 256, 512, 1024]})
    assert len(good["ranks"]) == 5
    from airflow.sdk.definitions.param import ParamValidationError

    for bad in ({"learning_rates": []}, {"learning_rates": [-1]}, {"ranks": [0]}, {"ranks": [4, 4]},
                {"max_train_steps": list(range(1, 12))}, {"dataset_version": "../etc"}, {"deploy_winner": "yes"}):
        with pytest.raises(ParamValidationError):
            _validated(dag, bad)


def test_prepare_params(dagbag):
    dag = dagbag.dags["sdxl_dataset_prepare"]
    assert _validated(dag, {"version": "2026-11-26", "force": True})["force"] is True
    from airflow.sdk.definitions.param import ParamValidationError

    for bad in ({"version": "a b"}, {"resolution": 1001}, {"caption_batch_size": 0}, {"instance_count": 0}):
        with pytest.raises(ParamValidationError):
            _validated(dag, bad)
    good = _validated(dag, {"resolution": 64, "min_size": 32, "latent_cache": True, "caption_prefix": "sbstyle"})
    assert good["resolution"] == 64 and good["latent_cache"] is True


def test_parsing_imports_no_heavy_module(tmp_path):
    script = f"""
import json, os, sys
os.environ["AIRFLOW_HOME"] = {str(tmp_path)!r}
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(DAGS)!r})
assert not bag.import_errors, bag.import_errors
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DAGS.parent / "plugins"), str(DAGS.parent)])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_hyperparameter_params_take_their_presets_and_bounds_from_the_payload(dagbag):
    from airflow.sdk.definitions.param import ParamValidationError

    from ml.hyperparameters import PRESETS, SWEPT

    defaults = {dag_id: dagbag.dags[dag_id].params["hyperparameters"] for dag_id in
                ("sdxl_lora_train", "sdxl_lora_grid_search", "sdxl_lora_tune")}
    assert defaults["sdxl_lora_train"] == PRESETS["production"]
    assert defaults["sdxl_lora_grid_search"] == defaults["sdxl_lora_tune"] == PRESETS["grid"]
    assert {**defaults["sdxl_lora_grid_search"], "learning_rate": 2e-4, "rank": 4} == PRESETS["production"]
    train = dagbag.dags["sdxl_lora_train"]
    assert _validated(train, {"hyperparameters": {"resolution": 64, "max_train_steps": 4}})
    for bad in ({"rank": 0}, {"learning_rate": 0.5}, {"resolution": 1001}, {"mixed_precision": "fp8"},
                {"use_8bit_adam": "yes"}, {"learning_rat": 1e-4}):
        with pytest.raises(ParamValidationError):
            _validated(train, {"hyperparameters": bad})
    for dag_id in ("sdxl_lora_grid_search", "sdxl_lora_tune"):  # a trial's swept values come from their own Params
        for key in SWEPT:
            with pytest.raises(ParamValidationError):
                _validated(dagbag.dags[dag_id], {"hyperparameters": {key: PRESETS["production"].get(key, 500)}})
    with pytest.raises(ParamValidationError):
        _validated(dagbag.dags["sdxl_lora_grid_search"], {"learning_rates": [0.5]})
    with pytest.raises(ParamValidationError):
        _validated(dagbag.dags["sdxl_lora_tune"], {"learning_rate_max": 0.5})


def test_prepare_emits_the_asset_that_schedules_training(dagbag):
    (outlet,) = dagbag.dags["sdxl_dataset_prepare"].get_task("publish").outlets
    timetable = dagbag.dags["sdxl_lora_train"].timetable
    assert timetable.asset_condition == outlet


def test_a_scheduled_retrain_before_any_dataset_skips_and_one_with_its_dataset_trains(dagbag, monkeypatch):
    """The train DAG's own dataset_version task against S3 (moto): issue 9's red run at start-up is a skip."""
    from datetime import datetime, timezone
    from types import SimpleNamespace

    import boto3
    from airflow.sdk import Variable
    from airflow.sdk.exceptions import AirflowSkipException
    from moto import mock_aws

    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", '{"conn_type": "aws", "extra": {"region_name": "us-east-1"}}')
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(Variable, "get", staticmethod(lambda key, default=None: default))
    choose = dagbag.dags["sdxl_lora_train"].get_task("dataset_version").python_callable
    scheduled = {"params": {"dataset_version": None}, "dag_run": SimpleNamespace(run_type="scheduled"),
                 "triggering_asset_events": {}, "logical_date": datetime(2026, 11, 2, 3, tzinfo=timezone.utc)}
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="sdxl-lora-local")
        with pytest.raises(AirflowSkipException, match="no processed dataset version 2026-11-02"):
            choose(**scheduled)
        s3.put_object(Bucket="sdxl-lora-local", Key="sdxl-finetune-lora/proc_dataset/2026-11-02/manifest.json",
                      Body=b"{}")
        assert choose(**scheduled) == "2026-11-02"
