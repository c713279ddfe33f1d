"""A visual QA gallery of a curation output: static HTML pages and JPEG thumbnails, nothing to build or serve.

    lumosx-curate gallery OUT            -> OUT/gallery/index.html (also written at the end of every local run)

What a data engineer needs to *see* and no table shows: per sample, the three keyframes with every person's box
numbered and drawn in that person's colour (face boxes dashed, attribute and object boxes thin), the face crop,
each attribute cut-out with its mask outline in its person's colour, objects, the background plate next to the
keyframe it was cleaned from, the caption with every label highlighted in its owner's colour, the scores, the
models (and a loud banner when random test weights made a sample), plus geometry checks (a face outside its
person's box). A second page lists failed videos grouped by reason with a thumbnail and the file name.

Why it opens fast at any size: pages of `page_size` samples (plain links, no script needed to browse), small
JPEG thumbnails rather than frames, explicit image sizes and `loading="lazy"` (the browser paints the text and
layout first and fetches only the images near the viewport), all CSS inline. No external URL is referenced, so
it works from disk (file://) or any static web server, offline. One tiny inline script only counts images that
failed to load and says so in a banner (tests read its counters).

Everything written lives under the gallery directory; member and key names from the data are validated before
they become file names.
"""

from __future__ import annotations

import html
import io
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from schemas.records import Box
from schemas.sample import SampleMeta, ShardIndex, load_sample_meta
from tasks.output import FAILURES, INDEX, REPORT, SHARDS, OutputDir

logger = logging.getLogger(__name__)

GALLERY_DIR = "gallery"
MARKER = ".lumosx-gallery"  # only a directory carrying it is ever cleared before a rebuild
PAGE_SIZE = 50
KEYFRAME_SIDE = 320  # thumbnail longer side, pixels: enough to judge a box, ~10-20 kB as JPEG
CROP_SIDE = 128
FAILURE_THUMBS_PER_REASON = 24
FAILURE_ROWS_PER_REASON = 500
PALETTE = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
    "#42d4f4", "#f032e6", "#9a6324", "#469990", "#808000",
)  # fmt: skip
OBJECT_COLOUR = "#7f7f7f"
BACKGROUND_COLOUR = "#b0a080"
_SAFE = re.compile(r"^[A-Za-z0-9_\-]+$")


def person_colour(person_id: int) -> str:
    return PALETTE[person_id % len(PALETTE)]


@dataclass
class GallerySummary:
    path: str
    """index.html of the gallery (local path)."""
    samples: int = 0
    pages: int = 0
    failures: int = 0
    truncated: bool = False
    """True when `max_samples` cut the gallery short of the output's samples."""
    random_weight_samples: int = 0
    broken_samples: int = 0
    """Samples whose meta.json could not be read (shown as an error card)."""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class _RawSample:
    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)


def iter_shard_samples(stream, shard: str) -> Iterator[_RawSample]:
    """WebDataset samples of one tar stream: consecutive members sharing a key (the part before the first dot)."""
    current: _RawSample | None = None
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if not info.isfile() or "." not in info.name:
                continue
            key, member = info.name.split(".", 1)
            if current is None or current.key != key:
                if current is not None:
                    yield current
                current = _RawSample(key, shard)
            f = tar.extractfile(info)
            current.members[member] = f.read() if f is not None else b""
    if current is not None:
        yield current


def _shard_sources(output: OutputDir | None, shards: list[str] | None) -> list[tuple[str, Any]]:
    """(name, opener) for each shard: the given files/directories, else the output's index.json order."""
    out: list[tuple[str, Any]] = []
    if shards:
        for s in shards:
            p = Path(s)
            files = sorted(p.glob("*.tar")) if p.is_dir() else [p]
            out += [(f.name, partial(f.open, "rb")) for f in files]
        return out
    assert output is not None
    if output.exists(INDEX):
        index = ShardIndex.model_validate_json(output.read_bytes(INDEX))
        names = [e.url for e in index.shards]
    else:
        names = sorted(n for n in output.list_sizes(SHARDS) if n.endswith(".tar"))
    return [(n, (lambda n=n: output.open_read(posixpath.join(SHARDS, n)))) for n in names]


