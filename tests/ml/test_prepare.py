"""`sdxl-lora prepare` run as the processing job it is: a process with its own SAGEMAKER_BASE_DIR."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.dataset.imagefolder import load_imagefolder
from ml.fixtures import synthetic

FAST = ("--resolution", "64", "--min-size", "32")


def run_prepare(base: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base)}
    return subprocess.run([sys.executable, "-m", "ml.cli", "prepare", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def raw_dir(base: Path) -> Path:
    """Where a ProcessingInput with LocalPath /opt/ml/processing/input/raw lands."""
    path = base / "processing" / "input" / "raw"
    path.mkdir(parents=True)
    return path


def dataset_dir(base: Path) -> Path:
    return base / "processing" / "output" / "dataset"


def manifest(base: Path) -> dict:
    return json.loads((dataset_dir(base) / "manifest.json").read_text())


def rows(base: Path) -> dict[str, dict]:
    lines = (dataset_dir(base) / "metadata.jsonl").read_text().splitlines()
    return {row["file_name"]: row for row in map(json.loads, lines)}


def failure(base: Path) -> str:
    return (base / "output" / "failure").read_text()


def save(path: Path, size: tuple[int, int], mode: str = "RGB", caption: str | None = None, colour=None,
         format: str | None = None, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if colour is not None else ("red" if mode in ("RGB", "RGBA") else 0)).save(
        path, format=format, **options)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n")
    return path


def jpeg_bytes(size=(96, 64), colour="blue") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_corpus(raw: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Good images of every kind beside every kind of bad file; returns (good input -> output name,
    bad file -> reason)."""
    good = {}

    def keep(name: str, output: str | None = None) -> None:
        good[name] = output or str(Path(name).with_suffix(".png"))

    save(raw / "rgb.png", (96, 64), caption="rgb"); keep("rgb.png")
    save(raw / "photo.jpg", (96, 64), caption="jpeg", format="JPEG"); keep("photo.jpg")
    save(raw / "web.webp", (96, 64), caption="webp"); keep("web.webp")
    save(raw / "scan.tif", (96, 64), caption="tiff"); keep("scan.tif")
    save(raw / "old.bmp", (96, 64), caption="bmp"); keep("old.bmp")
    frames = [Image.new("P", (96, 64), i) for i in (1, 2)]
    frames[0].save(raw / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    (raw / "anim.txt").write_text("gif\n"); keep("anim.gif")
    (raw / "misnamed.png").write_bytes(jpeg_bytes((96, 64), "green"))  # a JPEG named .png: its real format counts
    (raw / "misnamed.txt").write_text("a jpeg called png\n"); keep("misnamed.png")
    (raw / "noext").write_bytes(jpeg_bytes((64, 96), "yellow"))
    (raw / "noext.txt").write_text("no extension\n"); keep("noext", "noext.png")
    rotated = Image.Exif()
    rotated[0x0112] = 6  # Orientation: the camera was turned; the picture is upright rotated 90 degrees
    save(raw / "turned.jpg", (96, 64), caption="portrait", format="JPEG", exif=rotated); keep("turned.jpg")
    save(raw / "print.jpg", (96, 64), mode="CMYK", caption="cmyk", colour=(255, 0, 0, 0), format="JPEG")
    keep("print.jpg")
    palette = Image.new("P", (96, 64), 0)
    palette.putpalette([0, 0, 0] + [200, 30, 30] * 255)
    palette.save(raw / "palette.png", transparency=0)
    (raw / "palette.txt").write_text("palette with transparency\n"); keep("palette.png")
    save(raw / "gray.png", (96, 64), mode="L", caption="gray", colour=100); keep("gray.png")
    deep = np.full((64, 96), 32768, dtype=np.uint16)
    deep[:, :48] = 65535
    Image.fromarray(deep).save(raw / "deep.png")  # 16-bit grayscale
    (raw / "deep.txt").write_text("sixteen bit\n"); keep("deep.png")
    save(raw / "cutout.png", (96, 64), mode="RGBA", caption="transparent", colour=(0, 0, 0, 0)); keep("cutout.png")
    save(raw / "ink.png", (96, 64), mode="LA", caption="gray alpha", colour=(0, 0)); keep("ink.png")
    # Same stem, different pictures: both kept, the later name (sorted) keeps its extension.
    save(raw / "shot.png", (96, 64), caption="shot", colour="purple"); keep("shot.png", "shot-png.png")
    (raw / "shot.jpg").write_bytes(jpeg_bytes((96, 64), "orange")); keep("shot.jpg", "shot.png")

    bad = {}
    (raw / "empty.png").write_bytes(b""); bad["empty.png"] = "empty_file"
    (raw / "notes.md").write_text("# not a picture\n"); bad["notes.md"] = "not_an_image"
    (raw / "cut.jpg").write_bytes(jpeg_bytes((256, 256), "red")[:700]); bad["cut.jpg"] = "corrupt"
    flipped = bytearray((raw / "rgb.png").read_bytes())
    flipped[60] ^= 0xFF  # inside the first chunk: its checksum no longer matches
    (raw / "flipped.png").write_bytes(bytes(flipped)); bad["flipped.png"] = "corrupt"
    save(raw / "thumb.png", (20, 12), caption="too small"); bad["thumb.png"] = "too_small"
    save(raw / "huge.png", (700, 400), caption="too many pixels"); bad["huge.png"] = "too_large"
    (raw / "z-copy.png").write_bytes((raw / "rgb.png").read_bytes()); bad["z-copy.png"] = "duplicate"
    save(raw / "pixmap.ppm", (96, 64), caption="ppm"); bad["pixmap.ppm"] = "unsupported_format"
    (raw / "stray.txt").write_text("nobody's caption\n"); bad["stray.txt"] = "caption_without_image"
    save(raw / "latin.png", (96, 64), colour="teal")
    (raw / "latin.txt").write_bytes("caf\xe9".encode("latin-1")); bad["latin.png"] = "unreadable_caption"
    return good, bad


def test_every_good_image_comes_through_and_every_bad_file_is_reported(tmp_path):
    good, bad = write_corpus(raw_dir(tmp_path))
    done = run_prepare(tmp_path, *FAST, "--max-pixels", "200000", "--captioner", "none")
    assert done.returncode == 0, done.stdout + done.stderr
    written = rows(tmp_path)
    assert set(written) == set(good.values())
    report = manifest(tmp_path)
    assert {r["file"]: r["reason"] for r in report["rejected"]} == bad
    assert report["counts"]["files_found"] == len(good) + len(bad) + 0
    assert report["counts"]["images_written"] == len(good)
    for name in bad:
        assert f"rejected {name}: {bad[name]}" in done.stdout
    message = (tmp_path / "output" / "message").read_text()  # SageMaker's ExitMessage: the summary
    assert message.startswith(f"dataset version (none given): {len(good)} images from {len(good) + len(bad)} files")
    assert {i["source"]: i["file_name"] for i in report["images"]} == good
    dataset = dataset_dir(tmp_path)

    def pixel(name, xy=(0, 0)):
        with Image.open(dataset / name) as image:
            assert image.mode == "RGB" and image.format == "PNG"
            assert list(image.size[::-1]) == written[name]["bucket"]
            return image.getpixel(xy)

    for name in written:
        pixel(name)
    assert pixel("cutout.png") == (255, 255, 255)  # transparency composited on white, not black
    assert pixel("palette.png") == (255, 255, 255)
    assert pixel("ink.png") == (255, 255, 255)
    assert pixel("deep.png", (2, 10)) == (255, 255, 255) and pixel("deep.png", (70, 10)) == (128, 128, 128)
    assert pixel("anim.png") == (1, 1, 1) or pixel("anim.png")[0] < 10  # the first frame
    assert pixel("print.png")[0] < 40 and pixel("print.png")[2] > 200  # cyan ink is cyan, not inverted
    assert written["turned.png"]["original_size"] == [96, 64]  # upright: taller than wide
    assert written["turned.png"]["bucket"][0] > written["turned.png"]["bucket"][1]
    assert pixel("shot-png.png")[2] > 100 and pixel("shot.png")[1] > 100  # purple and orange, both kept


def test_too_few_usable_images_fails_naming_the_reasons(tmp_path):
    raw = raw_dir(tmp_path)
    save(raw / "ok.png", (96, 64), caption="fine")
    (raw / "broken.png").write_bytes(b"not an image")
    save(raw / "small.png", (10, 10), caption="small")
    done = run_prepare(tmp_path, *FAST, "--min-images", "2", "--captioner", "none")
    assert done.returncode == 1
    assert failure(tmp_path).splitlines()[0] == (
        "only 1 usable image(s) of 3 file(s), fewer than min_images 2; rejected: 1 not_an_image, 1 too_small")
    assert not (dataset_dir(tmp_path) / "metadata.jsonl").exists()
    assert "rejected broken.png: not_an_image" in done.stdout  # the log keeps each file's reason
    assert (tmp_path / "output" / "message").read_text() == failure(tmp_path).splitlines()[0]  # the ExitMessage


def test_captions_from_sidecars_and_metadata_and_a_prefix(tmp_path):
    raw = raw_dir(tmp_path)
    save(raw / "both.png", (96, 64), caption="from the sidecar")
    save(raw / "row.png", (96, 64), colour="blue")
    save(raw / "nested" / "photo.jpg", (96, 64), colour="green", format="JPEG")
    (raw / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"file_name": "both.png", "prompt": "from the row"}, {"file_name": "row.png", "prompt": "only a row"},
        {"file_name": "./nested/photo.jpg", "prompt": "a jpeg in a folder"}]))
    done = run_prepare(tmp_path, *FAST, "--caption-column", "prompt", "--caption-prefix", "sbstyle",
                       "--captioner", "none")
    assert done.returncode == 0, done.stdout + done.stderr
    captions = {e.path.relative_to(dataset_dir(tmp_path)).as_posix(): e.caption
                for e in load_imagefolder(dataset_dir(tmp_path))}
    assert captions == {"both.png": "sbstyle, from the sidecar", "row.png": "sbstyle, only a row",
                        "nested/photo.png": "sbstyle, a jpeg in a folder"}
    assert manifest(tmp_path)["counts"]["captions_from"] == {"metadata.jsonl": 2, "sidecar": 1}


