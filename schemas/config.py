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
from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    min_side_px: int = Field(
        64, ge=1, description="smaller frames fail with reason too_small (no face or person survives it)"
    )
    max_sidecar_bytes: int = Field(
        65536, ge=1, description="a larger sidecar caption is refused (bad_sidecar); it is never read whole"
    )


class CaptionConfig(Section):
    source: Literal["model", "sidecar", "sidecar_or_model"] = "sidecar_or_model"
    model: ModelSpec = ModelSpec(
        backend="nvila", weights="Efficient-Large-Model/NVILA-8B-hf", dtype="bfloat16"
    )
    num_frames: int = Field(8, description="frames sampled uniformly across the video for the captioner")
    max_new_tokens: int = 256
    prompt_file: str = "caption_v1.txt"
    max_chars: int = Field(
        2000,
        ge=1,
        description="a longer caption fails the video (caption_too_long) instead of being cut: the trainer's "
        "UMT5 reads 512 tokens, and a label past the cut could never be found in the caption",
    )


class KeyframeConfig(Section):
    positions: list[float] = Field(default_factory=lambda: [0.05, 0.5, 0.95])


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
    encoder_threads: int = Field(
        4, ge=1, description="x264 threads: fixed, because x264's output depends on it (reproducible shards)"
    )


class ShardConfig(Section):
    prefix: str = Field("shard", pattern=r"^[a-z0-9_]+$")
    maxcount: int = Field(1000, ge=1)
    maxsize: int = Field(2_000_000_000, ge=1)
    include_random_weights: bool = Field(
        False,
        description="write samples that a random-weight test build helped make (flagged in their meta.json); "
        "off: they become failure rows (random_weights), because they are not training data",
    )


STAGE_NAMES = (
    "ingest",
    "keyframes",
    "caption",
    "persons",
    "faces",
    "entities",
    "masks",
    "binding",
    "background",
    "sample",
)
"""Every stage a run can have, in run order (tasks/pipeline.py says which run for a configuration)."""


class ReplicaRange(Section):
    min: int = Field(1, ge=1, description="replicas that must be placed before the run starts")
    max: int | None = Field(
        None, ge=1, description="at most this many; None = as many as the cluster's free resources allow"
    )


