"""The SageMaker Python SDK v2 as a user calls it, pointed at the local stack.

Runs inside a virtual environment of its own that holds the SDK (tests/e2e/test_sagemaker_sdk.py makes it), never
the project's code: `python sdk_v2_client.py STEP CONFIG.json` prints what the step saw as one JSON line after
`RESULT`.
Steps: train (Estimator.fit with spot, checkpoints and logs, then TrainingJobAnalytics), tune
(HyperparameterTuner.fit, wait, best_training_job) and deploy (Model.deploy, predict, delete_endpoint).
"""

from __future__ import annotations

import json
import os
import sys

RESULT = "sdk-v2-client result: "


def session(config: dict):
    # The stack is one endpoint for every service. AWS_ENDPOINT_URL reaches the clients the SDK makes for
    # itself from the boto3 session (S3, CloudWatch Logs for fit(logs=True), CloudWatch for the analytics).
    os.environ["AWS_ENDPOINT_URL"] = config["endpoint_url"]
    import boto3
    import sagemaker

    boto_session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                 region_name="us-east-1")
    url = config["endpoint_url"]
    return sagemaker.Session(boto_session=boto_session,
                             sagemaker_client=boto_session.client("sagemaker", endpoint_url=url),
                             sagemaker_runtime_client=boto_session.client("sagemaker-runtime", endpoint_url=url))


def estimator(config: dict, sm_session, **extra):
    from sagemaker.estimator import Estimator

    return Estimator(image_uri=config["training_image"], role=config["role"], instance_count=1,
                     instance_type="ml.g5.2xlarge", output_path=config["output_path"], max_run=3600,
                     hyperparameters=config["hyperparameters"], metric_definitions=config["metric_definitions"],
                     sagemaker_session=sm_session, disable_profiler=True, **extra)


def train(config: dict) -> dict:
    from sagemaker.analytics import TrainingJobAnalytics

    sm_session = session(config)
    job = estimator(config, sm_session, base_job_name="sdk-v2-fit", use_spot_instances=True, max_wait=7200,
                    checkpoint_s3_uri=config["checkpoint_uri"])
    job.fit(config["inputs"], logs=True)
    name = job.latest_training_job.name
    described = sm_session.sagemaker_client.describe_training_job(TrainingJobName=name)
    frame = TrainingJobAnalytics(name, sagemaker_session=sm_session).dataframe()
    return {"job_name": name, "status": described["TrainingJobStatus"], "model_data": job.model_data,
            "spot": described["EnableManagedSpotTraining"],
            "checkpoint_uri": described.get("CheckpointConfig", {}).get("S3Uri"),
            "transitions": [t["Status"] for t in described["SecondaryStatusTransitions"]],
            "final_metrics": {m["MetricName"]: m["Value"] for m in described.get("FinalMetricDataList", [])},
            "analytics": frame.to_dict(orient="records")}


def tune(config: dict) -> dict:
    from sagemaker.tuner import ContinuousParameter, HyperparameterTuner

    sm_session = session(config)
    tuner = HyperparameterTuner(estimator(config, sm_session, base_job_name="sdk-v2-trial"),
                                objective_metric_name="val_loss", objective_type="Minimize",
                                metric_definitions=config["metric_definitions"],
                                hyperparameter_ranges={"learning_rate": ContinuousParameter(1e-4, 1e-3)},
                                strategy="Random", max_jobs=2, max_parallel_jobs=2, base_tuning_job_name="sdk-v2-tune")
    tuner.fit(config["inputs"])
    tuner.wait()
    name = tuner.latest_tuning_job.name
    described = sm_session.sagemaker_client.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
    trials = sm_session.sagemaker_client.list_training_jobs_for_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=name)["TrainingJobSummaries"]
    return {"tuning_job": name, "status": described["HyperParameterTuningJobStatus"],
            "failure": described.get("FailureReason"), "best": tuner.best_training_job(),
            "trials": {t["TrainingJobName"]: t["TrainingJobStatus"] for t in trials},
            "learning_rates": [float(t["TunedHyperParameters"]["learning_rate"]) for t in trials],
            "definition_resources": sorted(k for k in described["TrainingJobDefinition"] if "ResourceConfig" in k)}


def deploy(config: dict) -> dict:
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.model import Model
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import JSONSerializer

    sm_session = session(config)
    model = Model(image_uri=config["inference_image"], model_data=config["model_data"], role=config["role"],
                  env={"BASE_MODEL": config["base_model"]}, predictor_cls=Predictor, sagemaker_session=sm_session)
    predictor = model.deploy(initial_instance_count=1, instance_type="ml.g5.2xlarge",
                             endpoint_name="sdk-v2-endpoint", serializer=JSONSerializer(),
                             deserializer=JSONDeserializer())
    try:
        status = sm_session.sagemaker_client.describe_endpoint(EndpointName="sdk-v2-endpoint")["EndpointStatus"]
        answer = predictor.predict(config["request"])
    finally:  # the model first: the SDK finds it through the endpoint config, which delete_endpoint deletes
        predictor.delete_model()
        predictor.delete_endpoint()
    endpoints = [e["EndpointName"] for e in sm_session.sagemaker_client.list_endpoints()["Endpoints"]]
    return {"status": status, "images": answer.get("images", []), "endpoints_after": endpoints}


if __name__ == "__main__":
    step, path = sys.argv[1], sys.argv[2]
    with open(path) as handle:
        result = {"train": train, "tune": tune, "deploy": deploy}[step](json.load(handle))
    print(f"\n{RESULT}{json.dumps(result, default=str)}")  # on a line of its own: the SDK prints progress dots
