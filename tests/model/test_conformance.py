"""Detections agree with the reference (ultralytics predict, same .pt), per runtime and precision.

SPEC.md's tolerances (fp32 and bf16) are applied by ``inference_devtools.conformance.compare``.

The test model is ``models/test/best.pt`` (YOLOv8n, imgsz 320); the images are every JPEG in
``tests/data/photos/`` and ``models/test/conformance/``. Our detector reads the JPEG bytes (the
production path, simplejpeg); the reference reads the file with ``cv2.imread``. The model is
converted once per session into a temporary cache, in a child process whose sockets are blocked,
which also proves that the conversion never reaches the network.

A second test runs a randomly initialised YOLOv8n at a very low threshold: thousands of overlapping
candidates, a hard test of NMS agreement.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference_devtools.conformance import (
    CONF,
    IMAGE_DIRS,
    IOU,
    TEST_MODEL,
    Agreement,
    compare,
    from_ultralytics,
    images,
    ultralytics_env,
)
from inference_devtools.paths import REPO_ROOT as ROOT
from inference_service.detector import YoloDetector, load_detector
from inference_service.domain import Detection, FrameDetections
from inference_service.model import ResolvedModel, resolve_model
from inference_service.settings import Settings
from tests.model.netblock import block_network_in_children

pytestmark = [pytest.mark.model, pytest.mark.reference, pytest.mark.slow]


CONFIGS = ("openvino/fp32", "onnxruntime/fp32", "ncnn/fp32", "openvino/bf16")


@dataclass
class Exported:
    resolved: ResolvedModel
    settings: Settings
    net_attempts: list[str]
    blocker_loaded: bool


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    """best.pt converted once into a temporary cache, with the network blocked in the converter."""
    if not TEST_MODEL.is_file():
        pytest.skip(
            f"{TEST_MODEL.relative_to(ROOT)} not present (made by scripts/train_test_model.py)"
        )
    pytest.importorskip("ultralytics", reason="the reference needs the export extra")
    tmp = tmp_path_factory.mktemp("conformance")
    mp, attempts = block_network_in_children(tmp)
    for name in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_CONFIG_DIR"):
        mp.delenv(name, raising=False)  # the service must set them itself
    settings = Settings(model=TEST_MODEL, cache_dir=tmp / "cache", conf=CONF, iou=IOU)
    try:
        resolved = resolve_model(settings)
    finally:
        mp.undo()
    lines = attempts.read_text().splitlines() if attempts.exists() else []
    ultralytics_env(tmp / "ultralytics")
    loaded = Path(f"{attempts}.loaded").exists()
    yield Exported(resolved, settings, lines, loaded)


def test_export_never_reaches_the_network(exported: Exported) -> None:
    assert exported.blocker_loaded, "the socket blocker did not load in the converter process"
    assert exported.net_attempts == []
    assert exported.resolved.names  # and the conversion did succeed with the network blocked
    assert exported.resolved.dynamic and exported.resolved.task == "detect"


@pytest.fixture(scope="session")
def reference(exported: Exported) -> dict[Path, list[Detection]]:
    """ultralytics predict on every image (reads each file with cv2.imread)."""
    yolo: Any = importlib.import_module("ultralytics").YOLO(str(TEST_MODEL))
    out: dict[Path, list[Detection]] = {}
    for path in images():
        result = yolo.predict(
            str(path),
            imgsz=list(exported.resolved.imgsz),
            conf=CONF,
            iou=IOU,
            device="cpu",
            verbose=False,
            save=False,
        )[0]
        out[path] = from_ultralytics(result, exported.resolved.names)
    return out


def _cpu_has_bf16() -> bool:
    """Whether OpenVINO finds native bf16 on this CPU (bf16 configurations skip without it)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _skip_without_bf16(precision: str) -> None:
    if precision == "bf16" and not _cpu_has_bf16():
        pytest.skip("this CPU has no native bf16 (OpenVINO's CPU capabilities lack BF16)")


@pytest.fixture(scope="session")
def detectors(exported: Exported) -> Iterator[dict[str, YoloDetector]]:
    out: dict[str, YoloDetector] = {}
    for config in CONFIGS:
        runtime, precision = config.split("/")
        if precision == "bf16" and not _cpu_has_bf16():
            continue
        settings = exported.settings.model_copy(update={"runtime": runtime, "precision": precision})
        out[config] = load_detector(exported.resolved, settings, threads=2)
    yield out
    for detector in out.values():
        detector.close()


def _agreement(
    config: str, detector: YoloDetector, reference: dict[Path, list[Detection]]
) -> tuple[Agreement, int]:
    checked = list(reference)
    if not checked:
        pytest.skip(f"no images in {', '.join(str(d.relative_to(ROOT)) for d in IMAGE_DIRS)}")
    assert detector.info.runtime == config
    agreement = Agreement()
    total_ref = 0
    for path in checked:
        result: FrameDetections = detector.detect(path.read_bytes())
        total_ref += len(reference[path])
        compare(
            list(result.detections),
            reference[path],
            agreement,
            strict=config.endswith("fp32"),
            conf=CONF,
            where=f"{config} {path.relative_to(ROOT)}",
        )
    print(f"\nconformance {config}: {json.dumps(agreement.summary())} (reference: {total_ref})")
    assert total_ref > 0, "the reference found nothing: the test would prove nothing"
    return agreement, total_ref


