"""Stand-in stages for measuring and testing the executors without models or media.

They have the names and record types of real stages (so `run.stages` resources and the shard writer apply
unchanged) but read no file and load no model:

- `StubIngest` ("ingest"): a `VideoRecord` from the file's name (content id = hash of the file's first bytes, so
  copies are duplicates, as with real ingest); a file whose name contains `crash_on` kills its worker process
  with SIGSEGV, as a native library would.
- `StubModel` ("caption"): stands in for a GPU model: `setup()` appends a line to `load_log` (every model load is
  counted), `process` sleeps `sleep_s` per batch (waiting, like I/O or a GPU kernel) and records which worker and
  GPU served it.
- `StubSample` ("sample"): a two-member WebDataset sample.

Knobs come from `config.extra["standin"]`: `sleep_s`, `load_log`, `crash_on`, `tag` (changes the stand-in model's
fingerprint, like a config change).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from typing import Any

from schemas.config import CurateConfig, load_config
from schemas.records import CaptionRecord, ModelInfo, VideoRecord
from schemas.sample import SampleRecord
from tasks.base import Stage, StageError, VideoContext


def knobs(config: CurateConfig) -> dict[str, Any]:
    return dict(config.extra.get("standin", {}))


class StubIngest(Stage[VideoRecord]):
    name = "ingest"
    record_type = VideoRecord

    def settings(self):
        return {"crash_on": knobs(self.config).get("crash_on")}

    def result_key(self, ctx: VideoContext) -> str:
        return ctx.source.uri_key

    def process(self, videos: list[VideoContext]) -> dict[str, VideoRecord | StageError]:
        crash_on = knobs(self.config).get("crash_on")
        out: dict[str, VideoRecord | StageError] = {}
        for ctx in videos:
            if crash_on and crash_on in os.path.basename(ctx.uri):
                os.kill(os.getpid(), signal.SIGSEGV)
            with open(ctx.uri, "rb") as f:
                head = f.read(4096)
            key = ctx.source.uri_key
            if head.startswith(b"bad"):
                out[key] = StageError("not_a_video", f"{ctx.uri} says it is bad")
                continue
            vid = "v" + hashlib.blake2b(head, digest_size=10).hexdigest()
            ctx.source = ctx.source.model_copy(update={"video_id": vid})
            out[key] = VideoRecord(
                video_id=vid,
                uri=ctx.uri,
                size_bytes=len(head),
                container="stub",
                codec="stub",
                width=64,
                height=64,
                fps=16.0,
                duration_s=1.0,
                num_frames=16,
            )
        return out


class StubModel(Stage[CaptionRecord]):
    name = "caption"
    record_type = CaptionRecord
    requires = ("ingest",)
    uses_gpu = True

    def settings(self):
        k = knobs(self.config)
        return {"tag": k.get("tag", ""), "sleep_s": k.get("sleep_s", 0.0)}

    def setup(self) -> None:
        if getattr(self, "_loaded", False):
            return
        self._loaded = True
        log = knobs(self.config).get("load_log")
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")

    def process(self, videos: list[VideoContext]) -> dict[str, CaptionRecord | StageError]:
        self.setup()
        time.sleep(float(knobs(self.config).get("sleep_s", 0.0)))
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        info = ModelInfo(backend="stub", model_id=f"pid {os.getpid()} gpus {gpus}")
        tag = knobs(self.config).get("tag", "")
        return {
            c.video_id: CaptionRecord(
                video_id=c.video_id, caption=f"a video {tag}".strip(), source="model", model=info
            )
            for c in videos
        }


class StubSample(Stage[SampleRecord]):
    name = "sample"
    record_type = SampleRecord
    requires = ("caption",)
    reusable = False

    def process(self, videos: list[VideoContext]) -> dict[str, SampleRecord | StageError]:
        out: dict[str, SampleRecord | StageError] = {}
        for ctx in videos:
            caption = ctx.record("caption", CaptionRecord).caption
            meta = json.dumps(
                {"key": ctx.video_id, "uri": ctx.uri, "caption": caption}, sort_keys=True
            ).encode()
            ctx.output = {"caption.txt": caption.encode(), "meta.json": meta}
            v = ctx.video
            out[ctx.video_id] = SampleRecord(
                key=ctx.video_id,
                members=sorted(ctx.output),
                schema_version=1,
                video_id=v.video_id,
                uri=v.uri,
                caption=caption,
                caption_source="model",
                num_persons=0,
                num_faces=0,
                duration_s=v.duration_s,
                fps=v.fps,
                width=v.width,
                height=v.height,
                num_bytes=len(meta) + len(caption),
                random_weights=False,
                config_fingerprint=self.config.data_fingerprint(),
            )
        return out


STUB_STAGES = [StubIngest, StubModel, StubSample]


def stub_config(**standin: Any) -> CurateConfig:
    """The `test` profile's run settings around the stand-ins (identity-only, CPU)."""
    return load_config("offline", {"extra": {"standin": standin}, "run": {"batch_size": 4, "retries": 0}})


def write_stub_videos(directory: str, n: int, *, prefix: str = "video") -> list[str]:
    """`n` small distinct files named like videos (the stand-in ingest reads their first bytes)."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(directory, f"{prefix}_{i:05d}.mp4")
        with open(path, "wb") as f:
            f.write(f"stub video {prefix} {i}\n".encode())
        paths.append(path)
    return paths
