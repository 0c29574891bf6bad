"""
### SDXL LoRA deployment

Deploys a trained LoRA to a SageMaker endpoint: a `model_data_url` (`model.tar.gz` from a training job), or a
version of the model registry: `model_package_arn` (one version), `model_package_group` (its latest Approved
version), or the Param `rollback` (the Approved version before the one serving, of `model_package_group` or the
setting's; the version rolled back from is then Rejected, so the registry watch leaves the rollback in place). A
version is deployed as itself (CreateModel with ModelPackageName: its image, model data and environment) and only
when it is Approved: a Rejected or PendingManualApproval one fails the run at once, without retries. The serving
record names the version. `sdxl_lora_registry_watch` triggers this DAG when a version is approved.

The model goes to the endpoint as a new
production variant beside the ones serving now: Model -> EndpointConfig (serving variants plus the
candidate at weight 0) -> Endpoint (created, or updated when it already exists) -> a smoke-test
invocation of the candidate through TargetVariant, which must return an image -> traffic shift:
`candidate_weight` 1 sends it everything, less starts an A/B test. Promote or roll back an A/B
test later with `sdxl_lora_traffic` (weights only). If any step fails, what this run created is
removed and an existing endpoint goes back to the config it served before, and the run fails (the
`watcher` task, trigger rule ONE_FAILED: `rollback` itself succeeds).

Retries: names are fixed per run and model, so a retried task (a killed worker, say) uses the model and
config its earlier try created and waits for the endpoint creation or update already under way: one
model, one config, one deployment. An endpoint that goes Failed, or an update SageMaker rolls back (the
endpoint stays InService on its old config), fails the task at once with the endpoint's FailureReason;
`rollback` then deletes the new model and config, and the endpoint too when this run created it.

`async_output_path` (an `s3://` prefix) deploys an asynchronous endpoint instead (AsyncInferenceConfig,
for long generations): the new model alone, answering InvokeEndpointAsync with its responses written
under that prefix; its smoke test uploads the request to S3 and waits for the PNG there. An A/B share
(`candidate_weight` below 1) is refused with it: InvokeEndpointAsync has no TargetVariant.

The endpoint runs `sdxl-lora serve`: requests name an adapter and a per-request `lora_scale`.
"""

from __future__ import annotations

from airflow.sdk import Param, dag

from sdxl_lora.dag_common import dag_arguments, endpoint_param, smoke_param, watch
from sdxl_lora.deploy import deploy_group
from sdxl_lora.presets import active
from sdxl_lora.settings import Settings

DAG_ID = "sdxl_lora_deploy"
PRESET = active(Settings.from_environment())


@dag(
    **dag_arguments(DAG_ID, __doc__, "deploy", retries=1),
    schedule=None,
    params={
        "model_data_url": Param("", type="string", pattern=r"^(s3://[^/]+/.+\.tar\.gz)?$",
                                description="The training job's model artifacts (ModelArtifacts.S3ModelArtifacts); "
                                            "or leave empty and name a model package version or group."),
        "model_package_arn": Param("", type="string",
                                   pattern=r"^(arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:[0-9]{12}:model-package/[^/]+/[0-9]+)?$",
                                   description="A model package version to deploy (arn:...:model-package/GROUP/N); "
                                               "it must be Approved."),
        "model_package_group": Param("", type="string", pattern=r"^([a-zA-Z0-9](-*[a-zA-Z0-9]){0,62})?$",
                                     description="A model package group: deploy its latest Approved version (with "
                                                 "rollback: the one before what serves; empty: the setting's)."),
        "rollback": Param(False, type="boolean",
                          description="Deploy the group's Approved version before the one serving, and reject "
                                      "the one serving; give no model_data_url nor model_package_arn."),
        "endpoint_name": endpoint_param(),
        "smoke_request": smoke_param(PRESET),
        "candidate_weight": Param(1.0, type="number", exclusiveMinimum=0, maximum=1,
                                  description="Share of the traffic the new variant gets after its smoke test: 1 "
                                              "replaces what serves now, less runs an A/B test beside it."),
        "async_output_path": Param("", type="string", pattern=r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?)?$",
                                   description="Empty: a real-time endpoint. An s3:// prefix: an asynchronous "
                                               "endpoint (InvokeEndpointAsync, for long generations) writing "
                                               "<prefix>/<inference id>.out, failures under <prefix>/failures; "
                                               "needs candidate_weight 1."),
        "async_max_concurrent_invocations": Param(1, type="integer", minimum=1, maximum=1000,
                                                  description="Asynchronous endpoints: requests SageMaker sends "
                                                              "each instance at once "
                                                              "(MaxConcurrentInvocationsPerInstance)."),
    },
)
def sdxl_lora_deploy():
    deploy_group("{{ params.model_data_url or '' }}", "{{ params.endpoint_name or '' }}", "{{ params.smoke_request }}",
                 candidate_weight="{{ params.candidate_weight }}",
                 async_output_path="{{ params.async_output_path or '' }}",
                 max_concurrent_invocations="{{ params.async_max_concurrent_invocations }}",
                 model_package_arn="{{ params.model_package_arn or '' }}",
                 model_package_group="{{ params.model_package_group or '' }}", roll_back="{{ params.rollback }}")
    watch()  # rollback succeeds after a failed deployment: the watcher fails the run


sdxl_lora_deploy()
