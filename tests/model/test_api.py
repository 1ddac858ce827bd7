"""The public API: ``Detector.from_model(path).detect(image_bytes)``, as the README shows it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest

import inference_service
from inference_service import Detector
from inference_service.errors import ConfigError, UndecodableFrameError
from tests.conftest import ROOT, TEST_MODEL

pytestmark = [pytest.mark.model]

PHOTO = ROOT / "tests" / "data" / "photos" / "brick_shapes.jpg"


def _photo() -> Any:
    image = cv2.imread(str(PHOTO))
    assert image is not None
    return image


@pytest.fixture(scope="module")
def detector() -> Iterator[Detector]:
    with Detector.from_model(TEST_MODEL, runtime="onnxruntime", threads=1) as loaded:
        yield loaded


def test_detects_the_shapes_of_a_photo(detector: Detector) -> None:
    found = detector.detect(PHOTO.read_bytes())
    assert found.detections, "the test photo has shapes the test model finds"
    confidences = [d.confidence for d in found.detections]
    assert confidences == sorted(confidences, reverse=True)
    assert {d.class_name for d in found.detections} <= set(detector.info.classes)
    height, width = _photo().shape[:2]
    assert (found.image.width, found.image.height) == (width, height)
    assert all(0 <= d.bbox.x1 < d.bbox.x2 <= width for d in found.detections)
    assert detector.info.runtime == "onnxruntime/fp32"


def test_bytes_and_array_agree(detector: Detector) -> None:
    from_bytes = detector.detect(PHOTO.read_bytes())
    from_array = detector.detect_array(_photo())
    assert [d.class_id for d in from_bytes.detections] == [
        d.class_id for d in from_array.detections
    ]


def test_not_an_image_is_refused(detector: Detector) -> None:
    with pytest.raises(UndecodableFrameError):
        detector.detect(b"not an image")


def test_a_bad_setting_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="INFERENCE_RUNTIME"):
        Detector.from_model(TEST_MODEL, runtime="tpu")


def test_closed_detector_refuses_work() -> None:
    loaded = Detector.from_model(TEST_MODEL, runtime="onnxruntime", threads=1)
    loaded.close()
    loaded.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        loaded.detect_array(np.zeros((32, 32, 3), np.uint8))


def test_importing_the_package_loads_no_runtime() -> None:
    """``Detector`` is imported on first use: the package itself stays light."""
    code = (
        "import sys, inference_service, inference_service.errors; "
        "print(any(m in sys.modules for m in ('numpy', 'cv2', 'openvino', 'inference_service.api')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    assert "Detector" in inference_service.__all__


def test_the_readme_example_runs_as_shown() -> None:
    """The README's example, executed from the repository root: it prints what the README shows."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Use the detector from Python", 1)[1]
    code, after = section.split("```python\n", 1)[1].split("```", 1)
    shown = after.split("```\n", 1)[1].split("```", 1)[0].splitlines()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.splitlines()
    assert printed[0].split()[1:] == shown[0].split()[1:]  # the classes (the runtime may differ)
    assert [line.split()[0] for line in printed[1:]] == [line.split()[0] for line in shown[1:]]