@pytest.mark.parametrize(("size", "bucket"), [((1920, 1080), [48, 80]), ((1024, 768), [56, 72]),
                                               ((800, 800), [64, 64]), ((1080, 1920), [80, 48])],
                         ids=["16:9", "4:3", "1:1", "portrait"])
def test_images_go_to_their_nearest_bucket_with_size_and_crop_recorded(tmp_path, size, bucket):
    raw = raw_dir(tmp_path)
    save(raw / "frame.png", size, caption="a frame")
    done = run_prepare(tmp_path, "--resolution", "64", "--bucket-multiple", "8", "--captioner", "none")
    assert done.returncode == 0, done.stdout + done.stderr
    row = rows(tmp_path)["frame.png"]
    assert row["bucket"] == bucket
    assert row["original_size"] == [size[1], size[0]]
    with Image.open(dataset_dir(tmp_path) / "frame.png") as image:
        assert [image.height, image.width] == bucket
    assert 0 <= row["crop"][0] <= 8 and 0 <= row["crop"][1] <= 8  # only the aspect-ratio difference is cut


def test_a_missing_input_fails_the_job(tmp_path):
    done = run_prepare(tmp_path)
    assert done.returncode == 1
    raw = tmp_path / "processing" / "input" / "raw"
    assert failure(tmp_path).splitlines()[0] == f"input directory {raw} is missing"


