"""`sdxl-lora-ops upload-images` and `fetch-results` against a real local stack.

The upload goes where the stack's record (`<workdir>/local-stack.json`, written by `make airflow` / `make demo`)
or the AWS settings point; the fetch reads the S3 layout a grid run leaves, here made by one real tiny
training job and the grid DAG's own functions (selection.select_winner, report.publish).
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import tarfile
from pathlib import Path

import pytest
from conftest import free_port, training_request, wait_for_training
from PIL import Image

from ml.fixtures import synthetic
from sdxl_lora_ops import cli, results, upload_images
from sdxl_lora_ops import target as targets

OWN = "sdxl-lora-own"  # a bucket of this file's own
PREFIX = "own-prefix"


@pytest.fixture(scope="module")
def recorded(stack, s3, tmp_path_factory):
    """A work dir whose local-stack.json names the session's stack, as `make airflow` writes it."""
    workdir = tmp_path_factory.mktemp("airflow-workdir")
    s3.create_bucket(Bucket=OWN)
    targets.write_record(workdir, stack.url, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
                         "us-east-1", OWN, PREFIX, stack.process.pid)
    return workdir


def keys(s3, prefix: str, bucket: str = OWN) -> dict[str, bytes]:
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


def image(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 64), colour).save(path)
    return path


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_captioned_folder_goes_into_raw_dataset_as_it_is(recorded, s3, tmp_path, capsys):
    folder = synthetic.write_dataset(tmp_path / "mine", count=4)  # images and a metadata.jsonl
    image(folder / "more" / "extra.jpg")
    (folder / "more" / "extra.txt").write_text("a red card, hand drawn")  # a sidecar caption
    assert cli.main(["upload-images", str(folder), "--version", "mine-v1", "--workdir", str(recorded)]) == 0

    prefix = f"{PREFIX}/raw_dataset/mine-v1/"
    assert keys(s3, prefix) == {prefix + name: body for name, body in files_under(folder).items()}
    assert f"s3://{OWN}/{prefix}" in capsys.readouterr().out


def test_an_uncaptioned_folder_goes_in_and_what_is_not_a_file_is_skipped(recorded, s3, tmp_path, capsys):
    folder = tmp_path / "frames"
    for number in range(3):
        image(folder / f"frame-{number}.png", (number * 80, 10, 10))
    (folder / "notes.md").write_text("not an image: prepare reports it, upload does not judge")
    os.mkfifo(folder / "a-pipe")
    (folder / "gone.png").symlink_to(folder / "missing.png")  # a broken link
    assert cli.main(["upload-images", str(folder), "--version", "frames.2", "--workdir", str(recorded)]) == 0

    prefix = f"{PREFIX}/raw_dataset/frames.2/"
    assert set(keys(s3, prefix)) == {prefix + n for n in ("frame-0.png", "frame-1.png", "frame-2.png", "notes.md")}
    out = capsys.readouterr().out
    assert str(folder / "a-pipe") in out and str(folder / "gone.png") in out


@pytest.mark.parametrize("version", ["../up", "a b", "v/1", "", "..", "ünïcode"])
def test_a_version_prepare_would_refuse_is_refused(recorded, s3, tmp_path, version):
    folder = tmp_path / "one"
    image(folder / "a.png")
    before = set(keys(s3, f"{PREFIX}/raw_dataset/"))
    assert cli.main(["upload-images", str(folder), "--version", version, "--workdir", str(recorded)]) == 2
    assert set(keys(s3, f"{PREFIX}/raw_dataset/")) == before


def test_the_version_rule_is_the_prepare_dags(recorded):
    from sdxl_lora.assets import VERSION_PATTERN

    assert upload_images.VERSION_PATTERN == VERSION_PATTERN


def test_a_missing_or_empty_folder_is_refused(recorded, tmp_path, capsys):
    (tmp_path / "empty" / "only-a-subfolder").mkdir(parents=True)
    for folder in (tmp_path / "absent", tmp_path / "empty"):
        assert cli.main(["upload-images", str(folder), "--version", "v1", "--workdir", str(recorded)]) == 2
        assert str(folder) in capsys.readouterr().err


