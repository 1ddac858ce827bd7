"""Convert a ``.pt`` checkpoint to ONNX, and ONNX to OpenVINO IR and ncnn; the only user of
ultralytics (and of pnnx, the ncnn converter).

The conversion runs in a child process (``python -m inference_service.model.export``) so that
torch and ultralytics never load into the service's own process (nor into the worker processes it
forks), and so that their import-time side effects (ultralytics sets ``OMP_NUM_THREADS``, torch
sizes its thread pool) stay there. The child gets ``YOLO_OFFLINE=1`` (ultralytics then treats the
machine as offline: no downloads, no telemetry), ``YOLO_AUTOINSTALL=False`` (it never installs a
missing requirement) and a ``YOLO_CONFIG_DIR`` inside the cache, unless the caller's environment
sets them.

The export matches what ``yolo export format=onnx dynamic=True simplify=True`` produces: batch,
height and width dynamic, output ``(batch, 4 + classes, anchors)``, ultralytics' metadata in the
ONNX ``metadata_props``, at the checkpoint's own training ``imgsz`` (the size its predict uses
by default).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inference_service.errors import ModelError
from inference_service.runtime.openvino_import import telemetry_off
from inference_service.settings import env_name

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
OPENVINO_NAME = "model.xml"
INSTALL_HINT = "pip install 'kafka-yolo-detector[export]'"
_EXIT_NOT_DETECT = 3
_EXIT_UNREADABLE = 4


def export_available() -> bool:
    """True when ultralytics and torch are installed (the ``export`` extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("ultralytics", "torch", "onnx"))


def export_onnx(
    source: Path,
    out_dir: Path,
    *,
    config_dir: Path,
    timeout_s: float = 600.0,
    imgsz: int | None = None,
) -> Path:
    """Export the checkpoint ``source`` to ``out_dir/model.onnx`` in a child process (at
    ``imgsz``, the nominal size its metadata records; None: the checkpoint's training size).

    Raises :class:`ModelError` when the export extra is missing, the file is no YOLOv8 detection
    checkpoint, or the export fails (with the child's last output).
    """
    if not export_available():
        raise ModelError(
            f"{source} is a PyTorch checkpoint; converting it needs ultralytics and torch: "
            f"{INSTALL_HINT} (or give {env_name('model')} an exported .onnx file or OpenVINO "
            "directory)"
        )
    env = dict(os.environ)
    env.setdefault("YOLO_OFFLINE", "1")
    env.setdefault("YOLO_AUTOINSTALL", "False")
    env.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    env.setdefault("YOLO_VERBOSE", "False")
    command = [sys.executable, "-m", "inference_service.model.export", str(source), str(out_dir)]
    if imgsz is not None:
        command += ["--imgsz", str(imgsz)]
    log.info("converting %s to ONNX (once; cached in %s)", source, out_dir.parent)
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise ModelError(f"converting {source} took longer than {timeout_s:.0f} s") from None
    tail = (done.stderr or done.stdout).strip()[-2000:]
    if done.returncode == _EXIT_NOT_DETECT:
        raise ModelError(done.stderr.strip().splitlines()[-1])
    if done.returncode == _EXIT_UNREADABLE:
        raise ModelError(f"{source} is not a readable YOLOv8 checkpoint: {tail.splitlines()[-1]}")
    if done.returncode != 0:
        raise ModelError(f"converting {source} to ONNX failed:\n{tail}")
    onnx_path = out_dir / ONNX_NAME
    if not onnx_path.is_file():
        raise ModelError(f"converting {source} produced no {onnx_path}:\n{tail}")
    return onnx_path


def onnx_to_openvino(onnx_path: Path, out_dir: Path) -> Path:
    """Convert an ONNX model to OpenVINO IR (fp32 weights, no compression); the ``.xml`` path.

    ``convert_model`` and ``save_model`` report usage to an analytics service through
    ``openvino_telemetry`` unless ``CI=true`` (its only switch): it is set for the two calls,
    then restored.
    """
    xml = out_dir / OPENVINO_NAME
    with telemetry_off():
        import openvino as ov  # its first import reports usage too

        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


NCNN_PARAM = "model.ncnn.param"
NCNN_BIN = "model.ncnn.bin"
_HEAD_CONV = re.compile(r"^/model\.(\d+)/(cv2|cv3)\.(\d+)/\2\.\3\.2/Conv$")
"""The last convolution of a YOLOv8 Detect head's box (cv2) or class (cv3) branch of one level, as
ultralytics' ONNX export names it."""


