"""
### SDXL LoRA deployment

Deploys a trained LoRA (`model.tar.gz` from a training job) to a SageMaker endpoint:
Model -> EndpointConfig -> Endpoint (created, or updated when it already exists), then a smoke-test
invocation that must return an image. If any step fails, what this run created is removed and an
existing endpoint goes back to the config it served before.

The endpoint runs `sdxl-lora serve`: requests carry a per-request `lora_scale`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag
from sdxl_lora.deploy import SMOKE_REQUEST, deploy_group

DAG_ID = "sdxl_lora_deploy"


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    doc_md=__doc__,
    tags=["sdxl", "lora", "sagemaker", "deploy"],
    render_template_as_native_obj=True,  # the smoke request stays a dict
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1)},
    params={
        "model_data_url": Param("s3://bucket/prefix/models/job/output/model.tar.gz", type="string",
                                pattern=r"^s3://[^/]+/.+\.tar\.gz$",
                                description="The training job's model artifacts (ModelArtifacts.S3ModelArtifacts)."),
        "endpoint_name": Param(None, type=["null", "string"], pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$",
                               description="Endpoint to create or update; empty: the configured endpoint name."),
        "smoke_request": Param(SMOKE_REQUEST, type="object",
                               description="The smoke-test invocation (JSON request of sdxl-lora serve)."),
    },
)
def sdxl_lora_deploy():
    deploy_group("{{ params.model_data_url }}", "{{ params.endpoint_name or '' }}", "{{ params.smoke_request }}")


sdxl_lora_deploy()
