"""ViCLIP-T (generated video <-> its caption) and ViCLIP-V (generated video <-> the ground-truth clip).

Both are cosine similarities of a video-text model's L2-normalised embeddings (models/video_text.py samples
`num_frames`, default 8, frames uniformly, as the paper does with VideoCLIP-XL-v2).
"""

from __future__ import annotations

import numpy as np


def viclip_t(model, video: np.ndarray, caption: str) -> float:
    """The model's own video-text score when it has one (X-CLIP conditions the text on the video, the way it was
    trained to score a caption), else the cosine of the two embeddings."""
    if hasattr(model, "similarity"):
        return float(np.asarray(model.similarity([video], [caption]))[0, 0])
    v = np.asarray(model.embed_videos([video]), np.float32)
    t = np.asarray(model.embed_texts([caption]), np.float32)
    return float((v @ t.T)[0, 0])


def viclip_v(model, video: np.ndarray, ground_truth: np.ndarray) -> float:
    v = np.asarray(model.embed_videos([video, ground_truth]), np.float32)
    return float(v[0] @ v[1])
