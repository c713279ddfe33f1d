"""How fast the gallery of a 1,000-sample output opens: build it, then measure first paint in headless Chromium.

    python -m benchmarks.bench_gallery [--samples 1000] [--out DIR]

The output is synthetic but complete: subject-consistent (v2) samples with three keyframes, two persons with face
crops, attribute and whole-person cut-outs with masks, an object, a background plate, random-weight flags on a
tenth of them, plus failures of three kinds. Prints the build time, the size of the first page, and Chromium's
first-contentful-paint and load-event times of index.html, cold (fresh browser) and warm (second visit).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from schemas.sample import FAILURES_SCHEMA, SampleMeta, ShardEntry, ShardIndex, dump_sample_meta
from tasks.output import FAILURES, INDEX, REPORT, SHARDS

CAPTION = (
    "A woman in a red jacket and a man in a blue scarf talk next to a yellow umbrella in a quiet city street."
)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _media(tmp: Path) -> dict[str, bytes]:
    """The member bytes every synthetic sample shares (made once): a clip, crops, cut-outs, masks, a plate."""
    from flows.sample_data import astronaut_photo, write_video

    photo = astronaut_photo().resize((320, 320))
    frames = [photo.crop((i * 4, 40, i * 4 + 256, 184)) for i in range(16)]
    clip = write_video(tmp / "clip.mp4", frames, 8).read_bytes()
    mask = Image.new("L", (60, 80), 0)
    ImageDraw.Draw(mask).ellipse((4, 4, 56, 76), fill=255)
    cut = Image.composite(photo.crop((100, 180, 160, 260)), Image.new("RGB", (60, 80), "white"), mask)
    return {
        "mp4": clip,
        "face.png": _png(photo.crop((150, 60, 230, 150))),
        "cut.png": _png(cut),
        "mask.png": _png(mask),
        "plate.png": _png(frames[8]),
    }


def synthetic_meta(key: str, i: int) -> SampleMeta:
    random_weights = i % 10 == 0
    models = {
        stage: {
            "backend": backend,
            "model_id": model,
            "revision": "0123456789abcdef0123456789abcdef01234567",
            "random_weights": random_weights,
        }
        for stage, backend, model in (
            ("persons", "yolo", "yolo11x.pt"),
            ("faces", "insightface", "buffalo_l"),
            ("masks", "grounding-dino", "IDEA-Research/grounding-dino-base"),
        )
    }
    box = lambda x0, y0, x1, y1: {"x0": x0, "y0": y0, "x1": x1, "y1": y1}  # noqa: E731
    persons = []
    for pid, (label, attr, x) in enumerate((("A woman", "red jacket", 10), ("a man", "blue scarf", 130))):
        persons.append(
            {
                "person_id": pid,
                "label": label,
                "face": f"face_{pid}.png",
                "face_keyframe": 1,
                "face_box": box(x + 30, 10, x + 70, 50),
                "face_score": 0.9,
                "boxes": {str(k): box(x + 2 * k, 5, x + 110 + 2 * k, 144) for k in range(3)},
                "scores": {str(k): 0.8 for k in range(3)},
                "attributes": [
                    {
                        "label": attr,
                        "kind": "top" if pid == 0 else "accessory",
                        "image": f"attr_{pid}_0.png",
                        "mask": f"attr_{pid}_0_mask.png",
                        "keyframe": 1,
                        "box": box(x + 20, 60, x + 90, 140),
                        "score": 0.7,
                        "mask_score": 0.9,
                    }
                ],
                "whole": f"whole_{pid}.png",
                "whole_mask": f"whole_{pid}_mask.png",
                "whole_keyframe": 0,
                "whole_box": box(x, 5, x + 110, 144),
            }
        )
    return SampleMeta.model_validate(
        {
            "schema_version": 2,
            "key": key,
            "caption": CAPTION,
            "video": {
                "uri": f"/data/raw/video_{i:05d}.mp4",
                "fps": 8.0,
                "width": 256,
                "height": 144,
                "duration_s": 2.0,
                "num_frames": 16,
                "clip_width": 256,
                "clip_height": 144,
            },
            "keyframes": [
                {"index": k, "position": p, "time_s": p * 2.0, "frame_index": round(p * 16)}
                for k, p in enumerate((0.05, 0.5, 0.95))
            ],
            "persons": persons,
            "objects": [
                {
                    "label": "yellow umbrella",
                    "image": "object_0.png",
                    "mask": "object_0_mask.png",
                    "keyframe": 2,
                    "box": box(200, 40, 250, 120),
                    "score": 0.6,
                }
            ],
            "background": {"label": "a quiet city street", "image": "background.png", "keyframe": 1},
            "models": models,
            "random_weights": random_weights,
            "random_weight_stages": sorted(models) if random_weights else [],
            "config_fingerprint": "0000synthetic",
        }
    )


def write_synthetic_output(out: Path, samples: int, per_shard: int = 250, failures: int = 30) -> Path:
    """A curation output (shards, index.json, failures.parquet, report.json) of `samples` synthetic samples."""
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        media = _media(Path(tmp))
    entries = []
    for s, start in enumerate(range(0, samples, per_shard)):
        name = f"shard-000000-{s:06d}.tar"
        keys = []
        with tarfile.open(out / SHARDS / name, "w") as tar:
            for i in range(start, min(samples, start + per_shard)):
                key = f"v{i:019d}"
                keys.append(key)
                meta = synthetic_meta(key, i)
                members = {
                    "mp4": media["mp4"],
                    "caption.txt": CAPTION.encode(),
                    "meta.json": dump_sample_meta(meta),
                }
                for p in meta.persons:
                    members[p.face] = media["face.png"]
                    for a in p.attributes:
                        members[a.image], members[a.mask] = media["cut.png"], media["mask.png"]
                    members[p.whole], members[p.whole_mask] = media["cut.png"], media["mask.png"]
                for o in meta.objects:
                    members[o.image], members[o.mask] = media["cut.png"], media["mask.png"]
                members[meta.background.image] = media["plate.png"]
                for member, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{member}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        entries.append(
            ShardEntry(
                url=name,
                count=len(keys),
                num_bytes=(out / SHARDS / name).stat().st_size,
                sha256="0" * 64,
                keys=keys,
                sample_fingerprints=dict.fromkeys(keys, "synthetic"),
            )
        )
    (out / INDEX).write_text(ShardIndex(shards=entries).model_dump_json(indent=1))
    reasons = ("no_face", "decode_error", "no_caption")
    rows = [
        {
            "video_id": f"f{i}",
            "uri": f"/data/raw/broken_{i:04d}.mp4",
            "stage": "faces",
            "error_class": reasons[i % 3],
            "message": f"synthetic failure {i}",
            "time": datetime.now(UTC),
        }
        for i in range(failures)
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=FAILURES_SCHEMA), out / FAILURES)
    report = {
        "profile": "synthetic",
        "config_fingerprint": "0000synthetic",
        "samples": samples,
        "videos_failed": failures,
        "videos_found": samples + failures,
        "random_weight_samples": sum(i % 10 == 0 for i in range(samples)),
    }
    (out / REPORT).write_text(json.dumps(report))
    return out


def main(argv: list[str] | None = None) -> None:
    from benchmarks.browser import Browser, find_chromium
    from tasks.gallery import build_gallery

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument(
        "--out", default=None, help="where to write the synthetic output (default: a temporary dir)"
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp) / "synthetic-output"
        t0 = time.perf_counter()
        write_synthetic_output(out, args.samples)
        t1 = time.perf_counter()
        summary = build_gallery(str(out))
        t2 = time.perf_counter()
        index = Path(summary.path)
        thumbs = sum(1 for _ in (index.parent / "thumbs").rglob("*.jpg"))
        print(f"synthetic output: {args.samples} samples in {t1 - t0:.1f} s")
        print(
            f"gallery: {summary.samples} samples, {summary.pages} pages, {thumbs} thumbnails, built in {t2 - t1:.1f} s "
            f"({1000 * (t2 - t1) / max(summary.samples, 1):.0f} ms/sample); index.html "
            f"{index.stat().st_size / 1024:.0f} KiB"
        )
        if find_chromium() is None:
            print("no chromium: first paint not measured (apt-get install -y chromium)")
            return
        url = index.resolve().as_uri()
        with Browser(1280, 900) as browser:
            cold = browser.open(url)
            warm = browser.open(url)
            last = browser.open((index.parent / f"page-{summary.pages:04d}.html").resolve().as_uri())
        for name, r in (("cold", cold), ("warm", warm), ("last page, warm", last)):
            print(
                f"first contentful paint ({name}): {r.first_contentful_paint_ms:.0f} ms; "
                f"load event: {r.load_event_ms:.0f} ms; console errors: {len(r.console_errors)}"
            )
        verdict = "PASS" if cold.first_contentful_paint_ms < 2000 else "FAIL"
        print(f"{verdict}: first paint of a {summary.samples}-sample gallery under 2 s (cold)")


if __name__ == "__main__":
    main()
