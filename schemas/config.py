"""The one typed configuration of the `curate` flow.

Profiles are YAML files in `flows/profiles/` (`paper`: the paper's models on GPUs; `offline`: real small weights
that ship inside pip packages, runs on a CPU without a model hub; `test`: tiny random builds of the paper's
architectures). A run = a profile + overrides. Each stage's section, together with the stage's code version and
its upstream stages' fingerprints, is hashed into that stage's fingerprint: change a threshold or a model and
only that stage and the ones after it run again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from models.base import ModelSpec

PROFILES_DIR = Path(__file__).resolve().parent.parent / "flows" / "profiles"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestConfig(Section):
    extensions: list[str] = Field(default_factory=lambda: [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"])
    sidecar_table: str | None = Field(
        None,
        description="parquet/csv/jsonl table with columns uri (or file name) and caption, as Panda-70M ships",
    )
    sidecar_txt: bool = Field(True, description="use <video>.txt next to a video as its caption")
    min_frames: int = Field(
        16, description="shorter videos fail with reason too_short (training clips need motion)"
    )
    min_duration_s: float = 0.5
    max_duration_s: float = 3600.0
    max_pixels: int = Field(4096 * 2304, description="larger frames fail with reason too_large (4K passes)")


class CaptionConfig(Section):
    source: Literal["model", "sidecar", "sidecar_or_model"] = "sidecar_or_model"
    model: ModelSpec = ModelSpec(
        backend="nvila", weights="Efficient-Large-Model/NVILA-8B-hf", dtype="bfloat16"
    )
    num_frames: int = Field(8, description="frames sampled uniformly across the video for the captioner")
    max_new_tokens: int = 256
    prompt_file: str = "caption_v1.txt"


class KeyframeConfig(Section):
    positions: list[float] = Field(default_factory=lambda: [0.05, 0.5, 0.95])
    image_format: Literal["png", "jpg"] = "png"


class PersonConfig(Section):
    model: ModelSpec = ModelSpec(backend="yolo", weights="yolo11x.pt")
    min_score: float = 0.4
    min_height_frac: float = Field(
        0.1, description="persons shorter than this fraction of the frame are ignored"
    )
    match_iou: float = Field(
        0.3, description="min IoU to link a person across keyframes (plus face similarity)"
    )
    require_person: bool = Field(
        True,
        description="fail a video with no detected person (no_person); turn off when faces.persons_from_faces "
        "stands in for a person detector that misses seated or cropped people (offline profile)",
    )


class FaceConfig(Section):
    model: ModelSpec = ModelSpec(backend="insightface", weights="buffalo_l")
    min_score: float = 0.5
    min_size_px: int = 32
    min_sharpness: float = 20.0
    min_frontalness: float = 0.4
    person_margin: float = Field(0.05, description="grow the person box by this fraction before face search")
    crop_margin: float = Field(0.15, description="grow the face box by this fraction for the saved crop")
    persons_from_faces: bool = Field(
        False,
        description="also search the whole keyframe for faces; a face outside every person box becomes a person "
        "(box extrapolated from the face, source 'face'). For weak person detectors (offline profile)",
    )


class ClipConfig(Section):
    max_side: int = Field(1280, description="longer side of the stored clip; larger sources are downscaled")
    reencode: Literal["auto", "always"] = Field(
        "auto", description="auto: keep H.264 mp4 sources byte for byte when small enough; always: re-encode"
    )
    crf: int = 20


class ShardConfig(Section):
    prefix: str = "shard"
    maxcount: int = 1000
    maxsize: int = 2_000_000_000


class RunConfig(Section):
    batch_size: int = Field(
        8, ge=1, description="videos per Prefect task; tasks map over batches, not videos"
    )
    max_batches_in_flight: int = Field(
        8,
        ge=1,
        description="batches submitted ahead through the stage pipeline (bounds memory and server load)",
    )
    gpu_slot: str | None = Field(
        "gpu",
        description="global concurrency limit held by GPU stages (create it with `prefect gcl create gpu`)",
    )
    retries: int = Field(
        2, description="retries of a batch on transient errors (I/O, CUDA OOM), with backoff"
    )
    retry_failed: bool = Field(False, description="rerun videos whose failure was recorded in an earlier run")


class EntitiesConfig(Section):
    model: ModelSpec = ModelSpec(
        backend="qwen2.5-vl", weights="Qwen/Qwen2.5-VL-7B-Instruct", dtype="bfloat16"
    )
    max_retries: int = Field(2, ge=0, description="follow-up turns showing the model its rule violation")
    max_subjects: int = Field(3, ge=1, description="the released loader recommends at most 3 subjects")
    max_attributes: int = Field(3, ge=0, description="per subject; the released loader recommends at most 3")
    max_new_tokens: int = 512
    prompt_file: str = "entities_v1.txt"


class SelectConfig(Section):
    seed_salt: str = Field("", description="mixed into the per-video seed; change it to draw other keyframes")


class MasksConfig(Section):
    """GroundingDINO turns entity phrases into boxes, SAM turns boxes into masks, `check_mask` filters them."""

    grounder: ModelSpec = ModelSpec(backend="grounding-dino", weights="IDEA-Research/grounding-dino-base")
    segmenter: ModelSpec = ModelSpec(backend="sam", weights="sam_vit_h_4b8939.pth")
    min_area_frac: float = Field(0.02, description="mask area / prompt-box area below this: 'too small'")
    max_area_frac: float = Field(1.5, description="mask area / prompt-box area above this: 'too large'")
    min_inside_frac: float = Field(
        0.8, description="share of the mask inside its prompt box, else 'outside box'"
    )
    min_largest_component_frac: float = Field(
        0.6, description="share of the mask in its largest connected piece, else 'fragmented'"
    )


class BackgroundConfig(Section):
    """FLUX Fill repaints persons and objects out of the background's keyframe; a person detector checks it."""

    model: ModelSpec = ModelSpec(
        backend="flux-fill", weights="black-forest-labs/FLUX.1-Fill-dev", dtype="bfloat16", batch_size=4
    )
    dilate_frac: float = Field(
        0.015, ge=0.0, description="grow the foreground mask by this fraction of the frame's longer side"
    )
    max_retries: int = Field(
        2, ge=0, description="new seeds for a plate on which the person detector still finds someone"
    )
    seed: int = Field(0, description="base of the per-video inpainting seeds")