@pytest.mark.parametrize("config", CONFIGS)
def test_detections_match_reference(
    config: str,
    detectors: dict[str, YoloDetector],
    reference: dict[Path, list[Detection]],
) -> None:
    _skip_without_bf16(config.split("/")[1])
    agreement, _total = _agreement(config, detectors[config], reference)
    assert not agreement.failures, "\n".join(agreement.failures[:20])


@pytest.mark.parametrize("source", ["openvino IR", "onnx"])
def test_bf16_keeps_the_stem_in_f32(exported: Exported, source: str) -> None:
    """Under bf16 the convolutions of /model.0-2/ run in f32 and the rest in bf16, as compiled,
    whether OpenVINO reads the IR or the ONNX file."""
    from inference_service.runtime.openvino_backend import OpenVinoBackend

    path = (
        exported.resolved.openvino_xml if source == "openvino IR" else exported.resolved.onnx_path
    )
    assert path is not None
    _skip_without_bf16("bf16")
    backend = OpenVinoBackend(path, precision="bf16")
    backend.infer(np.zeros((1, 3, 192, 320), dtype=np.float32))
    precisions: dict[str, set[str]] = {"stem": set(), "rest": set()}
    for layer_type, names, precision in backend.executed_precisions():
        if layer_type == "Convolution":  # a fused node is named after every node it contains
            part = "stem" if names.startswith(("/model.0/", "/model.1/", "/model.2/")) else "rest"
            precisions[part].add(precision)
    backend.close()
    assert precisions == {"stem": {"f32"}, "rest": {"bf16"}}


# --- NMS under load: synthetic heads with thousands of overlapping candidates ----------------


def test_ncnn_head_decode_equals_the_exported_network(exported: Exported) -> None:
    """ncnn runs the network only up to the head's convolutions and decodes the rest in numpy: the
    result must equal OpenVINO's run of the whole exported graph, for several input shapes, from
    float tensors and from letterboxed frames alike."""
    from inference_service.runtime.base import to_batch
    from inference_service.runtime.ncnn_backend import NcnnBackend
    from inference_service.runtime.openvino_backend import OpenVinoBackend

    model = exported.resolved
    assert model.ncnn_dir is not None, "the export extra includes pnnx: ncnn must be converted"
    assert model.openvino_xml is not None
    ncnn = NcnnBackend(model.ncnn_dir)
    openvino = OpenVinoBackend(model.openvino_xml)
    rng = np.random.default_rng(7)
    for h, w in ((320, 320), (192, 320), (320, 224), (640, 384)):
        frames = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
        frames[:, h // 4 : h // 2, w // 4 : w // 2] = (30, 200, 90)  # something to detect
        expected = openvino.infer(to_batch(frames))
        from_tensor = ncnn.infer(to_batch(frames))
        from_frames = ncnn.infer_images(frames)
        assert from_tensor.shape == expected.shape == from_frames.shape
        np.testing.assert_allclose(from_tensor, expected, atol=2e-3, rtol=1e-4)
        np.testing.assert_allclose(from_frames, expected, atol=2e-3, rtol=1e-4)
    ncnn.close()
    openvino.close()


@pytest.mark.parametrize("seed", range(6))
def test_postprocess_matches_reference_nms_on_synthetic_heads(seed: int, tmp_path: Path) -> None:
    """Our NMS + rescale against ultralytics' non_max_suppression + scale_boxes, same head tensor.

    Up to 8400 candidates per frame over few classes, heavily overlapping: every suppression
    decision, the 300 cap, the per-class offset and the rescale must agree.
    """
    pytest.importorskip("ultralytics", reason="the reference needs the export extra")
    ultralytics_env(tmp_path / "ultralytics")
    import torch
    from ultralytics.utils import nms as ref_nms
    from ultralytics.utils import ops

    from inference_service.vision import letterbox_geometry, postprocess

    rng = np.random.default_rng(seed)
    image_hw = [(720, 1280), (1280, 720), (481, 643), (1080, 1920), (333, 334), (50, 2000)][seed]
    geo = letterbox_geometry(image_hw, (640, 640), 32)
    in_h, in_w = geo.input_hw
    n, nc = in_h * in_w // 64 + in_h * in_w // 256 + in_h * in_w // 1024, 4
    head = np.zeros((1, 4 + nc, n), np.float32)
    head[0, 0] = rng.uniform(-20, in_w + 20, n)
    head[0, 1] = rng.uniform(-20, in_h + 20, n)
    head[0, 2] = rng.uniform(4, 200, n)
    head[0, 3] = rng.uniform(4, 200, n)
    head[0, 4:] = rng.uniform(0, 1, (nc, n)) ** 3
    conf = [0.25, 0.05, 0.5, 0.01, 0.25, 0.1][seed]

    ours = postprocess(head, geo, conf=conf, iou=IOU, max_det=300)
    ref = ref_nms.non_max_suppression(torch.from_numpy(head.copy()), conf, IOU, max_det=300)[0]
    ref[:, :4] = ops.scale_boxes((in_h, in_w), ref[:, :4], image_hw)
    ref_np = ref.numpy()
    assert len(ours) == ref_np.shape[0] > 20
    assert ours.class_ids.tolist() == ref_np[:, 5].astype(int).tolist()
    assert np.array_equal(ours.scores, ref_np[:, 4])
    assert np.allclose(ours.boxes, ref_np[:, :4], atol=1e-3)
