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
