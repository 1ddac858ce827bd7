"""A self-contained HTML page about one collected video (stdlib only; used by the demo).

:func:`render_html` turns the document of ``inference-service collect`` into a page with the
animated preview, a summary and one table row per frame (frame id, status, detections, timings),
each row carrying ``class="frame"`` and ``data-frame-id`` so that tools can count them.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.error td { background: #fde8e8; }
img.preview { max-width: 100%; border: 1px solid #999; }
img.thumb { width: 160px; }
.complete { color: #176317; } .incomplete { color: #a11; font-weight: bold; }
"""

_TIMING_STAGES = ("fetch", "decode", "inference", "total")


def render_html(
    document: Mapping[str, Any],
    *,
    preview: str | None = None,
    frame_images: Mapping[int, str] | None = None,
    facts: Mapping[str, str] | None = None,
    title: str | None = None,
) -> str:
    """The page for ``document`` (``{video_id, frames, summary}``).

    ``preview`` and ``frame_images`` (by frame id) are paths relative to the page; ``facts`` are
    extra summary rows (e.g. measured throughput), shown as given.
    """
    video_id = str(document.get("video_id", ""))
    summary: Mapping[str, Any] = document.get("summary") or {}
    frames: list[Mapping[str, Any]] = list(document.get("frames") or [])
    images = frame_images or {}
    esc = html.escape
    heading = title or f"Inference results: {video_id}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(heading)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(heading)}</h1>",
    ]
    if preview:
        parts.append(
            f'<p><img class="preview" id="preview" src="{esc(preview)}" '
            f'alt="annotated preview of {esc(video_id)}"></p>'
        )
    parts.append('<h2>Summary</h2><table id="summary">')
    for label, value in _summary_rows(summary, facts or {}):
        parts.append(f"<tr><th>{esc(label)}</th><td>{value}</td></tr>")
    parts.append("</table>")
    parts.append(f'<h2>Frames ({len(frames)})</h2><table id="frames"><thead><tr>')
    headers = ["frame", "image", "status", "detections"] + [f"{s} ms" for s in _TIMING_STAGES]
    parts.append("".join(f"<th>{esc(h)}</th>" for h in headers))
    parts.append("</tr></thead><tbody>")
    for result in frames:
        parts.append(_frame_row(result, images))
    parts.append("</tbody></table></body></html>")
    return "\n".join(parts) + "\n"


def write_html(path: Path, document: Mapping[str, Any], **kwargs: Any) -> Path:
    """Write :func:`render_html` to ``path``; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(document, **kwargs), encoding="utf-8")
    return path


def _summary_rows(summary: Mapping[str, Any], facts: Mapping[str, str]) -> list[tuple[str, str]]:
    esc = html.escape
    complete = bool(summary.get("complete"))
    state = (
        '<span class="complete">complete</span>'
        if complete
        else '<span class="incomplete">INCOMPLETE</span>'
    )
    latency = summary.get("latency_ms") or {}
    rows = [
        ("completeness", state),
        ("frames received / expected", f"{summary.get('received')} / {summary.get('expected')}"),
        ("missing frames", esc(_ids(summary.get("missing")))),
        ("duplicated frames", esc(_ids(summary.get("duplicated")))),
        ("errors by code", esc(_counts(summary.get("errors_by_code")))),
        ("detections", esc(str(summary.get("detections", 0)))),
        ("detections by class", esc(_counts(summary.get("detections_by_class")))),
        (
            "latency p50 / p95 (timings_ms.total)",
            esc(f"{_ms(latency.get('p50'))} / {_ms(latency.get('p95'))}"),
        ),
    ]
    rows.extend((label, esc(value)) for label, value in facts.items())
    return rows


def _frame_row(result: Mapping[str, Any], images: Mapping[int, str]) -> str:
    esc = html.escape
    frame_id = result.get("frame_id")
    status = str(result.get("status", "?"))
    detections = result.get("detections") or []
    if status == "error":
        error = result.get("error") or {}
        what = f"{error.get('code', '?')}: {error.get('message', '')}"
    else:
        what = ", ".join(
            f"{d.get('class_name', d.get('class_id'))} {float(d.get('confidence', 0.0)):.2f}"
            for d in detections
        )
        what = f"{len(detections)}: {what}" if detections else "0"
    image = images.get(frame_id) if isinstance(frame_id, int) else None
    cell = (
        f'<a href="{esc(image)}"><img class="thumb" loading="lazy" src="{esc(image)}" '
        f'alt="frame {frame_id}"></a>'
        if image
        else ""
    )
    timings = result.get("timings_ms") or {}
    cells = [
        f'<td class="num">{esc(str(frame_id))}</td>',
        f"<td>{cell}</td>",
        f"<td>{esc(status)}</td>",
        f"<td>{esc(what)}</td>",
        *(f'<td class="num">{_ms(timings.get(s))}</td>' for s in _TIMING_STAGES),
    ]
    klass = "frame error" if status == "error" else "frame"
    return f'<tr class="{klass}" data-frame-id="{esc(str(frame_id))}">{"".join(cells)}</tr>'


def _ms(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "–"


def _ids(value: object) -> str:
    ids = list(value) if isinstance(value, list) else []
    if not ids:
        return "none"
    shown = ", ".join(str(i) for i in ids[:20])
    return f"{len(ids)}: {shown}{', …' if len(ids) > 20 else ''}"


def _counts(value: object) -> str:
    if not isinstance(value, Mapping) or not value:
        return "none"
    return ", ".join(f"{k} {v}" for k, v in value.items())
