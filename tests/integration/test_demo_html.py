"""The demo's page (``inference_service.commands.report``) rendered by a real browser: headless Chromium."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference_service.commands.collecting import collect
from inference_service.commands.report import write_html
from tests.integration.harness import render_jpegs

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
FRAMES = 5
BROWSER_TIMEOUT_S = 120


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: `make chromium` installs Debian's chromium (as root)")
    return subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", *args,
        ],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S,
        check=False,
    )  # fmt: skip


@pytest.fixture
def page(tmp_path: Path) -> Path:
    """A demo-like page: FRAMES annotated frames (one of them an error), a preview, a summary."""
    site = tmp_path / "site"
    (site / "frames").mkdir(parents=True)
    results = []
    for i, jpeg in enumerate(render_jpegs(FRAMES, seed=3)):
        (site / "frames" / f"{i:06d}.jpg").write_bytes(jpeg)
        results.append({
            "video_id": "page-test", "frame_id": i, "task_id": f"page-test:{i}",
            "status": "ok" if i != 2 else "error",
            "detections": [] if i == 2 else [
                {"class_id": 0, "class_name": "disc", "confidence": 0.91,
                 "bbox": {"x1": 10, "y1": 10, "x2": 50, "y2": 60}},
            ],
            "timings_ms": {"fetch": 1.5, "decode": 2.0, "inference": 30.0, "total": 40.0 + i},
            **({"error": {"code": "frame_not_found", "message": "no object"}} if i == 2 else {}),
        })  # fmt: skip
    (site / "preview.jpg").write_bytes((site / "frames" / "000000.jpg").read_bytes())
    document = collect("page-test", results, expected=FRAMES + 1)  # frame 5 missing
    return write_html(
        site / "index.html",
        document,
        preview="preview.jpg",
        frame_images={i: f"frames/{i:06d}.jpg" for i in range(FRAMES)},
        facts={"service throughput": "12.0 frames/s"},
    )


def test_every_frame_has_a_row_in_the_dom(page: Path, tmp_path: Path) -> None:
    proc = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert dom.count('<tr class="frame') == FRAMES, dom[:2000]
    assert dom.count('data-frame-id="') == FRAMES
    assert '<tr class="frame error" data-frame-id="2">' in dom
    assert "INCOMPLETE" in dom and "1: 5" in dom  # one missing frame: id 5
    assert 'id="preview"' in dom


def test_screenshot_is_not_blank(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    proc = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri())
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    assert shot.stat().st_size > 20_000
    image = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[:2] == (1600, 1280)
    # The page shows pictures and text, not a blank canvas: many distinct colours.
    colours = np.unique(image.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 500, len(colours)
