"""
### SDXL LoRA deployment

Deploys a trained LoRA (`model.tar.gz` from a training job) to a SageMaker endpoint:
Model -> EndpointConfig -> Endpoint (created, or updated when it already exists), then a smoke-test
invocation that must return an image. If any step fails, what this run created is removed and an
existing endpoint goes back to the config it served before.

The endpoint runs `sdxl-lora serve`: requests carry a per-request `lora_scale`.
"""

from __future__ import annotations

from airflow.sdk import Param, dag
from sdxl_lora.dag_common import dag_arguments, endpoint_param, smoke_param
from sdxl_lora.deploy import deploy_group

DAG_ID = "sdxl_lora_deploy"


@dag(
    **dag_arguments(DAG_ID, __doc__, "deploy", retries=1),
    schedule=None,
    params={
        "model_data_url": Param("s3://bucket/prefix/models/job/output/model.tar.gz", type="string",
                                pattern=r"^s3://[^/]+/.+\.tar\.gz$",
                                description="The training job's model artifacts (ModelArtifacts.S3ModelArtifacts)."),
        "endpoint_name": endpoint_param(),
        "smoke_request": smoke_param(),
    },
)
def sdxl_lora_deploy():
    deploy_group("{{ params.model_data_url }}", "{{ params.endpoint_name or '' }}", "{{ params.smoke_request }}")


sdxl_lora_deploy()