def _read_failures(output: OutputDir | None) -> list[dict[str, Any]]:
    if output is None or not output.exists(FAILURES):
        return []
    import pyarrow.parquet as pq

    with output.open_read(FAILURES) as f:
        return pq.read_table(f, columns=["video_id", "uri", "stage", "error_class", "message"]).to_pylist()


def _read_report(output: OutputDir | None) -> dict[str, Any]:
    if output is None or not output.exists(REPORT):
        return {}
    try:
        return json.loads(output.read_bytes(REPORT))
    except ValueError:
        return {}


# ---------------------------------------------------------------------------------------------- images
def _save_jpeg(image: Image.Image, path: Path, side: int) -> tuple[int, int]:
    image = image.convert("RGB")
    image.thumbnail((side, side), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=80, optimize=False)
    return image.size


def _outlined(cutout: Image.Image, mask: Image.Image | None, colour: str, side: int) -> Image.Image:
    """The cut-out with its mask's outline drawn in `colour` (2 px), at thumbnail size."""
    image = cutout.convert("RGB")
    image.thumbnail((side, side), Image.BILINEAR)
    if mask is None:
        return image
    m = np.asarray(mask.convert("L").resize(image.size, Image.NEAREST)) > 127
    grown = m.copy()
    for _ in range(2):  # a 2 px ring just outside the mask
        ring = grown.copy()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            ring |= np.roll(np.roll(grown, dy, 0), dx, 1)
        grown = ring
    edge = grown & ~m
    arr = np.asarray(image).copy()
    arr[edge] = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    return Image.fromarray(arr)


def _keyframe_images(mp4: bytes, times: list[float]) -> list[Image.Image]:
    from tasks.keyframes import sample_frames

    # PyAV reads the clip by name; a private temporary file keeps concurrent renders apart.
    fd, tmp = tempfile.mkstemp(prefix="lumosx-gallery-", suffix=".mp4")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(mp4)
        return sample_frames(tmp, times, max_side=KEYFRAME_SIDE * 2)
    finally:
        os.unlink(tmp)


