"""A grid run's report in S3, beside its trials: leaderboard with costs and links, XY sheets, curves.

For every trial the latest attempt is described (as select_winner does); a finished trial's `output.tar.gz` (the small
output/data archive the training job fills with `report/`: loss curve, validation images, summary)
is unpacked, its images copied to `grid_search/<run>/report/trials/<job>/`, and one XY sheet per
steps value drawn from every trial's first validation image (same prompt, same fixed seed).
`grid_search/<run>/report/leaderboard.json` ties it together; the Airflow UI plugin reads only that
folder. Works with any S3 and SageMaker boto3 clients (the DAG passes the AWS connection's).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import asdict, dataclass, field

from ml.contract.container import split_s3_uri
from sdxl_lora import costs, selection
from sdxl_lora.operators import jobs as operators
from sdxl_lora.report import sheets

REPORT = "report"
LEADERBOARD = "leaderboard.json"
MAX_MEMBER_BYTES = 64 * 2**20
_MEMBER = re.compile(r"^report/(training_summary\.json|loss_curve\.png|samples/sample-\d{1,3}\.png)$")


@dataclass
class Trial:
    result: selection.Result
    description: dict
    cost: costs.Cost
    files: dict[str, bytes] = field(default_factory=dict)  # report member name (without report/) -> bytes
    note: str | None = None  # why it has no images


def output_archive(description: dict) -> str | None:
    """Where SageMaker put the job's output/data: <S3OutputPath>/<job>/output/output.tar.gz."""
    path = (description.get("OutputDataConfig") or {}).get("S3OutputPath")
    if not path or description.get("TrainingJobStatus") not in ("Completed", "Stopped", "Failed"):
        return None
    return f"{path.rstrip('/')}/{description['TrainingJobName']}/output/output.tar.gz"


def unpack_report(archive: bytes) -> dict[str, bytes]:
    """The report/ members of an output.tar.gz; anything else (or a link, or an oversized file) is skipped."""
    files = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if not (member.isfile() and _MEMBER.match(name) and member.size <= MAX_MEMBER_BYTES):
                continue
            files[name.removeprefix("report/")] = tar.extractfile(member).read()
    return files


def collect(sagemaker, s3, configs: list[dict]) -> list[Trial]:
    trials = []
    for config in configs:
        values = config["HyperParameters"]
        description = operators.latest_attempt(sagemaker, config["TrainingJobName"]) or {
            "TrainingJobName": config["TrainingJobName"], "TrainingJobStatus": "NotStarted"}
        result = selection.from_description(description, float(values["learning_rate"]),
                                            int(float(values["max_train_steps"])), int(float(values["rank"])))
        trial = Trial(result, description, costs.of_job(description))
        archive = output_archive(description)
        if archive is None:
            trial.note = f"no output ({result.status})"
        else:
            bucket, key = split_s3_uri(archive)
            try:
                body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except s3.exceptions.NoSuchKey:
                trial.note = "no output.tar.gz"
            else:
                trial.files = unpack_report(body)
                if not trial.files:
                    trial.note = "output.tar.gz has no report/"
        trials.append(trial)
    return trials


def _sample_setting(trials: list[Trial]) -> tuple[str | None, int | None]:
    for trial in trials:
        if "training_summary.json" in trial.files and "samples/sample-0.png" in trial.files:
            summary = json.loads(trial.files["training_summary.json"])
            seeds = summary.get("sample_seeds") or [None]
            return summary["hyperparameters"].get("validation_prompt"), seeds[0]
    return None, None


def build_sheets(trials: list[Trial], cell: int = 256) -> list[tuple[sheets.Sheet, bytes]]:
    prompt, seed = _sample_setting(trials)
    by_steps: dict[int, list[sheets.Cell]] = {}
    for trial in trials:
        r = trial.result
        image = trial.files.get("samples/sample-0.png")
        missing = None if image else (r.status if r.status != "Completed" else (trial.note or "no sample"))
        by_steps.setdefault(r.max_train_steps, []).append(
            sheets.Cell(r.learning_rate, r.rank, r.job_name, r.val_loss, image, missing))
    return [(sheet, sheets.render(sheet, cell)) for sheet in sheets.group(by_steps, prompt, seed)]


def _region(description: dict) -> str | None:
    arn = description.get("TrainingJobArn") or ""
    parts = arn.split(":")
    return parts[3] if len(parts) > 3 and parts[3] else None


