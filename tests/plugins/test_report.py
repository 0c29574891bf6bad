"""The grid report in S3: trial images, sheets per steps value, leaderboard with costs and links."""

from __future__ import annotations

import io
import json

import boto3
import pytest
from moto import mock_aws
from PIL import Image

from grid_fixture import BUCKET, PREFIX, RUN_ID, grid
from sdxl_lora.report import leaderboard as report
from sdxl_lora.report import sheets


@pytest.fixture
def s3():
    with mock_aws():
        yield boto3.client("s3", region_name="us-east-1")


def test_publish_writes_leaderboard_sheets_and_trial_images(s3):
    configs, sagemaker = grid(s3)
    folder = f"s3://{BUCKET}/{PREFIX}/grid_search/run1"
    board = report.publish(sagemaker, s3, configs, folder, "sdxl_lora_grid_search", RUN_ID)
    keys = {o["Key"].removeprefix(f"{PREFIX}/grid_search/run1/report/")
            for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/grid_search/run1/report/")["Contents"]}
    assert keys == {"leaderboard.json", "leaderboard.md", "sheet-steps-20.png", "sheet-steps-40.png",
                    *[f"trials/g-lr-0-00{a}-mts-{s}-r-4/{f}" for a in (1, 3) for s in (20, 40)
                      for f in ("loss_curve.png", "samples/sample-0.png") if (a, s) != (3, 40)]}
    stored = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/grid_search/run1/report/leaderboard.json")["Body"]
                        .read())
    assert stored == json.loads(json.dumps(board))
    assert board["winner"] == "g-lr-0-003-mts-20-r-4" and board["prompt"] == "a red circle" and board["seed"] == 1000
    assert [r["job_name"] for r in board["trials"]] == ["g-lr-0-003-mts-20-r-4", "g-lr-0-001-mts-40-r-4",
                                                        "g-lr-0-001-mts-20-r-4", "g-lr-0-003-mts-40-r-4"]
    best, failed = board["trials"][0], board["trials"][-1]
    assert best["place"] == 1 and failed["place"] is None and failed["note"] == "no output.tar.gz"
    assert best["training_seconds"] == 1000 and best["billable_seconds"] == 400 and best["spot_discount"] == 0.6
    assert best["estimated_cost_usd"] == pytest.approx(400 / 3600 * 1.515)
    assert best["links"]["console"].startswith("https://eu-west-1.console.aws.amazon.com/sagemaker/")
    assert best["links"]["model"].endswith("/g-lr-0-003-mts-20-r-4/output/model.tar.gz")
    assert best["curve"] == "trials/g-lr-0-003-mts-20-r-4/loss_curve.png"
    assert board["sheets"] == [{"max_train_steps": 20, "file": "sheet-steps-20.png"},
                               {"max_train_steps": 40, "file": "sheet-steps-40.png"}]
    markdown = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/grid_search/run1/report/leaderboard.md")["Body"].read()
    assert b"| 1 | g-lr-0-003-mts-20-r-4 | 0.003 | 20 | 4 | 0.20000 | 1000 | 400 | 60% | 0.1683 |" in markdown
    # The steps-40 sheet: row lr 0.001 holds that trial's blue sample, row lr 0.003 the failed placeholder.
    sheet = Image.open(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/grid_search/run1/report/"
                                                "sheet-steps-40.png")["Body"].read())).convert("RGB")
    layout = sheets.layout(2, 1, 256)
    assert sheet.getpixel((layout.images[0][0].x + 128, layout.images[0][0].y + 128)) == (0, 0, 255)
    assert sheet.getpixel((layout.images[1][0].x + 2, layout.images[1][0].y + 2)) == (236, 236, 236)


def test_unpack_report_takes_only_report_images_and_summary(s3):
    from grid_fixture import output_tar

    files = report.unpack_report(output_tar("j", 0.2, (1, 2, 3)))
    assert sorted(files) == ["loss_curve.png", "samples/sample-0.png", "training_summary.json"]


def test_a_trial_whose_job_never_started_is_listed_without_cost(s3):
    configs, sagemaker = grid(s3)
    configs.append({"TrainingJobName": "g-never", "HyperParameters": {"learning_rate": "0.01", "max_train_steps": "20",
                                                                      "rank": "4"}})
    board = report.publish(sagemaker, s3, configs, f"s3://{BUCKET}/{PREFIX}/grid_search/run2", "d", "r")
    never = board["trials"][-1]
    assert never["status"] == "NotStarted" and never["estimated_cost_usd"] is None and never["curve"] is None


def test_bad_folder_is_refused(s3):
    with pytest.raises(ValueError, match="is not an s3:// URI: write it as s3://bucket/key"):
        report.publish(None, s3, [], "bucket/prefix", "d", "r")
