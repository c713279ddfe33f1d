"""Fixture writers for the lumosx_model tests: curated-format WebDataset shards and official case folders.

Independent of the curation flow on purpose: they write the documented sample format directly.
"""

from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from schemas.official_case import CaseImage, CaseSubject, OfficialCase, write_case


def mp4_bytes(width: int, height: int, *, frames: int, fps: int = 24, seed: int = 0) -> bytes:
    """A small H.264 clip whose blue channel encodes the frame index (10 levels per frame)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=3)
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = (xx * 4 + i * 8) % 256
            img[..., 1] = (yy * 4 + base[1]) % 256
            img[..., 2] = (i * 10 + base[2]) % 256
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return out.getvalue()


def png_bytes(width: int, height: int, color: tuple[int, ...], *, alpha: bool = False) -> bytes:
    mode = "RGBA" if alpha else "RGB"
    im = Image.new(mode, (width, height), color if not alpha else (*color[:3], 255))
    if alpha:  # transparent border, as a SAM cut-out
        px = np.array(im)
        px[:2, :, 3] = 0
        im = Image.fromarray(px, "RGBA")
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


PERSON_WORDS = [
    ("man", "black shirt", "white hat"),
    ("woman", "red dress", "blue scarf"),
    ("boy", "green jacket", "yellow cap"),
    ("girl", "pink skirt", "brown shoes"),
]


def sample(
    key: str,
    *,
    persons: int,
    width: int = 48,
    height: int = 32,
    frames: int = 24,
    fps: int = 24,
    schema_version: int = 2,
    attributes: int = 2,
    whole: bool = True,
    objects: bool = True,
    background: bool = True,
    seed: int = 0,
) -> dict:
    """One sample in the curated shard format (schema 1: faces only, no labels; schema 2: everything)."""
    v2 = schema_version == 2
    members: dict[str, bytes] = {}
    meta_persons, caption_parts = [], []
    for p, (noun, *attrs) in enumerate(PERSON_WORDS[:persons]):
        attrs = attrs[:attributes] if v2 else []
        members[f"face_{p}.png"] = png_bytes(10 + p, 12, (200, 150 - 20 * p, 120))
        if v2 and whole:
            members[f"person_{p}.png"] = png_bytes(8, 20, (60 + 30 * p, 60, 60), alpha=True)
        for a in range(len(attrs)):
            members[f"attr_{p}_{a}.png"] = png_bytes(14, 9, (30 * a, 200, 40 * p), alpha=True)
        meta_persons.append(
            {
                "person_id": p,
                "label": noun if v2 else None,
                "face": f"face_{p}.png",
                "whole": f"person_{p}.png" if (v2 and whole) else None,
                "attributes": [
                    {"label": lab, "image": f"attr_{p}_{a}.png", "mask": f"attrmask_{p}_{a}.png"}
                    for a, lab in enumerate(attrs)
                ],
            }
        )
        caption_parts.append(f"a {noun} in a {' and a '.join(attrs)}" if attrs else f"a {noun}")
    caption = " and ".join(caption_parts) + " talking"
    meta = {
        "schema_version": schema_version,
        "key": key,
        "caption": "",
        "video": {
            "uri": f"file:///{key}.mp4",
            "content_id": key,
            "fps": fps,
            "width": width,
            "height": height,
            "duration_s": frames / fps,
            "num_frames": frames,
        },
        "persons": meta_persons,
        "objects": [],
        "background": None,
        "selection": {"face_0": 0},  # provenance the trainer does not read
    }
    if v2 and objects:
        members["object_0.png"] = png_bytes(16, 16, (120, 80, 40), alpha=True)
        meta["objects"] = [{"label": "wooden table", "image": "object_0.png", "mask": "objmask_0.png"}]
        caption += " at a wooden table"
    if v2 and background:
        members["background.png"] = png_bytes(width, height, (90, 140, 90))
        meta["background"] = {"label": "garden", "image": "background.png"}
        caption += " in a garden"
    meta["caption"] = caption
    out = {
        "__key__": key,
        "mp4": mp4_bytes(width, height, frames=frames, fps=fps, seed=seed),
        "caption.txt": caption.encode(),
        "meta.json": json.dumps(meta).encode(),
    }
    out.update(members)
    return out


def write_shards(root: Path, samples: list[dict], per_shard: int = 4) -> list[str]:
    """Write samples into shards of ``per_shard``; returns the shard paths."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(samples), per_shard):
        path = root / f"shard-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for s in samples[start : start + per_shard]:
                sink.write(s)
        paths.append(str(path))
    return paths


def case_folder(root: Path, *, persons: int = 2) -> Path:
    """An official case folder with faces, attributes, an object and a background."""
    subjects = []
    caption_parts = []
    for p, (noun, a1, _) in enumerate(PERSON_WORDS[:persons]):
        subjects.append(
            CaseSubject(
                face=CaseImage(label=noun, data=png_bytes(10, 12, (200, 150, 120 + p))),
                attributes=[CaseImage(label=a1, data=png_bytes(14, 9, (20, 200, 40)))],
            )
        )
        caption_parts.append(f"a {noun} in a {a1}")
    caption = " and ".join(caption_parts) + " at a wooden table in a garden"
    case = OfficialCase(
        case_id="case_0",
        caption=caption,
        subjects=subjects,
        objects=[CaseImage(label="wooden table", data=png_bytes(16, 16, (120, 80, 40)))],
        background=CaseImage(label="garden", data=png_bytes(48, 32, (90, 140, 90))),
    )
    return write_case(case, root / "case_0")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Import into a test module to run it on one intra-op thread: with tiny tensors, threads only add contention
    on a 2-core CI machine (10x slower when it is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_train_config(tmp_path, shards, **overrides):
    """The `tiny` training preset reading ``shards`` and writing into ``tmp_path``, with overrides."""
    from lumosx_model.config import TrainConfig

    overrides["data"] = {"shards": shards, **overrides.get("data", {})}
    return TrainConfig.preset("tiny", output_dir=str(tmp_path), **overrides)
