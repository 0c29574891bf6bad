"""What an endpoint serves now (its serving record in S3), and whether a new adapter beats it.

A deployment writes `serving/<endpoint>.json` with the model it deployed, the training job that
made it and that job's val_loss; a retraining run compares its own val_loss with the recorded one.
Pure functions: the tasks read and write the record with S3Hook.
"""

from __future__ import annotations

import math

from sdxl_lora.settings import Settings


def record_uri(settings: Settings, endpoint: str) -> str:
    return settings.uri("serving", f"{endpoint}.json")


def record(endpoint: str, deployment: dict, weights: dict) -> dict:
    """The serving record of a finished deployment (deploy.plan_deployment's dict)."""
    training = deployment.get("training") or {}
    return {"endpoint": endpoint, "model_data_url": deployment["model"]["PrimaryContainer"]["ModelDataUrl"],
            "training_job": training.get("training_job"), "val_loss": training.get("val_loss"),
            "endpoint_config": deployment["endpoint_config"]["EndpointConfigName"],
            "candidate_variant": deployment["candidate"], "weights": weights}


def training(job_name: str | None, val_loss: float | None) -> dict:
    """The training job behind a deployed model, as the serving record keeps it."""
    return {"training_job": job_name, "val_loss": val_loss}


def better_than_serving(new_val_loss: float | None, serving: dict | None, endpoint: str) -> tuple[bool, str]:
    """(deploy?, why): deploy when the new val_loss is lower than the serving one, or nothing comparable serves."""
    if new_val_loss is None or not math.isfinite(new_val_loss):
        return False, ("the new adapter has no validation loss (validation_split is 0): not deploying it "
                       "automatically")
    if serving is None:
        return True, f"nothing recorded as serving on {endpoint}: deploying (val_loss {new_val_loss:.6g})"
    current = serving.get("val_loss")
    job = serving.get("training_job") or serving.get("model_data_url")
    if current is None:
        return True, (f"the serving record of {endpoint} ({job}) has no val_loss to compare with: deploying "
                      f"(val_loss {new_val_loss:.6g})")
    verdict = new_val_loss < current
    return verdict, (f"new val_loss {new_val_loss:.6g} against {current:.6g} of {job}, serving on {endpoint}: "
                     f"{'deploying' if verdict else 'keeping what serves'}")
