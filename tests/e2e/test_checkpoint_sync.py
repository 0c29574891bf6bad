"""The local stack mirrors a training job's checkpoint directory to CheckpointConfig.S3Uri while it runs, as
SageMaker does, and the job prunes old checkpoints meanwhile: a file that goes between the listing and its
upload is skipped, never the end of the job (a fast job once failed with 'local stack: FileNotFoundError')."""

import boto3
from moto import mock_aws

from local_stack.jobs import _CheckpointSync


@mock_aws
def test_files_pruned_while_a_sync_runs_are_skipped_and_their_uploads_removed(tmp_path):
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="ckpt-bucket")
    local = tmp_path / "checkpoints"
    for step in (10, 20):
        (local / f"checkpoint-{step}").mkdir(parents=True)
        for name in ("lora_model_0.safetensors", "progress.json"):
            (local / f"checkpoint-{step}" / name).write_text(f"{step} {name}")
    sync = _CheckpointSync(s3, local, "s3://ckpt-bucket/ckpt")
    sync.now()
    (local / "checkpoint-30").mkdir()
    (local / "checkpoint-30" / "progress.json").write_text("30")

    upload = s3.upload_file

    def pruning_upload(path, bucket, key):  # the job prunes checkpoint-10 while checkpoint-30 uploads
        for old in (local / "checkpoint-10").glob("*"):
            old.unlink()
        (local / "checkpoint-10").rmdir()
        return upload(path, bucket, key)

    sync.s3 = type("PruningS3", (), {"upload_file": staticmethod(pruning_upload),
                                     "delete_object": staticmethod(s3.delete_object)})()
    (local / "checkpoint-10" / "progress.json").write_text("10 rewritten")  # so the sync uploads it again
    sync.now()  # checkpoint-10's files vanish mid-sync: skipped, not raised
    sync.s3 = s3
    sync.now()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="ckpt-bucket")["Contents"])
    assert keys == ["ckpt/checkpoint-20/lora_model_0.safetensors", "ckpt/checkpoint-20/progress.json",
                    "ckpt/checkpoint-30/progress.json"]