@pytest.mark.parametrize("line", ["{not json", '{"text": "no file name"}'])
def test_a_malformed_metadata_line_fails_the_job(tmp_path, line):
    raw = raw_dir(tmp_path)
    save(raw / "a.png", (96, 64))
    (raw / "metadata.jsonl").write_text(line + "\n")
    done = run_prepare(tmp_path, *FAST)
    assert done.returncode == 1
    assert failure(tmp_path).startswith("metadata.jsonl line 1 in ")


def test_output_is_deterministic_and_paths_outside_opt_ml_are_used_as_given(tmp_path):
    synthetic.write_dataset(raw_dir(tmp_path), count=4, width=96, height=54, sidecar_captions=True)
    outputs = [tmp_path / "first", tmp_path / "second"]
    for output in outputs:
        done = run_prepare(tmp_path, "--output", str(output), *FAST, "--captioner", "none")
        assert done.returncode == 0, done.stdout + done.stderr
    first, second = ({p.relative_to(o): p.read_bytes() for p in o.rglob("*") if p.is_file()} for o in outputs)
    assert first == second
    lines = [json.loads(line) for line in first[Path("metadata.jsonl")].decode().splitlines()]
    assert [row["file_name"] for row in lines] == sorted(row["file_name"] for row in lines)
    assert set(lines[0]) == {"file_name", "text", "original_size", "crop", "bucket"}


def uncaptioned_frames(raw: Path, count: int) -> None:
    synthetic.write_dataset(raw, count=count, width=96, height=54)
    (raw / "metadata.jsonl").unlink()  # frames as the original system got them: no captions at all


