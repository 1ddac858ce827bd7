"""int8 on the real test model: quantized offline (network blocked in the converter processes),
cached by model, calibration content and shaping, from a .pt, an .onnx or an IR quantized already,
and close to fp32 on the conformance images.

One session-scoped quantization on 48 small synthetic frames (320x240) keeps this quick.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference_devtools.conformance import images
from inference_devtools.detection_metrics import Frame, agreement
from inference_devtools.paths import TEST_MODEL
from inference_service.detector import YoloDetector, load_detector
from inference_service.model import ResolvedModel, resolve_model
from inference_service.model import calibration as calibration_module
from inference_service.model import resolve as resolve_module
from inference_service.runtime.openvino_backend import OpenVinoBackend, is_quantized
from inference_service.settings import Settings
from tests.model.netblock import block_network_in_children

pytestmark = [pytest.mark.model, pytest.mark.slow]

CALIBRATION_FRAMES = 48


@dataclass
class Quantized:
    resolved: ResolvedModel
    settings: Settings
    frames: Path
    net_attempts: list[str]
    blocker_loaded: bool


def _write_frames(folder: Path, n: int, seed: int) -> Path:
    from inference_devtools import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, _ = synthetic.render_scene(rng, 320, 240)
        cv2.imwrite(str(folder / f"{i:04d}.jpg"), image)
    return folder


@pytest.fixture(scope="session")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Quantized]:
    """best.pt converted and quantized once, with the network blocked in every child process."""
    if not TEST_MODEL.is_file():
        pytest.skip(f"{TEST_MODEL} not present (made by scripts/train_test_model.py)")
    pytest.importorskip("ultralytics", reason="the .pt conversion needs the export extra")
    pytest.importorskip("nncf", reason="the quantization needs the export extra")
    tmp = tmp_path_factory.mktemp("int8")
    frames = _write_frames(tmp / "frames", CALIBRATION_FRAMES, seed=5)
    mp, attempts = block_network_in_children(tmp)
    settings = Settings(
        model=TEST_MODEL,
        cache_dir=tmp / "cache",
        precision="int8",
        calibration=str(frames),
        calibration_frames=CALIBRATION_FRAMES,
    )
    try:
        resolved = resolve_model(settings)
    finally:
        mp.undo()
    lines = attempts.read_text().splitlines() if attempts.exists() else []
    loaded = Path(f"{attempts}.loaded").exists()
    yield Quantized(resolved, settings, frames, lines, loaded)


def test_quantized_offline_into_the_model_cache_entry(quantized: Quantized) -> None:
    assert quantized.blocker_loaded and quantized.net_attempts == []
    r = quantized.resolved
    assert r.int8_dir is not None and r.int8_xml is not None and is_quantized(r.int8_xml)
    assert r.int8_dir.parent == quantized.settings.cache_path() / r.sha256
    assert r.int8_dir.name.startswith("int8-")
    assert (r.int8_dir / "quantization.json").is_file()
    assert r.openvino_xml is not None and not is_quantized(r.openvino_xml)  # fp32 kept apart


def test_second_resolve_hits_the_cache(
    quantized: Quantized, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("quantized again despite a cached entry")

    monkeypatch.setattr(resolve_module, "quantize", refuse)
    monkeypatch.setattr(resolve_module, "export_onnx", refuse)
    # A start whose int8 model is cached decodes no calibration frame: the key is the content's.
    monkeypatch.setattr(resolve_module, "load_calibration", refuse)
    monkeypatch.setattr(calibration_module, "decode_image", refuse)
    again = resolve_model(quantized.settings)
    assert again.int8_dir == quantized.resolved.int8_dir


def test_other_calibration_content_is_another_entry(
    quantized: Quantized, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key follows the frames' content: the same names with other pixels quantize anew."""
    frames = _write_frames(tmp_path / "other", CALIBRATION_FRAMES, seed=6)
    called: list[Path] = []

    def fake(model: Path, calibration: object, out_dir: Path) -> dict[str, object]:
        called.append(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "model.xml").write_text('<net><layer type="FakeQuantize"/></net>')
        (out_dir / "quantization.json").write_text("{}")
        return {}

    monkeypatch.setattr(resolve_module, "quantize", fake)
    other = resolve_model(quantized.settings.model_copy(update={"calibration": str(frames)}))
    first = quantized.resolved.int8_dir
    assert called and first is not None and other.int8_dir != first
    assert other.int8_dir is not None and other.int8_dir.parent == first.parent
    shaped = resolve_model(quantized.settings.model_copy(update={"imgsz": 256}))
    assert len(called) == 2 and shaped.int8_dir not in (other.int8_dir, first)


def test_an_ir_quantized_already_is_served_as_it_is(quantized: Quantized, tmp_path: Path) -> None:
    assert quantized.resolved.int8_dir is not None
    settings = quantized.settings.model_copy(
        update={"model": quantized.resolved.int8_dir, "calibration": None}
    )
    resolved = resolve_model(settings)
    assert resolved.int8_dir == quantized.resolved.int8_dir.resolve()


def test_an_onnx_model_is_quantized_too(quantized: Quantized) -> None:
    onnx = quantized.resolved.onnx_path
    assert onnx is not None
    settings = quantized.settings.model_copy(update={"model": onnx})
    resolved = resolve_model(settings)
    assert resolved.int8_xml is not None and is_quantized(resolved.int8_xml)
    assert resolved.int8_dir is not None and resolved.int8_dir.parent.name == resolved.sha256


@pytest.fixture(scope="module")
def detectors(quantized: Quantized) -> Iterator[dict[str, YoloDetector]]:
    fp32_settings = quantized.settings.model_copy(update={"precision": "fp32"})
    fp32_model = dataclasses.replace(quantized.resolved, int8_dir=None)
    out = {
        "fp32": load_detector(fp32_model, fp32_settings, threads=1),
        "int8": load_detector(quantized.resolved, quantized.settings, threads=1),
    }
    yield out
    for detector in out.values():
        detector.close()


def test_int8_runs_int8_kernels_and_says_so(detectors: dict[str, YoloDetector]) -> None:
    int8 = detectors["int8"]
    assert int8.info.precision == "int8" and int8.info.runtime == "openvino/int8"
    assert int8.info.to_dict()["precision"] == "int8"
    assert detectors["fp32"].info.precision == "fp32"
    backend = int8.backend
    assert isinstance(backend, OpenVinoBackend)
    executed = collections.Counter(p for _t, _n, p in backend.executed_precisions())
    assert executed["i8"] + executed["u8"] > 20, executed


def test_int8_agrees_with_fp32_on_the_conformance_images(
    detectors: dict[str, YoloDetector],
) -> None:
    found: dict[str, list[Frame]] = {"fp32": [], "int8": []}
    for path in images():
        data = path.read_bytes()
        for precision, detector in detectors.items():
            dets = detector.detect(data).detections
            found[precision].append(
                Frame.of(
                    [[d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2] for d in dets],
                    [d.class_id for d in dets],
                    [d.confidence for d in dets],
                )
            )
    a = agreement(found["fp32"], found["int8"])
    assert a.reference_detections > 20
    # Calibrated on 48 small frames only; the bench (500 frames of another split) measures the
    # real figure. This holds int8 to "the same detections, nearly".
    assert a.precision >= 0.85 and a.recall >= 0.85, a