class CurateConfig(Section):
    profile: str = "paper"
    ingest: IngestConfig = IngestConfig()
    caption: CaptionConfig = CaptionConfig()
    keyframes: KeyframeConfig = KeyframeConfig()
    persons: PersonConfig = PersonConfig()
    faces: FaceConfig = FaceConfig()
    clip: ClipConfig = ClipConfig()
    shards: ShardConfig = ShardConfig()
    run: RunConfig = RunConfig()
    subjects: bool = Field(
        False,
        description="subject-consistent curation: run entities, masks and background and write v2 samples "
        "(faces + attributes + objects + background plate); off = identity-only v1 samples",
    )
    entities: EntitiesConfig = EntitiesConfig()
    select: SelectConfig = SelectConfig()
    masks: MasksConfig = MasksConfig()
    background: BackgroundConfig = BackgroundConfig()
    extra: dict[str, Any] = Field(default_factory=dict)

    def random_weight_stages(self) -> list[str]:
        """Stages whose model is a test build: their outputs are not data."""
        specs: dict[str, list[ModelSpec]] = {
            "caption": [self.caption.model],
            "persons": [self.persons.model],
            "faces": [self.faces.model],
        }
        if self.subjects:
            specs["entities"] = [self.entities.model]
            specs["masks"] = [self.masks.grounder, self.masks.segmenter]
            specs["background"] = [self.background.model]
        return [name for name, stage_specs in specs.items() if any(s.random_init for s in stage_specs)]


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(profile: str | Path = "offline", overrides: dict[str, Any] | None = None) -> CurateConfig:
    """A profile name (flows/profiles/<name>.yaml) or a YAML path, with nested overrides on top."""
    path = Path(profile)
    if not path.suffix:
        path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no profile {profile!r} (known: {known}; or pass a YAML file path)")
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("profile", path.stem)
    return CurateConfig.model_validate(_deep_merge(data, overrides or {}))


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-able parts (pydantic models are dumped first)."""
    norm = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    blob = json.dumps(norm, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