class StageResources(Section):
    """What one replica (one Ray actor, models loaded once) of a stage needs, and how many replicas to run."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per replica; fractions share a GPU (0.5: two replicas on one GPU)"
    )
    memory_gb: float | None = Field(None, gt=0, description="host memory per replica, for Ray's scheduler")
    replicas: ReplicaRange = ReplicaRange()
    seconds_per_video: float = Field(
        1.0,
        gt=0,
        description="time one replica spends per video (the run report measures it). Spare resources are "
        "shared out so that replicas grow in proportion to it: every stage then keeps pace with the others",
    )


def _default_resources() -> dict[str, StageResources]:
    return {name: StageResources() for name in STAGE_NAMES}


class RunConfig(Section):
    """How a run executes. None of it changes a sample, so none of it is part of any fingerprint."""

    batch_size: int = Field(8, ge=1, description="videos per batch: the unit a replica processes at once")
    partition_size: int = Field(
        2000,
        ge=1,
        description="videos per partition: the unit Prefect sees (one task run each), retries and resumes",
    )
    partitions_in_flight: int = Field(2, ge=1, description="partitions streaming through the stages at once")
    batches_in_flight: int = Field(
        8,
        ge=1,
        description="batches of one partition between its source and its shard writer (bounds memory)",
    )
    retries: int = Field(
        2, ge=0, description="retries of a batch on transient errors (CUDA OOM, I/O), and of a partition"
    )
    retry_failed: bool = Field(False, description="rerun videos whose failure was recorded in an earlier run")
    stages: dict[str, StageResources] = Field(
        default_factory=_default_resources,
        description="per stage: resources of one replica and how many replicas (Ray executor)",
    )

    @field_validator("stages", mode="before")
    @classmethod
    def _known_stages(cls, value: Any) -> Any:
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(STAGE_NAMES))
            if unknown:
                raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGE_NAMES)}")
            merged = {name: StageResources().model_dump() for name in STAGE_NAMES}
            for name, res in value.items():
                merged[name] = res
            return merged
        return value


class EntitiesConfig(Section):
    model: ModelSpec = ModelSpec(
        backend="qwen2.5-vl", weights="Qwen/Qwen2.5-VL-7B-Instruct", dtype="bfloat16"
    )
    max_retries: int = Field(2, ge=0, description="follow-up turns showing the model its rule violation")
    max_subjects: int = Field(3, ge=1, description="the released loader recommends at most 3 subjects")
    max_attributes: int = Field(3, ge=0, description="per subject; the released loader recommends at most 3")
    max_new_tokens: int = 512
    prompt_file: str = Field(
        "entities_v2.txt", description="v2 passes the caption as a JSON string (data, never instructions)"
    )
    shared_attributes: Literal["keep", "drop", "fail"] = Field(
        "keep",
        description="one attribute phrase bound to several persons ('two men both wear black jackets'): keep "
        "it for each (MCAM's template arithmetic gives its words level 0, each group keeps its own image), "
        "drop it for all, or fail the answer (shared_attribute, shown to the model as a rule violation)",
    )
    refuse_injected_captions: bool = Field(
        True,
        description="fail a video (caption_injection) whose caption carries chat-control tokens, planted answer "
        "JSON or 'ignore previous instructions': captions come from the internet and such text is not a "
        "description of the video",
    )


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
    min_inside_person_frac: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="share of an attribute's grounding box, and of its mask, inside its own person's box (grown "
        "by person_margin), else 'outside person': checked here, whatever the grounder does with the region",
    )
    person_margin: float = Field(
        0.05,
        ge=0.0,
        description="grow the person box by this fraction of its size for that check (hair, bags)",
    )


class BindingConfig(Section):
    """A second model checks every attribute binding on the pixels (tasks/binding_check.py)."""

    model: ModelSpec = Field(
        ModelSpec(backend="clip", weights="openai/clip-vit-large-patch14"),
        description="an image-text embedder (models/image_text.py) that did not make the binding: clip, siglip "
        "or colour (offline, colour words only)",
    )
    on_failure: Literal["drop", "fail"] = Field(
        "drop",
        description="an attribute whose crop matches another person's phrase (or region) better than its own: "
        "drop that attribute from the sample, or fail the video (binding_unverified)",
    )
    phrase_margin: float = Field(
        0.0, description="the own phrase must beat the best other person's phrase by more than this (cosine)"
    )
    region_margin: float = Field(
        0.0,
        description="fail when more of the attribute's mask lies on another person's region (SAM mask, else "
        "box) than on its own, by more than this share",
    )
    same_text_cosine: float = Field(
        0.98,
        le=1.0,
        description="another person's phrase whose text embedding is this close to the own phrase is no "
        "evidence either way (e.g. the same phrase kept for two persons) and is left out of the comparison",
    )
    check_region: bool = Field(
        True, description="also check whose region (person mask) the attribute's mask is on"
    )
    text_template: str = Field(
        "a photo of {}",
        description="each phrase is embedded as this sentence ('{}' = the phrase): CLIP and SigLIP were trained "
        "on captions, not bare noun phrases (the colour matcher reads only the colour words either way)",
    )

    @field_validator("text_template")
    @classmethod
    def _one_slot(cls, template: str) -> str:
        if template.count("{}") != 1 or template.count("{") != 1 or template.count("}") != 1:
            raise ValueError(
                f"text_template must contain '{{}}' exactly once and no other braces, got {template!r}"
            )
        return template


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
    binding: BindingConfig = BindingConfig()
    background: BackgroundConfig = BackgroundConfig()
    extra: dict[str, Any] = Field(default_factory=dict)

    def data_fingerprint(self) -> str:
        """What determines the data: every section but how the run executes (`run`) and packs shards."""
        return fingerprint(self.model_dump(mode="json", exclude={"run", "shards"}))

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
            specs["binding"] = [self.binding.model]
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