def test_a_version_with_objects_is_kept_unless_replace(recorded, s3, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    image(first / "a.png"), image(first / "b.png")
    image(second / "c.png", (1, 2, 3))
    prefix = f"{PREFIX}/raw_dataset/kept/"
    assert cli.main(["upload-images", str(first), "--version", "kept", "--workdir", str(recorded)]) == 0
    assert cli.main(["upload-images", str(second), "--version", "kept", "--workdir", str(recorded)]) == 2
    assert set(keys(s3, prefix)) == {prefix + "a.png", prefix + "b.png"}
    assert cli.main(["upload-images", str(second), "--version", "kept", "--workdir", str(recorded), "--replace"]) == 0
    assert keys(s3, prefix) == {prefix + "c.png": (second / "c.png").read_bytes()}


def test_with_aws_the_settings_and_boto3s_own_chain_choose(stack, s3, recorded, tmp_path, monkeypatch):
    """--aws: SDXL_LORA_BUCKET / SDXL_LORA_PREFIX and the default credential chain (here pointed at the stack
    through boto3's own AWS_ENDPOINT_URL), even though a recorded stack runs."""
    for name, value in {"AWS_ENDPOINT_URL": stack.url, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "SDXL_LORA_BUCKET": OWN,
                        "SDXL_LORA_PREFIX": "from-settings"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.chdir(recorded.parent)
    folder = tmp_path / "aws"
    image(folder / "a.png")
    assert cli.main(["upload-images", str(folder), "--version", "on-aws", "--aws"]) == 0
    assert set(keys(s3, "from-settings/raw_dataset/on-aws/")) == {"from-settings/raw_dataset/on-aws/a.png"}


def test_the_demos_stack_is_found_by_default_and_forgotten_when_it_stops(tmp_path, monkeypatch, capsys):
    """`make airflow`'s stack (demo._start_stack, as `ui` starts it under outputs/airflow) is found with no
    --workdir; once it stops, its record no longer counts."""
    import boto3

    from sdxl_lora_ops import demo

    workdir = tmp_path / "outputs" / "airflow"
    workdir.mkdir(parents=True)
    stack = demo._start_stack(workdir, free_port())
    try:
        record = targets.read_record(workdir)
        assert record["pid"] == stack.pid and targets.is_live(record)
        assert (workdir / targets.RECORD).stat().st_mode & 0o077 == 0
        client = boto3.client("s3", endpoint_url=record["endpoint_url"], region_name=record["region"],
                              aws_access_key_id=record["aws_access_key_id"],
                              aws_secret_access_key=record["aws_secret_access_key"])
        client.create_bucket(Bucket=demo.BUCKET)
        folder = tmp_path / "mine"
        image(folder / "a.png")
        monkeypatch.chdir(tmp_path)
        assert cli.main(["upload-images", str(folder), "--version", "found"]) == 0
        assert set(keys(client, f"{demo.PREFIX}/raw_dataset/found/", demo.BUCKET)) == \
            {f"{demo.PREFIX}/raw_dataset/found/a.png"}
    finally:
        stack.send_signal(signal.SIGTERM)
        stack.wait(timeout=120)
    assert not targets.is_live(targets.read_record(workdir))
    assert cli.main(["upload-images", str(folder), "--version", "found2", "--workdir", str(workdir)]) == 2
    assert str(workdir / targets.RECORD) in capsys.readouterr().err
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert targets.resolve(cwd=tmp_path).local is False  # a stopped stack's record is passed over: S3 on AWS


# -- fetch-results ------------------------------------------------------------------------------------------

RUN_ID = "manual__2026-12-03T10:00:00+00:00"


@pytest.fixture(scope="module")
def grid_run(stack, sagemaker, s3, staged):
    """What sdxl_lora_grid_search leaves in S3 for one trial: a real training job, then the DAG's own
    select_winner (grid_search/<run>/leaderboard.json) and report.publish (report/: sheets, curves)."""
    from sdxl_lora import naming, selection
    from sdxl_lora.operators.jobs import latest_attempt
    from sdxl_lora.report import leaderboard as report

    name = "own-fetch-trial"
    config = training_request(name, staged, {"learning_rate": 1e-3, "rank": 4, "validation_prompt": "a red card",
                                             "num_validation_images": 1, "num_validation_inference_steps": 2})
    sagemaker.create_training_job(**config)
    assert wait_for_training(sagemaker, name)["TrainingJobStatus"] == "Completed"
    folder = f"s3://{OWN}/{PREFIX}/grid_search/{naming.run_token(RUN_ID)}"

    def write(text: str, uri: str) -> None:
        bucket, key = uri[len("s3://"):].split("/", 1)
        s3.put_object(Bucket=bucket, Key=key, Body=text.encode())

    results_ = selection.grid_results([config], lambda base: latest_attempt(sagemaker, base))
    record = selection.select_winner(results_, f"sdxl_lora_grid_search {RUN_ID}", folder, write,
                                     logger=logging.getLogger("test"))
    report.publish(sagemaker, s3, [config], folder, "sdxl_lora_grid_search", RUN_ID)
    return record


def test_fetch_results_writes_the_winners_lora_card_leaderboard_sheets_and_curves(recorded, grid_run, s3, tmp_path,
                                                                                  capsys):
    out = tmp_path / "results"
    assert cli.main(["fetch-results", "--run", RUN_ID, "--out", str(out), "--workdir", str(recorded)]) == 0
    printed = capsys.readouterr().out

    bucket, key = grid_run["model_artifacts"][len("s3://"):].split("/", 1)
    with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()), mode="r:gz") as tar:
        weights = tar.extractfile("pytorch_lora_weights.safetensors").read()
    lora, card = out / "winner" / "pytorch_lora_weights.safetensors", out / "winner" / "README.md"
    assert lora.read_bytes() == weights
    assert card.read_text().startswith("---")  # the Hugging Face model card: YAML metadata first
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["winner"] == grid_run["winner"] == "own-fetch-trial"
    sheets = sorted((out / "report").glob("sheet-*.png"))
    curves = sorted((out / "report").glob("trials/*/loss_curve.png"))
    assert sheets and curves == [out / "report" / "trials" / "own-fetch-trial" / "loss_curve.png"]
    assert (out / "report" / "leaderboard.md").is_file()
    for path in (lora, card, out / "leaderboard.md", *sheets, *curves):
        assert str(path) in printed
    # Fetched again into the same folder: replaced, not refused.
    assert cli.main(["fetch-results", "--run", RUN_ID, "--out", str(out), "--workdir", str(recorded)]) == 0


