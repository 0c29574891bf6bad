"""`sdxl-lora-ops fetch-results --run RUN_ID`: a grid run's results as files on this machine.

A grid run leaves `grid_search/<run token>/` in S3 (the tuning DAG `tuning/<run token>/`):
`leaderboard.json` / `.md` (selection: the winner and every trial's model artifacts) and `report/`
(the grid report's: leaderboard with costs, one comparison sheet per steps value, each trial's
loss curve and validation images). This copies both and extracts the winner's `model.tar.gz` into
`winner/`: the LoRA (`pytorch_lora_weights.safetensors`), its model card (`README.md`), samples and
loss curve. Members with absolute paths or `..`, links and devices are skipped, never written.
`make demo` does the same into outputs/demo/results/.
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from sdxl_lora_ops import target as targets

FOLDERS = {"sdxl_lora_grid_search": "grid_search", "sdxl_lora_tune": "tuning"}
INDEX = "results.json"  # what a fetch wrote; a folder holding one may be fetched into again


class ResultsError(Exception):
    """The run's results cannot be fetched; the message says why."""


def run_token(run_id: str) -> str:
    if str(targets.PLUGINS) not in sys.path:
        sys.path.insert(0, str(targets.PLUGINS))
    from sdxl_lora import naming

    return naming.run_token(run_id)


def safe_relative(name: str) -> PurePosixPath | None:
    """name as a path inside a folder, or None when it would leave it (absolute, `..`, a drive)."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        return None
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


def extract_model(archive: Path, destination: Path) -> tuple[list[Path], list[str]]:
    """The regular files of a model.tar.gz under destination; returns (written, skipped member names)."""
    written, skipped = [], []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            relative = safe_relative(member.name)
            if member.isdir():
                continue
            if relative is None or not member.isfile():
                skipped.append(member.name)
                continue
            path = destination / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as source, path.open("wb") as out:
                shutil.copyfileobj(source, out)
            written.append(path)
    return written, skipped


def _keys(s3, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def known_runs(target: targets.Target, dag: str, limit: int = 10) -> list[str]:
    """'<run id> (<token>)' of the runs that left a report (newest first), for the error naming an unknown run."""
    found = []
    for page in target.s3.get_paginator("list_objects_v2").paginate(Bucket=target.bucket,
                                                                     Prefix=target.key(FOLDERS[dag]) + "/"):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/report/leaderboard.json"):
                found.append((item["LastModified"], item["Key"]))
    runs = []
    for _, key in sorted(found, reverse=True)[:limit]:
        board = json.loads(target.s3.get_object(Bucket=target.bucket, Key=key)["Body"].read())
        runs.append(f"{board.get('run_id')} ({key.split('/')[-3]})")
    return runs


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / INDEX).exists():
            raise ResultsError(f"{out} is not empty and holds no earlier results ({INDEX}): choose another --out")
        for name in ("winner", "report", "leaderboard.json", "leaderboard.md", INDEX):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def fetch(target: targets.Target, run_id: str, out: Path, dag: str = "sdxl_lora_grid_search") -> dict:
    """Copy the run's leaderboards and report and extract its winner; returns the index of what was written."""
    token = run_token(run_id)
    folder = target.key(FOLDERS[dag], token) + "/"
    keys = _keys(target.s3, target.bucket, folder)
    if folder + "leaderboard.json" not in keys:
        runs = known_runs(target, dag)
        raise ResultsError(f"no leaderboard for {dag} run {run_id!r} at s3://{target.bucket}/{folder} on "
                           f"{target.where}" + (f"; runs with a report: {', '.join(runs)}" if runs else
                                                "; no run has left a report there"))
    _prepare_out(out)
    copied = []
    for key in keys:
        relative = safe_relative(key[len(folder):])
        if relative is None:
            continue
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        target.s3.download_file(target.bucket, key, str(path))
        copied.append(path)
    board = json.loads((out / "leaderboard.json").read_text())
    report = out / "report"
    index = {"dag_id": dag, "run_id": run_id, "source": f"s3://{target.bucket}/{folder}", "winner": board.get("winner"),
             "leaderboard": str(out / "leaderboard.md"),
             "report_leaderboard": str(report / "leaderboard.md") if (report / "leaderboard.md").exists() else None,
             "sheets": [str(p) for p in sorted(report.glob("sheet-*.png"))],
             "loss_curves": [str(p) for p in sorted(report.glob("trials/*/loss_curve.png"))],
             "lora": None, "model_card": None, "model_files": [], "skipped_members": []}
    if board.get("winner"):
        row = next(t for t in board["trials"] if t["job_name"] == board["winner"])
        artifacts = row.get("model_artifacts")
        if not artifacts:
            raise ResultsError(f"the leaderboard's winner {board['winner']} names no model artifacts")
        bucket, _, key = artifacts.removeprefix("s3://").partition("/")
        winner = out / "winner"
        with tempfile.TemporaryDirectory() as scratch:
            archive = Path(scratch) / "model.tar.gz"
            target.s3.download_file(bucket, key, str(archive))
            written, skipped = extract_model(archive, winner)
        weights = sorted(p for p in written if p.suffix == ".safetensors" and p.parent == winner)
        index.update(model_artifacts=artifacts, model_files=[str(p) for p in written], skipped_members=skipped,
                     lora=str(weights[0]) if weights else None,
                     model_card=str(winner / "README.md") if (winner / "README.md").exists() else None)
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def describe(index: dict, out=None) -> None:
    """The paths people open, one a line."""
    out = out or sys.stdout
    print(f"results of {index['dag_id']} {index['run_id']} (from {index['source']}):", file=out)
    if index["winner"] is None:
        print("  no winner: no trial completed with a validation loss (see the leaderboard)", file=out)
    else:
        print(f"  winner:      {index['winner']}", file=out)
        print(f"  LoRA:        {index['lora']}", file=out)
        print(f"  model card:  {index['model_card']}", file=out)
    print(f"  leaderboard: {index['leaderboard']}", file=out)
    if index["report_leaderboard"]:
        print(f"  report:      {index['report_leaderboard']} (costs and links)", file=out)
    for path in index["sheets"]:
        print(f"  sheet:       {path}", file=out)
    for path in index["loss_curves"]:
        print(f"  loss curve:  {path}", file=out)
    for name in index["skipped_members"]:
        print(f"  skipped archive member (unsafe or not a file): {name}", file=out)
    out.flush()


def main(args) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    out = Path(args.out) if args.out else Path("outputs/results") / run_token(args.run)
    try:
        index = fetch(targets.resolve(args.workdir, args.aws), args.run, out, args.dag)
    except (ResultsError, targets.TargetError) as error:
        print(f"fetch-results: {error}", file=sys.stderr)
        return 2
    except (BotoCoreError, ClientError) as error:
        print(f"fetch-results: S3 refused: {error}", file=sys.stderr)
        return 1
    describe(index)
    return 0 if index["winner"] else 1