# ---------------------------------------------------------------------------------------------- one sample
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(src: str, size: tuple[int, int], alt: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return (
        f'<img{c} src="{_e(src)}" width="{size[0]}" height="{size[1]}" alt="{_e(alt)}" '
        f'loading="lazy" decoding="async">'
    )


def _rect(box: Box, colour: str, label: str, cls: str, dashed: bool = False, font: float = 12.0) -> str:
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    return (
        f'<g class="{cls}"><rect x="{box.x0:.1f}" y="{box.y0:.1f}" width="{box.width:.1f}" '
        f'height="{box.height:.1f}" fill="none" stroke="{colour}" vector-effect="non-scaling-stroke" '
        f'stroke-width="{"2" if cls == "pbox" else "1.5"}"{dash}/>'
        + (
            f'<text x="{box.x0 + font / 4:.1f}" y="{box.y0 + font / 4:.1f}" fill="{colour}" class="lbl" '
            f'font-size="{font:.0f}">{_e(label)}</text>'
            if label
            else ""
        )
        + "</g>"
    )


def highlight_caption(meta: SampleMeta) -> str:
    """The caption as HTML, each label marked in its owner's colour (longest label first where they overlap)."""
    labels: list[tuple[str, str, str]] = []  # (label, colour, title)
    for p in meta.persons:
        if p.label:
            labels.append((p.label, person_colour(p.person_id), f"person {p.person_id}"))
        for a in p.attributes:
            labels.append((a.label, person_colour(p.person_id), f"person {p.person_id}: {a.kind}"))
    for o in meta.objects:
        labels.append((o.label, OBJECT_COLOUR, "object"))
    if meta.background is not None:
        labels.append((meta.background.label, BACKGROUND_COLOUR, "background"))
    text = meta.caption
    taken = [False] * len(text)
    spans: list[tuple[int, int, str, str]] = []
    for label, colour, title in sorted(labels, key=lambda t: -len(t[0])):
        for m in re.finditer(rf"(?<!\w){re.escape(label)}(?!\w)", text):
            if not any(taken[m.start() : m.end()]):
                taken[m.start() : m.end()] = [True] * (m.end() - m.start())
                spans.append((m.start(), m.end(), colour, title))
    out, at = [], 0
    for start, end, colour, title in sorted(spans):
        out.append(_e(text[at:start]))
        out.append(
            f'<mark style="border-color:{colour};background:{colour}33" title="{_e(title)}">'
            f"{_e(text[start:end])}</mark>"
        )
        at = end
    out.append(_e(text[at:]))
    return "".join(out)


def qa_notes(meta: SampleMeta) -> list[str]:
    """Geometry that is wrong on its face: a face box not inside its own person's box on the same keyframe."""
    notes = []
    for p in meta.persons:
        if p.face_box is None or p.face_keyframe is None:
            continue
        box = p.boxes.get(p.face_keyframe)
        if box is None:
            continue
        f = p.face_box
        slack = 0.1 * max(f.width, f.height)
        if f.x0 < box.x0 - slack or f.x1 > box.x1 + slack or f.y0 < box.y0 - slack or f.y1 > box.y1 + slack:
            notes.append(
                f"person {p.person_id}: face box (x {f.x0:.0f}-{f.x1:.0f}, y {f.y0:.0f}-{f.y1:.0f}) is not inside "
                f"its person box on keyframe {p.face_keyframe} (x {box.x0:.0f}-{box.x1:.0f}, "
                f"y {box.y0:.0f}-{box.y1:.0f})"
            )
    for p in meta.persons:
        for k, b in p.boxes.items():
            if b.width < 2 or b.height < 2:
                notes.append(f"person {p.person_id}: degenerate box on keyframe {k}")
    return notes


def short_revision(rev: str) -> str:
    """`git:`/`sha256:` digests cut to 12 hex digits for display (the full one is the element's title)."""
    kind, _, value = rev.partition(":")
    if kind in ("git", "sha256") and len(value) > 12:
        return f"{kind}:{value[:12]}…"
    return rev


def _models_html(meta: SampleMeta) -> str:
    items = []
    for stage, info in sorted(meta.models.items()):
        rev = info.revision or "unresolved"
        rnd = ' <b class="rnd">RANDOM WEIGHTS</b>' if info.random_weights else ""
        items.append(
            f"<li><b>{_e(stage)}</b> {_e(info.backend)} <code>{_e(info.model_id)}</code> "
            f'<code class="rev" title="{_e(rev)}">{_e(short_revision(rev))}</code>{rnd}</li>'
        )
    return f'<ul class="models">{"".join(items)}</ul>' if items else ""


def _scores_html(meta: SampleMeta) -> str:
    rows = []
    for p in meta.persons:
        c = person_colour(p.person_id)
        fq = p.face_quality
        person_scores = ", ".join(f"k{k} {v:.2f}" for k, v in sorted(p.scores.items())) or "-"
        attrs = "; ".join(
            f"{_e(a.label)} ({a.score:.2f}/{a.mask_score:.2f})"
            if a.score is not None and a.mask_score is not None
            else _e(a.label)
            for a in p.attributes
        )
        rows.append(
            f'<tr><td><span class="dot" style="background:{c}"></span>P{p.person_id}</td>'
            f"<td>{'-' if p.face_score is None else f'{p.face_score:.2f}'}</td>"
            f"<td>{'-' if fq is None else f'{fq.score:.2f}'}</td>"
            f"<td>{'-' if fq is None or fq.size_px is None else f'{fq.size_px:.0f}'}</td>"
            f"<td>{person_scores}</td><td>{attrs or '-'}</td></tr>"
        )
    if not rows:
        return ""
    return (
        '<table class="scores"><tr><th>person</th><th>face det</th><th>face quality</th><th>face px</th>'
        "<th>person det (per keyframe)</th><th>attributes (grounding/mask)</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _keyframes_html(meta: SampleMeta, frames: list[tuple[str, tuple[int, int]]]) -> str:
    """The keyframe thumbnails with SVG overlays in source-frame pixels (the viewBox scales them)."""
    v = meta.video
    cw, ch = v.clip_width or v.width or 1, v.clip_height or v.height or 1
    # Boxes are in the upright source frame; the stored clip is that frame, possibly scaled down.
    scale = max(v.width or cw, v.height or ch) / max(cw, ch)
    vw, vh = cw * scale, ch * scale
    font = max(vw, vh) / 22  # labels about 14 px high on a 320 px thumbnail, whatever the frame size
    out = []
    for kf, (src, size) in zip(meta.keyframes, frames):
        shapes = []
        for p in meta.persons:
            c = person_colour(p.person_id)
            box = p.boxes.get(kf.index)
            if box is not None:
                shapes.append(_rect(box, c, f"P{p.person_id}", "pbox", font=font))
            if p.face_box is not None and p.face_keyframe == kf.index:
                shapes.append(_rect(p.face_box, c, "", "fbox", dashed=True))
            for a in p.attributes:
                if a.box is not None and a.keyframe == kf.index:
                    shapes.append(_rect(a.box, c, "", "abox", dashed=True))
            if p.whole_box is not None and p.whole_keyframe == kf.index:
                shapes.append(_rect(p.whole_box, c, "", "abox", dashed=True))
        for o in meta.objects:
            if o.box is not None and o.keyframe == kf.index:
                shapes.append(_rect(o.box, OBJECT_COLOUR, o.label, "obox", font=font * 0.8))
        out.append(
            f'<figure class="kf">{_img(src, size, f"keyframe {kf.index}")}'
            f'<svg viewBox="0 0 {vw:.0f} {vh:.0f}" preserveAspectRatio="none">{"".join(shapes)}</svg>'
            f"<figcaption>keyframe {kf.index} · {kf.time_s:.2f} s</figcaption></figure>"
        )
    return f'<div class="kfs">{"".join(out)}</div>'


def render_sample(raw: _RawSample, gallery: Path) -> tuple[str, dict[str, Any]]:
    """One sample's card (HTML) and what the summary needs; thumbnails written under gallery/thumbs/<key>/."""
    info: dict[str, Any] = {"key": raw.key, "random_weights": False, "broken": False, "models": {}}
    if not _SAFE.match(raw.key):
        info["broken"] = True
        return f'<section class="sample broken"><h2>unsafe key {_e(raw.key[:80])}</h2></section>', info
    try:
        meta = load_sample_meta(raw.members.get("meta.json", b""))
    except ValueError as e:
        info["broken"] = True
        return (
            f'<section class="sample broken"><h2>{_e(raw.key)}</h2><p class="err">meta.json unreadable: '
            f"{_e(str(e)[:300])}</p></section>",
            info,
        )
    info["random_weights"] = meta.random_weights
    info["models"] = {s: (m.model_id, m.revision, m.random_weights) for s, m in meta.models.items()}
    rel = f"thumbs/{raw.key}"
    out_dir = gallery / rel
    members = raw.members

    def thumb(member: str, side: int = CROP_SIDE, colour: str | None = None, mask: str | None = None):
        data = members.get(member)
        if data is None:
            return None
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
            m = None
            if mask and mask in members:
                m = Image.open(io.BytesIO(members[mask]))
            if colour is not None:
                image = _outlined(image, m, colour, side)
            name = member.rsplit(".", 1)[0] + ".jpg"
            size = _save_jpeg(image, out_dir / name, side)
            return f"{rel}/{name}", size
        except (OSError, ValueError):
            return None

    notes = qa_notes(meta)
    frames: list[tuple[str, tuple[int, int]]] = []
    if "mp4" in members and meta.keyframes:
        try:
            images = _keyframe_images(members["mp4"], [k.time_s for k in meta.keyframes])
            for kf, image in zip(meta.keyframes, images):
                name = f"kf{kf.index}.jpg"
                frames.append((f"{rel}/{name}", _save_jpeg(image, out_dir / name, KEYFRAME_SIDE)))
        except Exception as e:  # a clip that does not decode is a finding, not a crash of the gallery
            notes.append(f"clip does not decode: {type(e).__name__}: {str(e)[:200]}")

    conds = []
    for p in meta.persons:
        c = person_colour(p.person_id)
        parts = []
        t = thumb(p.face)
        if t:
            parts.append(
                f'<figure class="face">{_img(*t, f"face {p.person_id}")}<figcaption>face</figcaption></figure>'
            )
        for a in p.attributes:
            t = thumb(a.image, colour=c, mask=a.mask)
            if t:
                parts.append(
                    f'<figure class="attr">{_img(*t, a.label)}<figcaption>{_e(a.label)}</figcaption></figure>'
                )
        if p.whole:
            t = thumb(p.whole, colour=c, mask=p.whole_mask)
            if t:
                parts.append(
                    f'<figure class="attr">{_img(*t, "whole")}<figcaption>whole</figcaption></figure>'
                )
        label = f" {_e(p.label)}" if p.label else ""
        conds.append(
            f'<div class="person" style="border-color:{c}"><div class="ptitle" style="color:{c}">'
            f"P{p.person_id}{label}</div>{''.join(parts)}</div>"
        )
    for o in meta.objects:
        t = thumb(o.image, colour=OBJECT_COLOUR, mask=o.mask)
        if t:
            conds.append(
                f'<div class="person obj"><figure class="attr">{_img(*t, o.label)}'
                f"<figcaption>{_e(o.label)}</figcaption></figure></div>"
            )
    if meta.background is not None:
        t = thumb(meta.background.image, side=KEYFRAME_SIDE // 2)
        src = next((f for k, f in zip(meta.keyframes, frames) if k.index == meta.background.keyframe), None)
        if t:
            pair = f'<figure class="bg">{_img(*t, "background plate")}<figcaption>plate: {_e(meta.background.label)}</figcaption></figure>'
            if src:
                half = (src[1][0] // 2, src[1][1] // 2)
                pair = (
                    f'<figure class="bg">{_img(src[0], half, "source keyframe")}<figcaption>source keyframe '
                    f"{meta.background.keyframe}</figcaption></figure>" + pair
                )
            conds.append(f'<div class="person bgpair">{pair}</div>')
    elif meta.background_status is not None and meta.background_status.status != "ok":
        notes.append(
            f"no background plate: {meta.background_status.status} ({meta.background_status.reason})"
        )
    for d in meta.dropped:
        notes.append(f"dropped {d.entity}{f' ({d.label})' if d.label else ''}: {d.reason}")
    for p in meta.persons_without_face:
        notes.append(f"person {p.person_id} without face: {p.reason}")
    if meta.persons_unbound:
        notes.append(f"persons with a face but no caption subject: {meta.persons_unbound}")

    badge = '<span class="rnd">RANDOM WEIGHTS: not data</span>' if meta.random_weights else ""
    src = meta.video.uri or ""
    card = (
        f'<section class="sample{" random" if meta.random_weights else ""}" id="{_e(raw.key)}">'
        f'<h2><a href="#{_e(raw.key)}">{_e(raw.key)}</a> <small>v{meta.schema_version} · {_e(raw.shard)} · '
        f"{_e(posixpath.basename(src))}</small> {badge}</h2>"
        + _keyframes_html(meta, frames)
        + (f'<div class="conds">{"".join(conds)}</div>' if conds else "")
        + f'<p class="caption">{highlight_caption(meta)}</p>'
        + ('<ul class="qa">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>" if notes else "")
        + _scores_html(meta)
        + _models_html(meta)
        + "</section>"
    )
    return card, info


# ---------------------------------------------------------------------------------------------- pages
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{background:#222;color:#eee;padding:10px 16px}header a{color:#9cf}
.banner{background:#c00;color:#fff;font-weight:700;padding:10px 16px;font-size:16px}
#img-errors{display:none}#img-errors.on{display:block}
nav{padding:8px 16px}nav a{margin-right:8px}
main{padding:0 16px 24px}
.sample{background:#fff;border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:8px 12px}
.sample.random{border:3px solid #c00}.sample h2{font-size:15px;margin:4px 0 8px}.sample h2 small{color:#777}
.rnd{background:#c00;color:#fff;padding:1px 6px;border-radius:3px;font-size:12px}
.kfs,.conds{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
figure{margin:0}figcaption{font-size:11px;color:#666;text-align:center;max-width:160px}
.kf{position:relative;line-height:0}.kf img{display:block;max-width:320px;height:auto;background:#ddd}
.kf svg{position:absolute;left:0;top:0;width:100%;height:calc(100% - 16px);overflow:visible}
.kf figcaption{line-height:16px;height:16px}
.lbl{font-weight:700;font-family:sans-serif;dominant-baseline:hanging;paint-order:stroke;stroke:#fff;stroke-width:2px;
 vector-effect:non-scaling-stroke}
.person{border:2px solid #ccc;border-radius:5px;padding:4px;display:flex;gap:6px;align-items:flex-start;
 flex-wrap:wrap;margin-top:8px}.ptitle{font-weight:700;width:100%;font-size:12px}
.person img{background:#eee;display:block}
mark{border-bottom:3px solid;padding:0 1px;color:inherit}
.caption{max-width:1100px}.qa{color:#a40;margin:4px 0}.err{color:#c00}
.scores{border-collapse:collapse;font-size:12px}.scores td,.scores th{border:1px solid #ddd;padding:2px 6px}
.dot{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:4px}
.models{font-size:12px;color:#444;margin:6px 0 0;padding-left:18px}code{font-size:11px}
table.fail{border-collapse:collapse;background:#fff}table.fail td,table.fail th{border:1px solid #ddd;padding:3px 6px;
 vertical-align:top;font-size:12px}table.fail img{display:block;background:#eee}
"""

# Counts images that loaded and failed; a failure shows a banner (and tests read the counters off the DOM).
_SCRIPT = """
<script>
(function(){var ok=0,bad=0,s=document.getElementById('img-status'),b=document.getElementById('img-errors');
function upd(){s.dataset.loaded=ok;s.dataset.failed=bad;s.dataset.total=document.images.length;
if(bad){b.className='banner on';b.textContent=bad+' image(s) of this page failed to load';}}
function watch(i){if(i.complete&&i.naturalWidth){ok++;return;}if(i.complete&&i.getAttribute('src')){bad++;return;}
i.addEventListener('load',function(){ok++;upd();});i.addEventListener('error',function(){bad++;upd();});}
Array.prototype.forEach.call(document.images,watch);upd();
if(window.PerformanceObserver){try{new PerformanceObserver(function(l){l.getEntries().forEach(function(e){
if(e.name==='first-contentful-paint'){s.dataset.fcp=e.startTime.toFixed(1);}});}).observe({type:'paint',buffered:true});}catch(e){}}
})();
</script>
"""


def _page(title: str, banner: str, header: str, nav: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"{banner}<div id=img-errors></div><div id=img-status hidden></div>"
        f"<header>{header}</header><nav>{nav}</nav><main>{body}</main><nav>{nav}</nav>{_SCRIPT}</body></html>\n"
    )


def _page_name(number: int) -> str:
    return "index.html" if number == 1 else f"page-{number:04d}.html"


def _nav(number: int, pages: int | None, has_next: bool, failures: int | None) -> str:
    links = []
    if number > 1:
        links.append(f'<a href="{_page_name(number - 1)}" rel=prev>&larr; page {number - 1}</a>')
    links.append(f"<b>page {number}{f' of {pages}' if pages else ''}</b>")
    if has_next:
        links.append(f'<a href="{_page_name(number + 1)}" rel=next>page {number + 1} &rarr;</a>')
    if number != 1:
        links.append('<a href="index.html">overview</a>')
    if failures is not None:
        links.append(f'<a href="failures.html">failures ({failures})</a>')
    return " ".join(links)


def _banner(random_samples: int) -> str:
    if not random_samples:
        return ""
    return (
        f'<div class="banner" id="random-banner">RANDOM WEIGHTS: {random_samples} sample(s) here were made by '
        "random-weight test builds. They are NOT training data.</div>"
    )


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


REFUSED_FOR_SAFETY = {"outside_input"}
"""Failure reasons whose file must not be read at all (a link out of the input tree: nothing from it enters)."""


def _thumbnail_allowed(uri: str, reason: str) -> bool:
    """Only a regular local file that is not a link, and not refused for safety: a FIFO named *.mp4 would block
    open() forever, and a link may point outside the input, which nothing may copy into the output."""
    if reason in REFUSED_FOR_SAFETY:
        return False
    try:
        return stat.S_ISREG(os.lstat(uri).st_mode)
    except (OSError, ValueError):
        return False


def _failures_page(failures: list[dict[str, Any]], gallery: Path, banner: str, header: str) -> None:
    from tasks.keyframes import sample_frames

    by_reason: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in failures:
        by_reason[f["error_class"]].append(f)
    parts = [
        "<p>"
        + ", ".join(
            f'<a href="#r-{_e(r)}">{_e(r)}</a> {len(v)}'
            for r, v in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
        )
        + "</p>"
        if failures
        else "<p>No video failed.</p>"
    ]
    n = 0
    for reason, rows in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        parts.append(
            f'<h2 id="r-{_e(reason)}">{_e(reason)} ({len(rows)})</h2><table class="fail">'
            "<tr><th>thumbnail</th><th>file</th><th>stage</th><th>message</th></tr>"
        )
        for i, row in enumerate(rows[:FAILURE_ROWS_PER_REASON]):
            cell = "-"
            uri = row["uri"]
            if i < FAILURE_THUMBS_PER_REASON and _thumbnail_allowed(uri, reason):
                try:
                    (image,) = sample_frames(uri, [0.0], max_side=CROP_SIDE * 2)
                    n += 1
                    name = f"thumbs/failures/{n:06d}.jpg"
                    size = _save_jpeg(image, gallery / name, CROP_SIDE)
                    cell = _img(name, size, posixpath.basename(uri))
                except Exception:  # a failed video often cannot be decoded: that is why it failed
                    cell = "(no frame)"
            parts.append(
                f'<tr class="failure"><td>{cell}</td><td title="{_e(uri)}">{_e(posixpath.basename(uri))}</td>'
                f"<td>{_e(row['stage'])}</td><td>{_e(row['message'][:300])}</td></tr>"
            )
        if len(rows) > FAILURE_ROWS_PER_REASON:
            parts.append(
                f"<tr><td colspan=4>… {len(rows) - FAILURE_ROWS_PER_REASON} more in failures.parquet</td></tr>"
            )
        parts.append("</table>")
    nav = '<a href="index.html">&larr; samples</a>'
    _write(gallery / "failures.html", _page("failures", banner, header, nav, "".join(parts)))


def _header(output_label: str, report: dict[str, Any], samples: int | None, truncated: bool) -> str:
    bits = [f"<b>lumosx-curate gallery</b> · <code>{_e(output_label)}</code>"]
    if report:
        bits.append(
            f"profile <b>{_e(report.get('profile'))}</b> · config <code>{_e(report.get('config_fingerprint'))}</code>"
            f" · {_e(report.get('samples'))} samples · {_e(report.get('videos_failed'))} of "
            f"{_e(report.get('videos_found'))} videos failed"
        )
    if samples is not None:
        bits.append(f"{samples} samples shown{' (cut at --max-samples)' if truncated else ''}")
    return " · ".join(bits)


def _clear(gallery: Path) -> None:
    """Remove a previous gallery, only if it is one (the marker file): never a directory we did not write."""
    if gallery.exists():
        if not (gallery / MARKER).exists() and any(gallery.iterdir()):
            raise FileExistsError(f"{gallery} exists and is not a gallery; choose another --dest")
        shutil.rmtree(gallery)
    gallery.mkdir(parents=True)
    (gallery / MARKER).write_text("written by lumosx-curate gallery; rebuilt (deleted) on every run\n")


def build_gallery(
    output: str | OutputDir | None = None,
    dest: str | Path | None = None,
    *,
    shards: list[str] | None = None,
    failures: bool = True,
    page_size: int = PAGE_SIZE,
    max_samples: int | None = None,
    workers: int | None = None,
) -> GallerySummary:
    """Write the gallery of `output` (its shards in index order, failures.parquet, report.json) under `dest`.

    `dest` defaults to `<output>/gallery` for a local output (a remote one needs a local `dest`). `shards` reads
    these tar files or directories instead of the output's. `max_samples` stops after that many samples (the
    end-of-run gallery of a huge output shows its first ones). Thumbnails are made on `workers` threads
    (decoding and JPEG encoding release the GIL).
    """
    out = output if isinstance(output, OutputDir) or output is None else OutputDir(output)
    if dest is None:
        if out is None or not out.local:
            raise ValueError("a gallery of a remote output (or of bare shards) needs a local dest directory")
        dest = out.path(GALLERY_DIR)
    gallery = Path(dest)
    _clear(gallery)
    report = _read_report(out)
    failed = _read_failures(out) if failures else []
    label = out.url if out is not None else ", ".join(shards or [])
    workers = workers or min(8, os.cpu_count() or 1)
    summary = GallerySummary(path=str(gallery / "index.html"))
    models: dict[str, set] = defaultdict(set)

    pending: list[str] = []  # cards of the page being filled
    first_page: list[str] | None = None
    number = 0

    def flush(has_next: bool) -> None:
        nonlocal number, first_page
        number += 1
        if number == 1:
            first_page = list(pending)  # written last, with the totals
        else:
            nav = _nav(number, None, has_next, len(failed) if failures else None)
            _write(
                gallery / _page_name(number),
                _page(
                    f"gallery page {number}",
                    _banner(summary.random_weight_samples),
                    header,
                    nav,
                    "".join(pending),
                ),
            )
        pending.clear()

    header = _header(label, report, None, False)
    samples = _iter_samples(out, shards, max_samples, summary)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            chunk = [s for _, s in zip(range(page_size), samples)]
            if not chunk:
                break
            if pending:
                flush(has_next=True)
            for card, info in pool.map(lambda r: render_sample(r, gallery), chunk):
                pending.append(card)
                summary.samples += 1
                summary.random_weight_samples += int(info["random_weights"])
                summary.broken_samples += int(info["broken"])
                for stage, m in info["models"].items():
                    models[stage].add(m)
    if pending or number == 0:
        flush(has_next=False)
    summary.pages = number
    summary.failures = len(failed)
    header = _header(label, report, summary.samples, summary.truncated)
    random_total = max(summary.random_weight_samples, int(report.get("random_weight_samples") or 0))
    banner = _banner(random_total)
    overview = [_overview(summary, models, failed if failures else None)]
    nav = _nav(1, summary.pages, summary.pages > 1, len(failed) if failures else None)
    body = "".join(overview) + ("".join(first_page or []) or "<p>No samples.</p>")
    _write(gallery / "index.html", _page("gallery", banner, header, nav, body))
    if failures:
        _failures_page(failed, gallery, banner, header)
    return summary


def _iter_samples(
    out: OutputDir | None, shards: list[str] | None, max_samples: int | None, summary: GallerySummary
) -> Iterator[_RawSample]:
    n = 0
    for name, opener in _shard_sources(out, shards):
        try:
            with opener() as f:
                for raw in iter_shard_samples(f, name):
                    if max_samples is not None and n >= max_samples:
                        summary.truncated = True
                        return
                    n += 1
                    yield raw
        except (OSError, tarfile.TarError) as e:
            logger.warning("gallery: cannot read shard %s: %s", name, e)


def _overview(summary: GallerySummary, models: dict[str, set], failed: list[dict[str, Any]] | None) -> str:
    pages = " ".join(f'<a href="{_page_name(i)}">{i}</a>' for i in range(1, summary.pages + 1))
    rows = []
    for stage, ms in sorted(models.items()):
        for model_id, revision, random_weights in sorted(ms, key=str):
            rnd = ' <b class="rnd">RANDOM WEIGHTS</b>' if random_weights else ""
            rows.append(
                f"<li><b>{_e(stage)}</b> <code>{_e(model_id)}</code> @ <code>{_e(revision or 'unresolved')}</code>"
                f"{rnd}</li>"
            )
    reasons = ""
    if failed:
        counts: dict[str, int] = defaultdict(int)
        for f in failed:
            counts[f["error_class"]] += 1
        reasons = (
            "<p>failures: "
            + ", ".join(
                f'<a href="failures.html#r-{_e(r)}">{_e(r)}</a> {c}'
                for r, c in sorted(counts.items(), key=lambda kv: -kv[1])
            )
            + "</p>"
        )
    return (
        f'<div class="sample overview"><b>{summary.samples}</b> samples on {summary.pages} page(s): {pages}'
        f'{reasons}<ul class="models">{"".join(rows)}</ul>'
        "<p><small>Boxes: solid = person (numbered, one colour per person); dashed = face, attribute and whole-person "
        "grounding boxes in the person's colour; grey = objects. Cut-outs carry their mask outline.</small></p></div>"
    )
