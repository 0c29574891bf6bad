"""`sdxl-lora prepare` run as the processing job it is: a process with its own SAGEMAKER_BASE_DIR."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ml import synthetic
from ml.data import load_imagefolder


def run_prepare(base: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base)}
    return subprocess.run([sys.executable, "-m", "ml.cli", "prepare", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def raw_dir(base: Path) -> Path:
    """Where a ProcessingInput with LocalPath /opt/ml/processing/input/raw lands."""
    path = base / "processing" / "input" / "raw"
    path.mkdir(parents=True)
    return path


def dataset_dir(base: Path) -> Path:
    return base / "processing" / "output" / "dataset"


def summary(base: Path) -> dict:
    return json.loads((dataset_dir(base) / "prepare_summary.json").read_text())


def failure(base: Path) -> str:
    return (base / "output" / "failure").read_text()


def save(path: Path, size: tuple[int, int], mode: str = "RGB", caption: str | None = None, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, "red" if mode == "RGB" else None).save(path, **options)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n")
    return path


def write_metadata(directory: Path, rows: list[dict]) -> None:
    (directory / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def captions_by_name(dataset: Path) -> dict[str, str]:
    return {e.path.relative_to(dataset).as_posix(): e.caption for e in load_imagefolder(dataset)}


def test_sidecar_captions_become_a_training_imagefolder(tmp_path):
    raw = synthetic.write_dataset(raw_dir(tmp_path), count=3, sidecar_captions=True)
    done = run_prepare(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = {p.with_suffix(".png").name: p.read_text().strip() for p in raw.glob("*.txt")}
    assert captions_by_name(dataset_dir(tmp_path)) == expected
    assert summary(tmp_path)["captions_from"] == {"sidecar": 3}
    assert "prepared 3 of 3 images" in done.stdout


def test_metadata_captions_are_used_and_a_sidecar_wins(tmp_path):
    raw = raw_dir(tmp_path)
    save(raw / "both.png", (8, 8), caption="from the sidecar")
    save(raw / "row.png", (8, 8))
    save(raw / "nested" / "photo.jpg", (8, 8))
    write_metadata(raw, [{"file_name": "both.png", "prompt": "from the row"},
                         {"file_name": "row.png", "prompt": "only a row"},
                         {"file_name": "./nested/photo.jpg", "prompt": "a jpeg in a folder"}])
    done = run_prepare(tmp_path, "--caption-column", "prompt")
    assert done.returncode == 0, done.stdout + done.stderr
    assert captions_by_name(dataset_dir(tmp_path)) == {
        "both.png": "from the sidecar", "row.png": "only a row", "nested/photo.png": "a jpeg in a folder"}
    assert summary(tmp_path)["captions_from"] == {"metadata.jsonl": 2, "sidecar": 1}


def test_images_are_downscaled_never_upscaled_upright_and_rgb(tmp_path):
    raw = raw_dir(tmp_path)
    save(raw / "wide.png", (300, 200), caption="wide")
    save(raw / "small.png", (40, 20), caption="small")
    save(raw / "cutout.png", (10, 10), mode="RGBA", caption="transparent")
    rotated = Image.Exif()
    rotated[0x0112] = 6  # Orientation: the camera was turned, the picture is 90 degrees clockwise
    save(raw / "portrait.jpg", (30, 20), caption="portrait", exif=rotated)
    done = run_prepare(tmp_path, "--resolution", "64")
    assert done.returncode == 0, done.stdout + done.stderr
    dataset = dataset_dir(tmp_path)
    sizes = {}
    for name in ("wide.png", "small.png", "cutout.png", "portrait.png"):
        with Image.open(dataset / name) as image:
            sizes[name] = image.size
            assert image.mode == "RGB"
            if name == "cutout.png":
                assert image.getpixel((0, 0)) == (255, 255, 255)  # transparency becomes white, not black
    assert sizes == {"wide.png": (96, 64), "small.png": (40, 20), "cutout.png": (10, 10), "portrait.png": (20, 30)}
    assert summary(tmp_path)["images_resized"] == 1


def test_corrupt_and_uncaptioned_images_are_skipped_and_reported(tmp_path):
    raw = raw_dir(tmp_path)
    save(raw / "good.png", (8, 8), caption="good")
    (raw / "broken.png").write_bytes(b"not an image")
    (raw / "broken.txt").write_text("a caption for nothing\n")
    truncated = save(raw / "truncated.png", (64, 64), caption="cut short")
    truncated.write_bytes(truncated.read_bytes()[:60])
    save(raw / "uncaptioned.png", (8, 8))
    done = run_prepare(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped broken.png: unreadable" in done.stdout
    assert "skipped truncated.png: unreadable" in done.stdout
    assert ("skipped uncaptioned.png: no_caption (no uncaptioned.txt and no metadata.jsonl row with 'text')"
            in done.stdout)
    assert "prepared 1 of 4 images" in done.stdout
    report = summary(tmp_path)
    assert report["images_found"] == 4 and report["images_written"] == 1 and report["images_skipped"] == 3
    assert report["skipped"] == {"no_caption": ["uncaptioned.png"], "unreadable": ["broken.png", "truncated.png"]}
    assert captions_by_name(dataset_dir(tmp_path)) == {"good.png": "good"}


def test_same_stem_in_two_formats_is_written_once(tmp_path):
    raw = raw_dir(tmp_path)
    save(raw / "shot.jpg", (8, 8), caption="one picture, two files")
    save(raw / "shot.png", (8, 8))
    done = run_prepare(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped shot.png: duplicate_name (shot.jpg is already written as shot.png)" in done.stdout
    assert summary(tmp_path)["skipped"] == {"duplicate_name": ["shot.png"]}


def test_a_missing_input_fails_the_job(tmp_path):
    done = run_prepare(tmp_path)
    assert done.returncode == 1
    raw = tmp_path / "processing" / "input" / "raw"
    assert failure(tmp_path).splitlines()[0] == f"input directory {raw} is missing"


def test_no_usable_image_fails_the_job(tmp_path):
    raw = raw_dir(tmp_path)
    (raw / "broken.png").write_bytes(b"not an image")
    (raw / "broken.txt").write_text("caption\n")
    save(raw / "uncaptioned.png", (8, 8))
    done = run_prepare(tmp_path)
    assert done.returncode == 1
    assert failure(tmp_path).splitlines()[0] == (
        f"no captioned images in {raw}: 2 image files found, skipped: 1 no_caption, 1 unreadable")
    assert not (dataset_dir(tmp_path) / "metadata.jsonl").exists()


@pytest.mark.parametrize("line", ["{not json", '{"text": "no file name"}'])
def test_a_malformed_metadata_line_fails_the_job(tmp_path, line):
    raw = raw_dir(tmp_path)
    save(raw / "a.png", (8, 8))
    (raw / "metadata.jsonl").write_text(line + "\n")
    done = run_prepare(tmp_path)
    assert done.returncode == 1
    assert failure(tmp_path).startswith("metadata.jsonl line 1 in ")


def test_output_is_deterministic_and_paths_outside_opt_ml_are_used_as_given(tmp_path):
    synthetic.write_dataset(raw_dir(tmp_path), count=4, width=96, height=54, sidecar_captions=True)
    outputs = [tmp_path / "first", tmp_path / "second"]
    for output in outputs:
        done = run_prepare(tmp_path, "--output", str(output), "--resolution", "32")
        assert done.returncode == 0, done.stdout + done.stderr
    first, second = ({p.relative_to(o): p.read_bytes() for p in o.rglob("*")} for o in outputs)
    assert first == second
    rows = [json.loads(line) for line in first[Path("metadata.jsonl")].decode().splitlines()]
    assert [row["file_name"] for row in rows] == sorted(row["file_name"] for row in rows)
    assert set(rows[0]) == {"file_name", "text"}