def test_fetch_results_names_the_runs_it_knows_when_the_run_is_unknown(recorded, grid_run, tmp_path, capsys):
    assert cli.main(["fetch-results", "--run", "manual__never", "--out", str(tmp_path / "r"),
                     "--workdir", str(recorded)]) == 2
    assert RUN_ID in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_fetch_results_refuses_a_folder_it_did_not_write(recorded, grid_run, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    assert cli.main(["fetch-results", "--run", RUN_ID, "--out", str(tmp_path), "--workdir", str(recorded)]) == 2
    assert files_under(tmp_path) == {"mine.txt": b"keep me"}


def _evil_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, body in (("pytorch_lora_weights.safetensors", b"weights"), ("README.md", b"---\ncard"),
                           ("../escaped.txt", b"x"), ("/tmp/absolute-own-images.txt", b"x"),
                           ("samples/../../up.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return buffer.getvalue()


def test_an_archive_member_outside_the_folder_is_never_written(recorded, s3, tmp_path, capsys):
    """A winner whose model.tar.gz has absolute, `..` and link members: only its plain files come out."""
    run_id, token = "manual__evil", results.run_token("manual__evil")
    folder = f"{PREFIX}/grid_search/{token}"
    artifacts = f"s3://{OWN}/{PREFIX}/models/evil/output/model.tar.gz"
    s3.put_object(Bucket=OWN, Key=artifacts[len(f"s3://{OWN}/"):], Body=_evil_archive())
    s3.put_object(Bucket=OWN, Key=f"{folder}/leaderboard.json", Body=json.dumps(
        {"metric": "val_loss", "winner": "evil", "trials": [
            {"job_name": "evil", "model_artifacts": artifacts}]}).encode())
    s3.put_object(Bucket=OWN, Key=f"{folder}/leaderboard.md", Body=b"# evil\n")
    out = tmp_path / "deep" / "out"
    assert cli.main(["fetch-results", "--run", run_id, "--out", str(out), "--workdir", str(recorded)]) == 0
    assert set(files_under(tmp_path)) == {f"deep/out/{name}" for name in (
        "leaderboard.json", "leaderboard.md", results.INDEX, "winner/pytorch_lora_weights.safetensors",
        "winner/README.md")}
    assert not Path("/tmp/absolute-own-images.txt").exists()
    assert not (out / "winner" / "link").exists()
    index = json.loads((out / results.INDEX).read_text())
    assert sorted(index["skipped_members"]) == sorted(
        ["../escaped.txt", "/tmp/absolute-own-images.txt", "samples/../../up.txt", "link"])