def test_uncaptioned_frames_are_captioned_by_instructblip_in_batches(tmp_path, captioner_model):
    raw = raw_dir(tmp_path)
    uncaptioned_frames(raw, 3)
    (raw / "frame-0001.txt").write_text("a caption someone wrote\n")
    done = run_prepare(tmp_path, *FAST, "--captioner", str(captioner_model), "--caption-batch-size", "2",
                       "--max-length", "40", "--min-length", "12", "--caption-prefix", "sbstyle")
    assert done.returncode == 0, done.stdout + done.stderr
    written = rows(tmp_path)
    assert written["frame-0001.png"]["text"] == "sbstyle, a caption someone wrote"
    for name in ("frame-0000.png", "frame-0002.png"):
        caption = written[name]["text"]
        assert caption.startswith("sbstyle, ") and len(caption) > len("sbstyle, ")
    report = manifest(tmp_path)
    assert report["counts"]["captions_from"] == {"instructblip": 2, "sidecar": 1}
    assert {i["file_name"]: i["caption_source"] for i in report["images"]} == {
        "frame-0000.png": "instructblip", "frame-0001.png": "sidecar", "frame-0002.png": "instructblip"}
    assert report["settings"]["caption"]["max_length"] == 40
    assert "captioning 2 images with" in done.stdout and "in batches of 2" in done.stdout


def test_recaption_replaces_existing_captions(tmp_path, captioner_model):
    raw = raw_dir(tmp_path)
    uncaptioned_frames(raw, 1)
    (raw / "frame-0000.txt").write_text("old caption\n")
    done = run_prepare(tmp_path, *FAST, "--captioner", str(captioner_model), "--recaption", "--max-length", "30",
                       "--min-length", "5")
    assert done.returncode == 0, done.stdout + done.stderr
    assert rows(tmp_path)["frame-0000.png"]["text"] != "old caption"
    assert manifest(tmp_path)["counts"]["captions_from"] == {"instructblip": 1}


def test_a_captioner_that_cannot_load_fails_naming_it(tmp_path):
    uncaptioned_frames(raw_dir(tmp_path), 1)
    done = run_prepare(tmp_path, *FAST, "--captioner", str(tmp_path / "no-such-model"))
    assert done.returncode == 1
    assert "no-such-model" in failure(tmp_path).splitlines()[0]


def test_a_sharded_run_writes_exactly_what_a_single_instance_does(tmp_path, captioner_model):
    raw = raw_dir(tmp_path)
    uncaptioned_frames(raw, 5)
    (raw / "frame-0003.txt").write_text("captioned by hand\n")
    (raw / "broken.png").write_bytes(b"not an image")
    (raw / "copy.png").write_bytes((raw / "frame-0000.png").read_bytes())
    common = (*FAST, "--captioner", str(captioner_model), "--caption-batch-size", "2", "--max-length", "30",
              "--min-length", "5")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert run_prepare(tmp_path, "--output", str(single), *common).returncode == 0
    for index in (1, 0):
        done = run_prepare(tmp_path, "--output", str(sharded), *common, "--num-shards", "2", "--shard-index",
                           str(index))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"part {index + 1} of 2 written" in done.stdout
    assert not (sharded / "metadata.jsonl").exists()  # nothing final until every part is there
    done = run_prepare(tmp_path, "--merge", str(sharded))
    assert done.returncode == 0, done.stdout + done.stderr

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and p.parent.name != "parts" and p.name != "manifest.json"}

    assert files(sharded) == files(single)
    merged, alone = (json.loads((d / "manifest.json").read_text()) for d in (sharded, single))
    assert merged["shards"] == 2 and alone["shards"] == 1
    assert {**merged, "shards": 1} == alone


def test_a_merge_with_a_part_missing_fails_naming_it(tmp_path):
    uncaptioned_frames(raw_dir(tmp_path), 2)
    output = tmp_path / "out"
    done = run_prepare(tmp_path, "--output", str(output), *FAST, "--captioner", "none", "--num-shards", "2",
                       "--shard-index", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    done = run_prepare(tmp_path, "--merge", str(output))
    assert done.returncode == 1
    assert failure(tmp_path).splitlines()[0].startswith("expected 2 parts, found shards [0]; missing [1]")


def test_captions_longer_than_clip_takes_are_counted_with_the_base_models_tokenizer(tmp_path, base_model):
    raw = raw_dir(tmp_path)
    save(raw / "short.png", (96, 64), caption="a red frame")
    save(raw / "long.png", (96, 64), colour="blue", caption="a blue frame " * 20)
    done = run_prepare(tmp_path, *FAST, "--captioner", "none", "--base-model", str(base_model))
    assert done.returncode == 0, done.stdout + done.stderr
    assert manifest(tmp_path)["counts"]["captions_over_77_tokens"] == 1
    assert "captions over CLIP's 77 tokens: 1" in done.stdout
    assert manifest(tmp_path)["settings"]["base_model"] == str(base_model)
