"""`make bench-prepare`: the prepare job's throughput.

1. Checking and bucketing: `ml.prepare.job.prepare` over storyboard frames with sidecar captions (full
   decode, EXIF, RGB, content hash, nearest bucket, LANCZOS resize, minimal crop, PNG), in images/s.
2. Captioning: InstructBLIP in batches (`--batch-size`, the job's default 8) against one image at a
   time, the way the original system captioned its frames, with the original generation settings and
   the same images, alternating runs; printed as captions/s and their ratio.

By default the captioner is the tiny random InstructBLIP (`sdxl-lora tiny-captioner`); `--captioner DIR`
names a real one (Salesforce/instructblip-vicuna-7b staged locally, on a GPU).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def frames(out: Path, count: int, width: int, height: int) -> Path:
    from ml.fixtures.synthetic import make_frame

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for index in range(count):
        image, caption = make_frame(rng, width, height)
        image.save(out / f"frame-{index:04d}.jpg", quality=92)
        (out / f"frame-{index:04d}.txt").write_text(caption + "\n")
    return out


def bench_check_and_bucket(root: Path, count: int, resolution: int, repeats: int) -> list[float]:
    from ml.prepare import job as prepare

    raw = frames(root / "raw", count, 1920, 1080)
    rates = []
    for run in range(repeats):
        output = root / f"out-{run}"
        started = time.perf_counter()
        prepare.prepare(prepare.Options(raw, output, resolution=resolution, captioner="none"))
        rates.append(count / (time.perf_counter() - started))
    return rates


def bench_captioning(root: Path, model: str, count: int, batch_size: int, repeats: int) -> tuple[list, list]:
    from PIL import Image

    from ml.prepare.captioning import Captioner, CaptionSettings

    raw = frames(root / "caption", count, 1344, 768)
    images = [Image.open(p).convert("RGB") for p in sorted(raw.glob("*.jpg"))]
    batched = Captioner(model, CaptionSettings(batch_size=batch_size))
    single = Captioner(model, CaptionSettings(batch_size=1))
    batched.caption(images[:batch_size])  # warm-up: first-call allocations are not what is measured
    single.caption(images[:1])
    ours, theirs = [], []
    for _ in range(repeats):  # alternating, so drifting machine load hits both alike
        for captioner, rates in ((batched, ours), (single, theirs)):
            started = time.perf_counter()
            captions = captioner.caption(images)
            rates.append(len(captions) / (time.perf_counter() - started))
    return ours, theirs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="1920x1080 frames to check and bucket")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--captions", type=int, default=32, help="images to caption per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--captioner", help="InstructBLIP directory (default: the tiny random one)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.captioner
        if not model:
            from ml.fixtures import tiny_captioner

            model = str(tiny_captioner.build(root / "tiny-instructblip"))
        checked = bench_check_and_bucket(root, args.images, args.resolution, args.repeats)
        ours, theirs = bench_captioning(root, model, args.captions, args.batch_size, args.repeats)
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"machine: {device}; captioner: {args.captioner or 'tiny random InstructBLIP'}; medians of {args.repeats}")
    print(f"check + bucket at {args.resolution}: {statistics.median(checked):.1f} images/s "
          f"({args.images} JPEG frames 1920x1080 -> PNG in their bucket)")
    print(f"captioning, batches of {args.batch_size}: {statistics.median(ours):.2f} captions/s")
    print(f"captioning, one image at a time (the original way): {statistics.median(theirs):.2f} captions/s")
    print(f"batched / one at a time: {statistics.median(ours) / statistics.median(theirs):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
