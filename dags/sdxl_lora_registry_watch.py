"""
### SDXL LoRA registry watch: approving a version deploys it

Every few minutes (setting `registry_watch_schedule`, a cron; `none` turns the watch off) it compares the model
package group's latest Approved version (setting `model_package_group`) with what the endpoint's serving record
says serves, and when they differ triggers `sdxl_lora_deploy` with that version's ARN. So approving a version
(UpdateModelPackage: the SageMaker console, `aws sagemaker update-model-package`, or
`sdxl-lora-ops approve --version-arn ARN`) deploys it within one period, and rejecting the serving version brings
back the latest Approved one before it. Rejected and PendingManualApproval versions are never chosen.

Why a poll rather than a sensor or an event: a short scheduled run holds no worker slot or triggerer between
looks, needs nothing beyond the Airflow role's ListModelPackages and DescribeModelPackage (no EventBridge rule,
queue or Airflow API credentials in AWS), and catches up on its own after any outage, since each run reads the
registry's state, not a stream of changes that could be missed. catchup is off and one run at a time:
a late run just looks again.

Idempotent: a version already serving (by ARN, or its model data deployed by a training run) is not deployed
again, and the triggered run's id is fixed per endpoint, version and approval time
(`registry__<endpoint>__<group>-v<N>__<time>`): while that deployment runs, or after it failed, later looks skip
the trigger instead of starting a second deployment. Approving the version again (a new approval time) retries it.
While the endpoint changes (Creating, Updating, rolling back: a deployment under way, such as a training run's own
deployment of the version it just registered and approved), the watch waits for a later look.
To keep an older version serving, reject the newer ones, or roll back: `sdxl_lora_deploy` with `rollback`.
"""

from __future__ import annotations

import logging

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import CronTriggerTimetable, Param, chain, dag, task

from sdxl_lora.dag_common import dag_arguments, endpoint_param
from sdxl_lora.settings import Settings

DAG_ID = "sdxl_lora_registry_watch"
DEPLOY_DAG_ID = "sdxl_lora_deploy"
SETTINGS = Settings.from_environment()
log = logging.getLogger(__name__)
SCHEDULE = None if SETTINGS.registry_watch_schedule.strip().lower() == "none" else \
    CronTriggerTimetable(SETTINGS.registry_watch_schedule, timezone="UTC")


@task
def choose_version(endpoint_name: str | None, model_package_group: str | None) -> dict:
    """The deployment to trigger (registry_versions.watch), or a skip naming why there is none.

    :param endpoint_name: the endpoint; empty: the settings' ``endpoint_name``.
    :param model_package_group: the group; empty: the setting ``model_package_group``.
    :return: ``{deploy, reason, run_id, conf}``: the trigger's run id and sdxl_lora_deploy's conf.
    """
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
    from airflow.sdk.exceptions import AirflowSkipException

    from sdxl_lora import registry, registry_versions, serving
    from sdxl_lora.dag_common import no_retry

    settings = Settings.resolve()
    endpoint = endpoint_name or settings.endpoint_name
    with no_retry(registry.RegistryError):
        group = (model_package_group or "").strip() or registry.group_name(settings)
    if group is None:
        raise AirflowSkipException("setting model_package_group is none: no registry to watch")
    record = serving.read_record(S3Hook(aws_conn_id=settings.aws_conn_id), settings, endpoint)
    decision = registry_versions.watch(SageMakerHook(aws_conn_id=settings.aws_conn_id).conn, record, endpoint, group)
    if not decision["deploy"]:
        raise AirflowSkipException(decision["reason"])
    log.info("deploying: %s (run %s)", decision["reason"], decision["run_id"])
    return decision


@dag(
    **dag_arguments(DAG_ID, __doc__, "deploy", "registry", retries=1),
    schedule=SCHEDULE,
    max_active_runs=1,
    params={
        "endpoint_name": endpoint_param(),
        "model_package_group": Param("", type="string", pattern=r"^([a-zA-Z0-9](-*[a-zA-Z0-9]){0,62})?$",
                                     description="The model package group to follow; empty: the setting "
                                                 "model_package_group."),
    },
)
def sdxl_lora_registry_watch():
    chosen = choose_version("{{ params.endpoint_name or '' }}", "{{ params.model_package_group or '' }}")
    trigger = TriggerDagRunOperator(task_id="trigger_deploy", trigger_dag_id=DEPLOY_DAG_ID,
                                    trigger_run_id=chosen["run_id"], conf=chosen["conf"], logical_date=None,
                                    skip_when_already_exists=True,  # that deployment already ran, or runs
                                    openlineage_inject_parent_info=False)  # the conf is the deploy's Params only
    chain(chosen, trigger)


sdxl_lora_registry_watch()
