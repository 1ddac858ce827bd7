"""What a model file says about itself, and the check that it is a YOLOv8 detection model.

Ultralytics' exporter writes its metadata (``stride``, ``task``, ``imgsz``, ``names``, ``head``,
``end2end``, ...) as ONNX ``metadata_props``, each value ``str()`` of a Python literal, and beside
an OpenVINO IR as ``metadata.yaml`` (plus ``rt_info/model_info/labels``). Both are read here with
the serving dependencies only (ONNX Runtime, OpenVINO; PyYAML when installed).
"""

from __future__ import annotations

import ast
import importlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from inference_service.errors import ModelError
from inference_service.runtime.openvino_import import import_openvino

log = logging.getLogger(__name__)

EXPECTED = (
    "a YOLOv8 detection model exported by ultralytics (task 'detect', Detect head, "
    "output (batch, 4 + classes, anchors))"
)


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """The facts the detector needs about a network."""

    names: tuple[str, ...]
    """Class names by class id."""
    imgsz: tuple[int, int]
    """Nominal input size (height, width)."""
    stride: int
    """Largest stride of the network; dynamic inputs are padded to a multiple of it."""
    task: str
    """Ultralytics task; only ``detect`` is served."""
    dynamic: bool
    """True when the network accepts any input height and width."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        raw = json.loads(text)
        return cls(
            names=tuple(str(n) for n in raw["names"]),
            imgsz=(int(raw["imgsz"][0]), int(raw["imgsz"][1])),
            stride=int(raw["stride"]),
            task=str(raw["task"]),
            dynamic=bool(raw["dynamic"]),
        )


def read_onnx_metadata(path: Path) -> ModelMetadata:
    """Metadata of an ultralytics ONNX export; :class:`ModelError` unless a YOLOv8 detector."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises untyped errors for files that are not ONNX
        raise ModelError(
            f"{path} is not a readable ONNX model ({exc}); expected {EXPECTED}"
        ) from None
    props: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"{path} has {len(inputs)} inputs and {len(outputs)} outputs "
            f"({', '.join(o.name for o in outputs)}); expected one of each: {EXPECTED}"
        )
    in_shape = list(inputs[0].shape)
    out_shape = list(outputs[0].shape)
    parsed: dict[str, Any] = {}
    for key in ("names", "imgsz", "stride", "task", "head", "end2end"):
        if key in props:
            parsed[key] = _literal(props[key], path, key)
    return _check(path, parsed, in_shape, out_shape)


def write_ir_metadata(
    directory: Path, *, task: str, names: tuple[str, ...], imgsz: tuple[int, int], stride: int
) -> None:
    """``metadata.yaml`` beside an IR, as ultralytics writes it (JSON is YAML), so that the IR's
    folder is a model of its own (:func:`read_openvino_metadata` reads it back)."""
    body = {"task": task, "names": dict(enumerate(names)), "imgsz": list(imgsz), "stride": stride}
    (directory / "metadata.yaml").write_text(json.dumps(body, indent=2) + "\n")


def read_openvino_metadata(xml: Path) -> ModelMetadata:
    """Metadata of an ultralytics OpenVINO IR (``metadata.yaml`` beside it, else its rt_info)."""
    ov = import_openvino()

    try:
        model = ov.Core().read_model(str(xml))
    except Exception as exc:  # OpenVINO raises untyped RuntimeErrors for bad files
        raise ModelError(
            f"{xml} is not a readable OpenVINO IR ({exc}); expected {EXPECTED}"
        ) from None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(
            f"{xml} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            f"expected one of each: {EXPECTED}"
        )
    in_shape = _ov_shape(model.inputs[0].get_partial_shape())
    out_shape = _ov_shape(model.outputs[0].get_partial_shape())
    parsed = _read_yaml(xml.parent / "metadata.yaml")
    if "names" not in parsed and model.has_rt_info(["model_info", "labels"]):
        labels = model.get_rt_info(["model_info", "labels"]).astype(list)
        parsed["names"] = [str(label) for label in labels]
    if "task" not in parsed and model.has_rt_info(["model_info", "model_type"]):
        parsed.setdefault("task", "detect")
    return _check(xml, parsed, in_shape, out_shape)


def _ov_shape(partial: Any) -> list[int | str]:
    return [int(d.get_length()) if d.is_static else "?" for d in partial]


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        yaml: Any = importlib.import_module("yaml")
    except ImportError:
        log.warning("PyYAML is not installed: %s ignored, reading the IR's rt_info only", path)
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    return dict(loaded) if isinstance(loaded, Mapping) else {}


def _literal(text: str, path: Path, key: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if key in ("task", "head"):
            return text
        raise ModelError(f"{path}: metadata {key}={text!r} is not readable") from None


def _names(raw: Any, path: Path) -> tuple[str, ...]:
    if isinstance(raw, Mapping):
        try:
            ids = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise ModelError(f"{path}: class names {raw!r} are not keyed by class id") from None
        if ids != list(range(len(ids))):
            raise ModelError(f"{path}: class ids {ids} are not 0..{len(ids) - 1}")
        by_id = {int(k): str(v) for k, v in raw.items()}
        return tuple(by_id[i] for i in ids)
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        return tuple(str(v) for v in raw)
    raise ModelError(f"{path}: no class names in the model's metadata; expected {EXPECTED}")


def _check(
    path: Path,
    meta: Mapping[str, Any],
    in_shape: list[Any],
    out_shape: list[Any],
) -> ModelMetadata:
    task = str(meta.get("task", "?"))
    if task != "detect":
        raise ModelError(f"{path} is a {task!r} model; expected {EXPECTED}")
    head = meta.get("head")
    if head is not None and head != "Detect":
        raise ModelError(f"{path} has a {head} head; expected {EXPECTED}")
    if meta.get("end2end"):
        raise ModelError(f"{path} is an end-to-end (NMS-free) model; expected {EXPECTED}")
    names = _names(meta.get("names"), path)
    if len(in_shape) != 4 or in_shape[1] != 3:
        raise ModelError(f"{path} takes input {in_shape}; expected (batch, 3, height, width)")
    channels = out_shape[1] if len(out_shape) == 3 else None
    if channels != 4 + len(names):
        raise ModelError(
            f"{path} gives output {out_shape} for {len(names)} classes; "
            f"expected (batch, {4 + len(names)}, anchors): {EXPECTED}"
        )
    dynamic = not (isinstance(in_shape[2], int) and isinstance(in_shape[3], int))
    stride = int(meta.get("stride", 32))
    raw_imgsz = meta.get("imgsz")
    if not dynamic:
        imgsz = (int(in_shape[2]), int(in_shape[3]))
    elif isinstance(raw_imgsz, Sequence) and len(raw_imgsz) == 2:
        imgsz = (int(raw_imgsz[0]), int(raw_imgsz[1]))
    elif isinstance(raw_imgsz, int):
        imgsz = (raw_imgsz, raw_imgsz)
    else:
        log.warning("%s: dynamic input and no imgsz in its metadata; assuming 640", path)
        imgsz = (640, 640)
    return ModelMetadata(names=names, imgsz=imgsz, stride=stride, task=task, dynamic=dynamic)
