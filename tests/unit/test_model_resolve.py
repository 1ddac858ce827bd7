"""resolve_model: what it accepts, and the errors for everything else (no ultralytics needed)."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path
from typing import Any

import pytest

from inference_service.errors import ModelError
from inference_service.model import ResolvedModel, export, resolve_model
from inference_service.settings import Settings


def _settings(model: Path, tmp_path: Path, **kw: Any) -> Settings:
    return Settings(model=model, cache_dir=tmp_path / "cache", **kw)


def _tiny_onnx(
    path: Path,
    *,
    task: str = "detect",
    names: dict[int, str] | None = None,
    out_channels: int | None = None,
    dynamic: bool = True,
    metadata: bool = True,
) -> Path:
    """A 1x1-conv network with an ultralytics-like input, output and metadata."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    names = {0: "disc", 1: "square"} if names is None else names
    channels = 4 + len(names) if out_channels is None else out_channels
    h, w = ("height", "width") if dynamic else (320, 320)
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, h, w])
    output = helper.make_tensor_value_info(
        "output0", TensorProto.FLOAT, ["batch", channels, "anchors"]
    )
    weight = numpy_helper.from_array(np.ones((channels, 3, 1, 1), np.float32), "weight")
    shape = numpy_helper.from_array(np.asarray([0, channels, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["images", "weight"], ["conv"]),
        helper.make_node("Reshape", ["conv", "shape"], ["output0"]),
    ]
    graph = helper.make_graph(nodes, "tiny", [images], [output], [weight, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        for key, value in {
            "task": task,
            "stride": "32",
            "imgsz": "[320, 320]",
            "names": str(names),
            "head": "Detect",
            "end2end": "False",
        }.items():
            prop = model.metadata_props.add()
            prop.key, prop.value = key, value
    onnx.save(model, str(path))
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file"):
        resolve_model(_settings(tmp_path / "best.pt", tmp_path))


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match="unknown model type"):
        resolve_model(_settings(path, tmp_path))


def test_random_onnx_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is not a protobuf at all" * 10)
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        resolve_model(_settings(path, tmp_path))


def _half_entries(cache: Path) -> list[str]:
    """What a failed conversion left in ``cache`` besides ultralytics' settings and lock files: a
    half cache entry or a temporary directory would be listed."""
    if not cache.exists():
        return []
    return sorted(
        p.name for p in cache.iterdir() if p.name != "ultralytics" and p.suffix != ".lock"
    )


def test_pt_file_without_the_export_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "export_available", lambda: False)
    path = tmp_path / "best.pt"
    path.write_bytes(b"random bytes, not a checkpoint" * 10)
    with pytest.raises(ModelError) as info:
        resolve_model(_settings(path, tmp_path))
    assert export.INSTALL_HINT in str(info.value)
    assert "not a readable YOLOv8 checkpoint" not in str(info.value)
    assert _half_entries(tmp_path / "cache") == []


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("ultralytics", "torch", "onnx")),
    reason="needs the export extra (ultralytics, torch, onnx)",
)
def test_unreadable_pt_file_with_the_export_extra(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    path.write_bytes(b"random bytes, not a checkpoint" * 10)
    with pytest.raises(ModelError, match="not a readable YOLOv8 checkpoint"):
        resolve_model(_settings(path, tmp_path))
    # The conversion ran (only its child reports an unreadable checkpoint), so the cache exists.
    assert (tmp_path / "cache").is_dir()
    assert _half_entries(tmp_path / "cache") == []  # no half cache entry left


def test_directory_without_ir(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="without an OpenVINO IR"):
        resolve_model(_settings(tmp_path, tmp_path))


def test_detect_onnx_resolves_with_metadata(tmp_path: Path) -> None:
    path = _tiny_onnx(tmp_path / "tiny.onnx")
    resolved = resolve_model(_settings(path, tmp_path))
    assert resolved.names == ("disc", "square")
    assert resolved.imgsz == (320, 320) and resolved.stride == 32
    assert resolved.task == "detect" and resolved.dynamic
    assert resolved.onnx_path == path.resolve() and resolved.openvino_dir is None
    assert len(resolved.sha256) == 64
    assert pickle.loads(pickle.dumps(resolved)) == resolved


def test_imgsz_setting_rounds_up_to_stride(tmp_path: Path) -> None:
    path = _tiny_onnx(tmp_path / "tiny.onnx")
    assert resolve_model(_settings(path, tmp_path, imgsz=600)).imgsz == (608, 608)


def test_static_onnx_refuses_other_imgsz(tmp_path: Path) -> None:
    path = _tiny_onnx(tmp_path / "tiny.onnx", dynamic=False)
    resolved = resolve_model(_settings(path, tmp_path))
    assert not resolved.dynamic and resolved.imgsz == (320, 320)
    with pytest.raises(ModelError, match="fixed input"):
        resolve_model(_settings(path, tmp_path, imgsz=640))


@pytest.mark.parametrize("task", ["segment", "pose", "classify", "obb"])
def test_wrong_task(tmp_path: Path, task: str) -> None:
    path = _tiny_onnx(tmp_path / "other.onnx", task=task)
    with pytest.raises(ModelError, match=f"'{task}' model; expected a YOLOv8 detection model"):
        resolve_model(_settings(path, tmp_path))


def test_wrong_output_shape(tmp_path: Path) -> None:
    path = _tiny_onnx(tmp_path / "e2e.onnx", out_channels=6, names={0: "a", 1: "b", 2: "c"})
    with pytest.raises(ModelError, match=r"expected \(batch, 7, anchors\)"):
        resolve_model(_settings(path, tmp_path))


def test_onnx_without_metadata(tmp_path: Path) -> None:
    path = _tiny_onnx(tmp_path / "plain.onnx", metadata=False)
    with pytest.raises(ModelError, match="is a '\\?' model"):
        resolve_model(_settings(path, tmp_path))


def test_openvino_directory_resolves(tmp_path: Path) -> None:
    import openvino as ov

    path = _tiny_onnx(tmp_path / "tiny.onnx", names={0: "disc", 1: "square", 2: "star"})
    ir_dir = tmp_path / "tiny_openvino_model"
    ir_dir.mkdir()
    model = ov.convert_model(str(path))
    model.set_rt_info(["disc", "square", "star"], ["model_info", "labels"])
    model.set_rt_info("YOLO", ["model_info", "model_type"])
    ov.save_model(model, str(ir_dir / "tiny.xml"), compress_to_fp16=False)
    (ir_dir / "metadata.yaml").write_text(
        "stride: 32\ntask: detect\nimgsz:\n- 320\n- 320\n"
        "names:\n  0: disc\n  1: square\n  2: star\n"
    )
    resolved: ResolvedModel = resolve_model(_settings(ir_dir, tmp_path))
    assert resolved.names == ("disc", "square", "star")
    assert resolved.openvino_xml == (ir_dir / "tiny.xml").resolve()
    assert resolved.onnx_path is None and resolved.dynamic