def ncnn_available() -> bool:
    """True when the ONNX → ncnn conversion can run here (``onnx`` and ``pnnx`` installed)."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "pnnx"))


def onnx_to_ncnn(onnx_path: Path, out_dir: Path, *, timeout_s: float = 300.0) -> Path:
    """Convert a YOLOv8 ONNX model to an ncnn model of its head's raw outputs; the directory.

    The graph is cut after the last convolution of each Detect branch (per level: box logits of
    ``4 × reg_max`` channels, then class logits), so the ncnn model is purely convolutional and
    takes any input height and width; the head's decode (DFL, anchors, strides, sigmoid) runs in
    numpy (:mod:`inference_service.runtime.yolo_head`). Outputs ``out0``… in level order, box
    before class. Raises :class:`ModelError` when the graph has no such head.
    """
    import onnx
    import onnx.utils

    graph = onnx.load(str(onnx_path)).graph
    convs: dict[tuple[int, str], str] = {}
    for node in graph.node:
        match = _HEAD_CONV.match(node.name)
        if match:
            convs[(int(match.group(3)), match.group(2))] = node.output[0]
    levels = sorted({level for level, _ in convs})
    if not levels or any((lv, b) not in convs for lv in levels for b in ("cv2", "cv3")):
        raise ModelError(
            f"{onnx_path}: no YOLOv8 Detect head found (expected convolutions named like "
            "/model.22/cv2.0/cv2.0.2/Conv, as ultralytics exports them)"
        )
    outputs = [convs[(lv, b)] for lv in levels for b in ("cv2", "cv3")]
    spec = importlib.util.find_spec("pnnx")
    if spec is None or spec.origin is None:
        raise ModelError(f"converting to ncnn needs pnnx: {INSTALL_HINT}")
    pnnx = Path(spec.origin).parent / "pnnx"
    work = out_dir / ".ncnn-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        cut = work / "head.onnx"
        onnx.utils.extract_model(str(onnx_path), str(cut), [graph.input[0].name], outputs)
        # Two input shapes tell pnnx that height and width are dynamic.
        command = [
            str(pnnx), cut.name, "inputshape=[1,3,320,320]", "inputshape2=[1,3,384,640]",
            "fp16=0",  # keep the weights float32 (pnnx stores them as fp16 by default)
        ]  # fmt: skip
        done = subprocess.run(
            command, cwd=work, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        param, weights = work / "head.ncnn.param", work / "head.ncnn.bin"
        if done.returncode != 0 or not param.is_file() or not weights.is_file():
            tail = (done.stderr or done.stdout).strip()[-1500:]
            raise ModelError(f"pnnx could not convert {onnx_path} to ncnn:\n{tail}")
        param.replace(out_dir / NCNN_PARAM)
        weights.replace(out_dir / NCNN_BIN)
    except subprocess.TimeoutExpired:
        raise ModelError(f"converting {onnx_path} to ncnn took over {timeout_s:.0f} s") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("converted %s to ncnn (%d head levels)", onnx_path, len(levels))
    return out_dir


def _child(source: Path, out_dir: Path, imgsz_override: int | None = None) -> int:
    """The child process: load with ultralytics, check it is a YOLOv8 detector, export."""
    yolo_class: Any = importlib.import_module("ultralytics").YOLO

    try:
        yolo = yolo_class(str(source))
    except Exception as exc:  # whatever torch.load or ultralytics raise for a bad file
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return _EXIT_UNREADABLE
    head = type(yolo.model.model[-1]).__name__ if hasattr(yolo.model, "model") else "?"
    end2end = bool(getattr(yolo.model, "end2end", False))
    if yolo.task != "detect" or head != "Detect" or end2end:
        print(
            f"{source} is a {yolo.task!r} model with a {head} head"
            f"{' (end-to-end)' if end2end else ''}; expected a YOLOv8 detection model "
            "(task 'detect', Detect head)",
            file=sys.stderr,
        )
        return _EXIT_NOT_DETECT
    imgsz = imgsz_override or yolo.overrides.get("imgsz", 640)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "model.pt"
    shutil.copyfile(source, work)
    exported = yolo_class(str(work)).export(
        format="onnx", dynamic=True, simplify=True, imgsz=imgsz, batch=1, device="cpu", half=False
    )
    work.unlink()
    target = out_dir / ONNX_NAME
    if Path(exported) != target:
        Path(exported).replace(target)
    print(json.dumps({"onnx": str(target), "imgsz": imgsz}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a YOLOv8 .pt checkpoint to ONNX.")
    parser.add_argument("source", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--imgsz", type=int, default=None)
    args = parser.parse_args(argv)
    return _child(args.source, args.out_dir, args.imgsz)


if __name__ == "__main__":
    sys.exit(main())
