"""
### SDXL LoRA deployment

Deploys a trained LoRA (`model.tar.gz` from a training job) to a SageMaker endpoint as a new
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
        "model_data_url": Param("s3://bucket/prefix/models/job/output/model.tar.gz", type="string",
                                pattern=r"^s3://[^/]+/.+\.tar\.gz$",
                                description="The training job's model artifacts (ModelArtifacts.S3ModelArtifacts)."),
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
    deploy_group("{{ params.model_data_url }}", "{{ params.endpoint_name or '' }}", "{{ params.smoke_request }}",
                 candidate_weight="{{ params.candidate_weight }}",
                 async_output_path="{{ params.async_output_path or '' }}",
                 max_concurrent_invocations="{{ params.async_max_concurrent_invocations }}")
    watch()  # rollback succeeds after a failed deployment: the watcher fails the run


sdxl_lora_deploy()