def links(description: dict) -> dict:
    job = description["TrainingJobName"]
    region = _region(description)
    found = {}
    if region:
        console = f"https://{region}.console.aws.amazon.com"
        found["console"] = f"{console}/sagemaker/home?region={region}#/jobs/{job}"
        found["logs"] = (f"{console}/cloudwatch/home?region={region}#logsV2:log-groups/log-group/"
                         f"$252Faws$252Fsagemaker$252FTrainingJobs$3FlogStreamNameFilter$3D{job}")
    artifacts = (description.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
    if artifacts:
        found["model"] = artifacts
    return found


def leaderboard(trials: list[Trial], dag_id: str, run_id: str, sheet_files: list[tuple[int, str]]) -> dict:
    """The report's index: trials ranked as `selection` ranks them, with costs, links and image names."""
    order = {id(r): i for i, r in enumerate(selection.rank_results([t.result for t in trials]))}
    ranked = sorted(trials, key=lambda t: order[id(t.result)])
    best = selection.winner([t.result for t in trials])
    prompt, seed = _sample_setting(trials)
    rows = []
    for place, trial in enumerate(ranked, start=1):
        cost = trial.cost
        images = {"curve": f"trials/{trial.result.job_name}/loss_curve.png"
                  if "loss_curve.png" in trial.files else None,
                  "samples": [f"trials/{trial.result.job_name}/{name}" for name in sorted(trial.files)
                              if name.startswith("samples/")]}
        rows.append({"place": place if trial.result.usable else None, **asdict(trial.result),
                     "billable_seconds": cost.billable_seconds, "spot": cost.spot, "spot_discount": cost.spot_discount,
                     "instance_type": cost.instance_type, "instance_count": cost.instance_count,
                     "usd_per_hour_on_demand": cost.usd_per_hour, "estimated_cost_usd": cost.usd,
                     "links": links(trial.description), "note": trial.note, **images})
    return {"dag_id": dag_id, "run_id": run_id, "metric": selection.METRIC, "winner": best.job_name if best else None,
            "prompt": prompt, "seed": seed, "price_region": costs.PRICE_REGION,
            "estimated_cost_usd": sum(r["estimated_cost_usd"] or 0 for r in rows),
            "sheets": [{"max_train_steps": steps, "file": name} for steps, name in sheet_files], "trials": rows}


def markdown(board: dict) -> str:
    def num(value, spec=".5f"):
        return "-" if value is None else format(value, spec)

    lines = [f"# {board['dag_id']} {board['run_id']}", "",
             f"Ranked by {board['metric']} (lower is better). Cost: billable seconds at the on-demand price "
             f"({board['price_region']} list price), an estimate; total {num(board['estimated_cost_usd'], '.2f')} USD.",
             "", "| # | trial | learning rate | steps | rank | val_loss | training s | billable s | spot discount | "
             "est. cost (USD) | status | links |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in board["trials"]:
        found = " ".join(f"[{name}]({url})" for name, url in row["links"].items())
        discount = "-" if row["spot_discount"] is None or not row["spot"] else f"{row['spot_discount']:.0%}"
        status = row["status"] + (f": {row['failure_reason']}" if row["failure_reason"] else "")
        lines.append(f"| {row['place'] or '-'} | {row['job_name']} | {row['learning_rate']:g} | {row['max_train_steps']} | "
                     f"{row['rank']} | {num(row['val_loss'])} | {num(row['training_seconds'], 'd')} | "
                     f"{num(row['billable_seconds'], 'd')} | {discount} | {num(row['estimated_cost_usd'], '.4f')} | "
                     f"{status} | {found} |")
    lines += ["", *[f"![steps {s['max_train_steps']}]({s['file']})" for s in board["sheets"]]]
    return "\n".join(lines) + "\n"


def publish(sagemaker, s3, configs: list[dict], folder: str, dag_id: str, run_id: str) -> dict:
    """Write `<folder>/report/`: trial images, one sheet per steps value, leaderboard.json and .md.
    folder is the run's s3:// grid_search folder. Returns the leaderboard."""
    bucket, prefix = split_s3_uri(folder.rstrip("/") + "/" + REPORT)

    def put(name: str, body: bytes, content_type: str) -> None:
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body, ContentType=content_type)

    trials = collect(sagemaker, s3, configs)
    for trial in trials:
        for name, body in trial.files.items():
            if name.endswith(".png"):
                put(f"trials/{trial.result.job_name}/{name}", body, "image/png")
    sheet_files = []
    for sheet, png in build_sheets(trials):
        put(sheet.name, png, "image/png")
        sheet_files.append((sheet.max_train_steps, sheet.name))
    board = leaderboard(trials, dag_id, run_id, sheet_files)
    put("leaderboard.md", markdown(board).encode(), "text/markdown")
    put(LEADERBOARD, json.dumps(board, indent=2).encode(), "application/json")
    return board
