"""
### SDXL LoRA traffic: promote or roll back an A/B test

Sets the traffic weights of a running endpoint's production variants
(UpdateEndpointWeightsAndCapacities): no instance restarts, so the change takes effect at once.
Promote a candidate with `{"<candidate>": 1, "<serving>": 0}`, roll it back with the reverse.
Variant names are in the serving record (`serving/<endpoint>.json`) and in DescribeEndpoint.
A variant left at weight 0 is removed by the next `sdxl_lora_deploy`.
"""

from __future__ import annotations

from airflow.sdk import Param, dag

from sdxl_lora.dag_common import dag_arguments, endpoint_param
from sdxl_lora.deploy import change_traffic

DAG_ID = "sdxl_lora_traffic"


@dag(
    **dag_arguments(DAG_ID, __doc__, "deploy", retries=1),
    schedule=None,
    params={
        "endpoint_name": endpoint_param(),
        "weights": Param({"variant-name": 1.0}, type="object", minProperties=1,
                         additionalProperties={"type": "number", "minimum": 0},
                         description="Variant name -> traffic weight (relative; 0 stops its traffic)."),
    },
)
def sdxl_lora_traffic():
    change_traffic("{{ params.endpoint_name or '' }}", "{{ params.weights }}")


sdxl_lora_traffic()
