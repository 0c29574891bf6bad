"""Every DAG file parses, carries its documentation, retries and typed Params, and stays light."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import DAGS

EXPECTED = {"sdxl_dataset_prepare", "sdxl_lora_grid_search", "sdxl_lora_deploy", "sdxl_lora_registry_watch",
            "sdxl_lora_train", "sdxl_lora_tune"}
HEAVY = ("torch", "diffusers", "transformers", "peft", "PIL", "sagemaker")


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert EXPECTED <= set(dagbag.dag_ids)


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_docs_tags_and_retries(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.doc_md and dag.doc_md.strip().startswith("###")
    assert {"sdxl", "lora", "sagemaker"} <= set(dag.tags)
    assert all(task.retries >= 1 for task in dag.tasks if task.task_id != "watcher")  # it fails on purpose, once
    for name in dag.params:
        param = dag.params.get_param(name)
        assert param.schema.get("type") and param.description, name  # the trigger form shows both


def test_training_tasks_run_in_the_pool(dagbag):
    train = dagbag.dags["sdxl_lora_grid_search"].get_task("train_trial")
    assert train.partial_kwargs["pool"] == "sagemaker_training"
    assert dagbag.dags["sdxl_lora_tune"].get_task("tune").pool == "sagemaker_training"


def test_only_the_grid_runs_report_task_has_the_grid_report_button(dagbag):
    from sdxl_lora.report.links import GridReportLink

    carriers = {(dag_id, task.task_id) for dag_id, dag in dagbag.dags.items() for task in dag.tasks
                if isinstance(task, tuple(GridReportLink.operators))}
    assert carriers == {("sdxl_lora_grid_search", "publish_report")}


def test_tune_params_offer_the_strategies_and_reject_bad_input(dagbag):
    dag = dagbag.dags["sdxl_lora_tune"]
    good = _validated(dag, {"strategy": "Random", "ranks": [4, 150, 256, 512, 1024], "max_jobs": 20,
                            "max_parallel_jobs": 4, "random_seed": 7, "early_stopping": True})
    assert good["strategy"] == "Random"
    from airflow.sdk.definitions.param import ParamValidationError

    for bad in ({"strategy": "Grid"}, {"learning_rate_min": 0}, {"max_train_steps_min": 0}, {"ranks": []},
                {"ranks": ["four"]}, {"ranks": [0]}, {"max_jobs": 0}, {"max_parallel_jobs": 0}, {"random_seed": -1}):
        with pytest.raises(ParamValidationError):
            _validated(dag, bad)
    assert _validated(dag, {"ranks": ["4", "16", ""]})["ranks"] == ["4", "16", ""]  # as the form sends them


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

    for bad in ({"learning_rates": []}, {"learning_rates": [-1]}, {"ranks": [0]}, {"learning_rates": ["abc"]},
                {"ranks": ["1,5"]}, {"ranks": [4.5]}, {"max_train_steps": list(range(1, 12))},
                {"dataset_version": "../etc"}, {"deploy_winner": "yes"}):
        with pytest.raises(ParamValidationError):
            _validated(dag, bad)
    typed = _validated(dag, {"learning_rates": ["0.0001", "2e-4", ""], "max_train_steps": ["500"], "ranks": ["4"]})
    assert typed["learning_rates"] == ["0.0001", "2e-4", ""]  # the form's text passes; build_trials reads it


def test_prepare_params(dagbag):
    dag = dagbag.dags["sdxl_dataset_prepare"]
    assert _validated(dag, {"version": "2026-11-26", "force": True})["force"] is True
    from airflow.sdk.definitions.param import ParamValidationError

    for bad in ({"version": "a b"}, {"resolution": 1001}, {"caption_batch_size": 0}, {"instance_count": 0}):
        with pytest.raises(ParamValidationError):
            _validated(dag, bad)
    good = _validated(dag, {"resolution": 64, "min_size": 32, "latent_cache": True, "caption_prefix": "sbstyle"})
    assert good["resolution"] == 64 and good["latent_cache"] is True


def test_deploy_params_take_a_model_package_version_a_group_or_a_rollback(dagbag):
    dag = dagbag.dags["sdxl_lora_deploy"]
    arn = "arn:aws:sagemaker:us-east-1:123456789012:model-package/sdxl-lora/3"
    assert _validated(dag, {"model_package_arn": arn})["model_data_url"] == ""
    assert _validated(dag, {"model_package_group": "sdxl-lora", "rollback": True})["rollback"] is True
    from airflow.sdk.definitions.param import ParamValidationError

    for bad in ({"model_package_arn": "arn:aws:sagemaker:us-east-1:123456789012:model/x"},
                {"model_package_group": "bad_name"}, {"rollback": "yes"}, {"model_data_url": "s3://b/model.zip"}):
        with pytest.raises(ParamValidationError):
            _validated(dag, bad)


def test_the_registry_watch_polls_one_run_at_a_time_and_triggers_each_approval_once(dagbag, monkeypatch):
    dag = dagbag.dags["sdxl_lora_registry_watch"]
    assert dag.max_active_runs == 1 and not dag.catchup
    assert dag.timetable.expression == "*/5 * * * *"
    trigger = dag.get_task("trigger_deploy")
    assert trigger.trigger_dag_id == "sdxl_lora_deploy" and trigger.skip_when_already_exists
    assert [t.task_id for t in trigger.upstream_list] == ["choose_version"]
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("SDXL_LORA_REGISTRY_WATCH_SCHEDULE", "none")
    off = DagBag(dag_folder=str(DAGS / "sdxl_lora_registry_watch.py"))
    assert off.import_errors == {} and off.dags["sdxl_lora_registry_watch"].schedule is None


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

    from ml.contract.hyperparameters import PRESETS, SWEPT, preset

    defaults = {dag_id: dagbag.dags[dag_id].params["hyperparameters"] for dag_id in
                ("sdxl_lora_train", "sdxl_lora_grid_search", "sdxl_lora_tune")}
    assert defaults["sdxl_lora_train"] == PRESETS["production"]  # no SDXL_LORA_PRESET: the production preset
    assert defaults["sdxl_lora_grid_search"] == defaults["sdxl_lora_tune"] == preset("production", exclude=SWEPT)
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


# Per DAG: its Params whose defaults the preset chooses, and where in sdxl_lora.presets.Preset each comes from.
PRESET_PARAMS = {
    "sdxl_lora_train": {"hyperparameters": lambda p: p.hyperparameters(), "smoke_request": lambda p: p.smoke_request},
    "sdxl_lora_grid_search": {**{name: (lambda p, n=name: p.grid[n]) for name in ("learning_rates", "max_train_steps",
                                                                                 "ranks")},
                              "hyperparameters": lambda p: p.hyperparameters(exclude=SWEPT_KEYS),
                              "smoke_request": lambda p: p.smoke_request},
    "sdxl_lora_tune": {**{name: (lambda p, n=name: p.tuning[n]) for name in (
        "learning_rate_min", "learning_rate_max", "max_train_steps_min", "max_train_steps_max", "ranks", "max_jobs",
        "max_parallel_jobs")}, "hyperparameters": lambda p: p.hyperparameters(exclude=SWEPT_KEYS),
        "smoke_request": lambda p: p.smoke_request},
    "sdxl_dataset_prepare": {name: (lambda p, n=name: p.prepare[n]) for name in ("resolution", "min_size")},
    "sdxl_lora_deploy": {"smoke_request": lambda p: p.smoke_request},
}
SWEPT_KEYS = ("learning_rate", "max_train_steps", "rank")


@pytest.fixture(scope="module")
def local_dagbag(dagbag):
    """The DAGs parsed with SDXL_LORA_PRESET=local, as `make airflow` and the Compose stack parse them (after the
    session's own bag, which stays the production preset's)."""
    from airflow.dag_processing.dagbag import DagBag

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDXL_LORA_PRESET", "local")
        bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag


@pytest.mark.parametrize("name", ["production", "local"])
def test_the_preset_setting_chooses_every_forms_defaults_and_the_descriptions_name_it(dagbag, local_dagbag, name):
    from sdxl_lora.presets import PRESETS

    bag, chosen = {"production": dagbag, "local": local_dagbag}[name], PRESETS[name]
    for dag_id, params in PRESET_PARAMS.items():
        dag = bag.dags[dag_id]
        for param, default in params.items():
            assert dag.params[param] == default(chosen), (dag_id, param)
            assert f"Defaults: the {name} preset (SDXL_LORA_PRESET={name})." in \
                dag.params.get_param(param).description, (dag_id, param)
        assert _validated(dag, {})  # the defaults pass the form
    prepare = bag.dags["sdxl_dataset_prepare"]
    assert "SDXL_LORA_PRESET" not in prepare.params.get_param("caption_batch_size").description  # the payload's


def test_the_local_forms_train_the_local_preset_in_every_request(local_dagbag, monkeypatch):
    """A run triggered with only its dataset version: every trial's and the tuning job's hyperparameters are the
    local preset's (a CPU can run them), the grid and tuning as small as the preset's lists."""
    from ml.contract.hyperparameters import parse, preset

    local = preset("local")
    grid = local_dagbag.dags["sdxl_lora_grid_search"]
    params = {**{name: grid.params[name] for name in grid.params}, "dataset_version": "v1"}
    configs = grid.get_task("build_trials").python_callable(**_callable_context(monkeypatch, params))
    assert len(configs) == 4
    for config in configs:
        values = parse(config["HyperParameters"]).as_dict()
        assert {key: values[key] for key in local if key not in SWEPT_KEYS} == \
            {key: value for key, value in local.items() if key not in SWEPT_KEYS}
    tune = local_dagbag.dags["sdxl_lora_tune"]
    params = {**{name: tune.params[name] for name in tune.params}, "dataset_version": "v1"}
    request = tune.get_task("plan_tuning").python_callable(**_callable_context(monkeypatch, params))
    assert request["HyperParameterTuningJobConfig"]["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 2
    static = parse(request["TrainingJobDefinition"]["StaticHyperParameters"]).as_dict()
    assert static["mixed_precision"] == "no" and static["resolution"] == local["resolution"]


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


LIST_PARAMS = {"sdxl_lora_grid_search": {"learning_rates": "learning_rate", "max_train_steps": "max_train_steps",
                                         "ranks": "rank"},
               "sdxl_lora_tune": {"ranks": "rank"}}


@pytest.mark.parametrize("dag_id", sorted(LIST_PARAMS))
def test_list_params_are_text_boxes_one_value_per_line(dagbag, dag_id):
    """Airflow 3's trigger form renders an array Param by its items (airflow/ui/dist, the flexible form's field
    selector): enum or examples -> a multi-select of those values; items without "type" or "string" -> a text
    box, one value per line, sent as a list of strings; other items -> a JSON editor. Every list Param of ours
    is an array of numbers, and must be the text box."""
    from ml.contract.hyperparameters import list_item_schema

    dag = dagbag.dags[dag_id]
    arrays = {name for name in dag.params if dag.params.get_param(name).schema.get("type") == "array"}
    assert arrays == set(LIST_PARAMS[dag_id])
    for name, hyperparameter in LIST_PARAMS[dag_id].items():
        schema = dag.params.get_param(name).schema
        assert schema["items"] == list_item_schema(hyperparameter)
        assert "type" not in schema["items"] and not {"enum", "examples"} & set(schema)
        assert "One value per line" in dag.params.get_param(name).description


def test_a_bad_list_value_is_refused_naming_the_param_and_the_value(dagbag):
    """What the API's HTTP 400 says (its detail is the ParamValidationError of the DAG's serialized Params)."""
    from airflow.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    grid = DagSerialization.from_dict(DagSerialization.to_dict(dagbag.dags["sdxl_lora_grid_search"]))
    cases = {"learning_rates": (["0.0001", "abc"], "'abc' does not match '^[-+0-9.eE ]*$'"),
             "ranks": ([4, 2048], "2048 is greater than the maximum of 1024"),
             "max_train_steps": (["1,000"], "'1,000' does not match '^[0-9 ]*$'")}
    for name, (value, words) in cases.items():
        with pytest.raises(ParamValidationError) as refused:
            grid.params.deep_merge({name: value}).validate()
        first_line, rest = str(refused.value).split("\n", 1)
        assert first_line == f"Invalid input for param {name}: {words}"
        assert "each value: " in rest  # the items' description, printed with the schema that refused


def _callable_context(monkeypatch, params: dict, **extra) -> dict:
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from airflow.sdk import Variable

    monkeypatch.setattr(Variable, "get", staticmethod(lambda key, default=None: default))
    return {"params": params, "run_id": "manual__2026-11-26T10:00:00+00:00", "logical_date": None,
            "dag_run": SimpleNamespace(run_after=datetime(2026, 11, 26, tzinfo=timezone.utc)), **extra}


def test_build_trials_reads_the_forms_text_and_refuses_a_bad_value_without_retrying(dagbag, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    dag = dagbag.dags["sdxl_lora_grid_search"]
    build = dag.get_task("build_trials").python_callable
    params = {**{name: dag.params[name] for name in dag.params}, "dataset_version": "v1",
              "learning_rates": ["1e-4", "0.0002", ""], "max_train_steps": ["500"], "ranks": [" 4"]}
    configs = build(**_callable_context(monkeypatch, params))
    assert [(c["HyperParameters"]["learning_rate"], c["HyperParameters"]["max_train_steps"],
             c["HyperParameters"]["rank"]) for c in configs] == [("0.0001", "500", "4"), ("0.0002", "500", "4")]
    assert configs[1]["TrainingJobName"].endswith("-lr-0-0002-mts-500-r-4")
    for bad, words in ((["0.5"], "Param learning_rates: '0.5' is not a valid learning_rate: must be in (0, 0.1]"),
                       (["1e-4", "0.0001"], "Param learning_rates lists 0.0001 twice")):
        with pytest.raises(AirflowFailException, match=re.escape(words)):  # AirflowFail: no retry
            build(**_callable_context(monkeypatch, {**params, "learning_rates": bad}))


def test_plan_tuning_reads_the_ranks_as_typed(dagbag, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    dag = dagbag.dags["sdxl_lora_tune"]
    plan = dag.get_task("plan_tuning").python_callable
    params = {**{name: dag.params[name] for name in dag.params}, "dataset_version": "v1", "ranks": ["4", "16", ""]}
    request = plan(**_callable_context(monkeypatch, params))
    (ranks,) = request["HyperParameterTuningJobConfig"]["ParameterRanges"]["CategoricalParameterRanges"]
    assert ranks == {"Name": "rank", "Values": ["4", "16"]}
    with pytest.raises(AirflowFailException, match=re.escape("Param ranks: '2048' is not a valid rank: must be in")):
        plan(**_callable_context(monkeypatch, {**params, "ranks": ["4", "2048"]}))


# Per DAG: the tasks judged by a task after them instead (select_winner judges the grid's trials) and the
# short-circuits, which would skip the watcher were they wired to it.
WATCHED = {"sdxl_lora_grid_search": ({"train_trial"}, {"deploy_requested"}),
           "sdxl_lora_tune": (set(), {"deploy_requested"}),
           "sdxl_lora_train": (set(), {"deploy_requested"}),
           "sdxl_lora_deploy": (set(), set())}


@pytest.mark.parametrize("dag_id", sorted(WATCHED))
def test_a_watcher_fails_the_run_when_a_task_failed(dagbag, dag_id):
    """Airflow sets a run's state from its leaf tasks, and publish_report and the deploy group's rollback succeed
    after a failure upstream: without the watcher a grid whose trials all failed ended green, and a failed
    training or deployment too (issue 9)."""
    from airflow.sdk import TriggerRule

    dag = dagbag.dags[dag_id]
    judged, short_circuits = WATCHED[dag_id]
    watcher = dag.get_task("watcher")
    assert watcher.trigger_rule == TriggerRule.ONE_FAILED and watcher.retries == 0
    assert [task.task_id for task in dag.leaves] == ["watcher"]  # the run's state is the watcher's
    # Wired to every task but the short-circuits (which would skip it) and the judged ones; those reach it
    # through the tasks after them: every task is upstream of the watcher.
    assert watcher.upstream_task_ids == set(dag.task_ids) - {"watcher"} - short_circuits - judged
    assert watcher.get_flat_relative_ids(upstream=True) == set(dag.task_ids) - {"watcher"}
    for task_id in short_circuits:  # not deploying skips the deployment, not the watcher
        assert dag.get_task(task_id).ignore_downstream_trigger_rules is False
    if judged:
        select = dag.get_task("select_winner")
        assert select.trigger_rule == TriggerRule.ALL_DONE and select.task_id in watcher.upstream_task_ids
    for task_id in judged:  # a failed trial reaches the watcher only as select_winner's verdict
        assert "select_winner" in dag.get_task(task_id).downstream_task_ids


COSTED = {"sdxl_lora_grid_search": ("build_trials", "train_trial"), "sdxl_lora_tune": ("plan_tuning", "tune"),
          "sdxl_lora_train": ("build_request", "train")}


@pytest.mark.parametrize("dag_id", sorted(COSTED))
def test_the_forms_that_launch_training_take_an_optional_cost_cap_checked_before_any_job(dagbag, dag_id):
    from airflow.sdk.definitions.param import ParamValidationError

    dag = dagbag.dags[dag_id]
    assert dag.params["max_cost_usd"] is None  # no cap unless asked
    assert _validated(dag, {"max_cost_usd": 12.5})["max_cost_usd"] == 12.5
    for bad in (-1, "ten"):
        with pytest.raises(ParamValidationError):
            _validated(dag, {"max_cost_usd": bad})
    checks, launches = COSTED[dag_id]
    # The job's task runs on the checking task's output: a refusal there leaves it upstream_failed, never started.
    assert checks in dag.get_task(launches).upstream_task_ids
    if dag_id == "sdxl_lora_train":
        assert checks in dag.get_task("score_serving").get_flat_relative_ids(upstream=True)


def test_a_grid_over_its_cost_cap_is_refused_by_its_first_task_without_retrying(dagbag, monkeypatch, caplog):
    import logging

    from airflow.sdk.exceptions import AirflowFailException

    dag = dagbag.dags["sdxl_lora_grid_search"]
    build = dag.get_task("build_trials").python_callable
    params = {**{name: dag.params[name] for name in dag.params}, "dataset_version": "v1", "max_cost_usd": 0.01}
    with pytest.raises(AirflowFailException, match="cannot be estimated: no measured seconds per optimizer step for "
                                                   "ml.g5.2xlarge .* give seconds_per_step"):
        build(**_callable_context(monkeypatch, params))  # the production default instance: no measurement
    monkeypatch.setenv("SDXL_LORA_SECONDS_PER_STEP", "8")
    with caplog.at_level(logging.INFO), pytest.raises(AirflowFailException) as refused:
        build(**_callable_context(monkeypatch, params))
    words = str(refused.value)
    assert "(4 training job(s), 3000 optimizer steps" in words and "above max_cost_usd 0.0100 USD" in words
    assert "Nothing was launched" in words and "raise max_cost_usd" in words
    assert "cost estimate: 4 training job(s)" in caplog.text  # logged before the refusal
    assert len(build(**_callable_context(monkeypatch, {**params, "max_cost_usd": 100.0}))) == 4  # within the cap
    assert len(build(**_callable_context(monkeypatch, {**params, "max_cost_usd": None}))) == 4  # no cap


def test_a_tuning_run_over_its_cost_cap_creates_no_tuning_job(dagbag, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    dag = dagbag.dags["sdxl_lora_tune"]
    plan = dag.get_task("plan_tuning").python_callable
    monkeypatch.setenv("SDXL_LORA_SECONDS_PER_STEP", "8")
    params = {**{name: dag.params[name] for name in dag.params}, "dataset_version": "v1", "max_cost_usd": 1.0}
    with pytest.raises(AirflowFailException, match=re.escape("(12 training job(s), 36000 optimizer steps")):
        plan(**_callable_context(monkeypatch, params))  # the preset's 12 trials at max_train_steps_max 3000


def test_a_training_run_over_its_cost_cap_counts_the_manifests_images_and_refuses(dagbag, monkeypatch):
    from types import SimpleNamespace

    import boto3
    from airflow.sdk.exceptions import AirflowFailException
    from moto import mock_aws

    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", '{"conn_type": "aws", "extra": {"region_name": "us-east-1"}}')
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("SDXL_LORA_SECONDS_PER_STEP", "8")):
        monkeypatch.setenv(name, value)
    dag = dagbag.dags["sdxl_lora_train"]
    build = dag.get_task("build_request").python_callable
    params = {**{name: dag.params[name] for name in dag.params}, "max_cost_usd": 1.0}
    run = SimpleNamespace(conf={"hyperparameters": params["hyperparameters"]})  # chosen: no retraining Variable
    context = _callable_context(monkeypatch, params)
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="sdxl-lora-local")
        s3.put_object(Bucket="sdxl-lora-local", Key="sdxl-finetune-lora/proc_dataset/v1/manifest.json",
                      Body=json.dumps({"counts": {"images_written": 200}}).encode())
        with pytest.raises(AirflowFailException, match=re.escape("(1 training job(s), 2610 optimizer steps")):
            build("v1", params, context["run_id"], dag_run=run)  # 58 epochs of 180 images, 4 micro-batches a step
        request = build("v1", {**params, "max_cost_usd": None}, context["run_id"], dag_run=run)
    assert request["TrainingJobName"].startswith("sdxl-lora-train-")
