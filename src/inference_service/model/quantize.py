"""Post-training int8 quantization of a YOLOv8 OpenVINO model with NNCF; the only user of NNCF.

Like the ``.pt`` export (:mod:`inference_service.model.export`), the quantization runs in a child
process (``python -m inference_service.model.quantize``), so that NNCF (a conversion-time
dependency, the ``export`` extra) never loads into the service or its workers: serving an int8
model needs OpenVINO only.

The recipe (:data:`RECIPE`), as the reference exporters quantize YOLOv8:

- NNCF's ``MIXED`` preset: weights symmetric and per output channel, activations asymmetric (the
  SiLU outputs are not centred on zero);
- the Detect head's decode kept in float: every operation of the head's module (``/model.N/``)
  except the convolutions of its box and class branches (``cv2.*``, ``cv3.*``) is in the ignored
  scope: the distribution-focal-loss softmax and convolution, the anchor and stride arithmetic,
  the concatenations and the class sigmoid. Quantizing them costs box precision for no speed;
- statistics from every calibration input (``subset_size`` = the number of frames), with NNCF's
  fast bias correction.

The child reads the fp32 model (IR or ONNX) and the letterboxed ``uint8`` inputs (one ``.npz``,
converted to the network's float input exactly as serving converts them,
:func:`~inference_service.vision.letterbox.to_batch`) and writes ``model.xml``/``.bin`` with
``FakeQuantize`` nodes, which OpenVINO's CPU plugin runs as int8 kernels (VNNI or AMX where the
CPU has them). It gets ``NNCF_CI=1`` and ``CI=true``, the only switches that turn NNCF's and
``openvino_telemetry``'s usage telemetry off (they would otherwise try to reach an analytics
service on every quantization): the quantization never reaches the network.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inference_service.errors import ModelError
from inference_service.model.calibration import CalibrationSet
from inference_service.model.export import INSTALL_HINT
from inference_service.settings import env_name

log = logging.getLogger(__name__)

INT8_NAME = "model.xml"
REPORT_NAME = "quantization.json"
"""What the quantizer did (recipe, versions, counts, seconds), written beside the model."""
RECIPE: dict[str, Any] = {
    "version": 1,
    "preset": "mixed",
    "head": "float",
    "weights": "per-channel",
}
"""What shapes the quantized model besides the model and the calibration set (part of its cache
key: a change here quantizes again)."""
_HEAD_BRANCH = re.compile(r"^/model\.(\d+)/cv[23]\.\d+/")
"""A layer of a YOLOv8 Detect head's box (cv2) or class (cv3) branch, as ultralytics names it."""
_EXIT_NO_HEAD = 3


def quantize_available() -> bool:
    """True when NNCF is installed (the ``export`` extra)."""
    return importlib.util.find_spec("nncf") is not None


def head_scope(layer_names: Sequence[str]) -> str | None:
    """The ignored-scope pattern of a YOLOv8 Detect head among ``layer_names`` (every layer of the
    head's module except its branch convolutions), or None when there is no such head."""
    heads = {int(m.group(1)) for n in layer_names if (m := _HEAD_BRANCH.match(n))}
    if not heads:
        return None
    head = max(heads)
    return rf"^/model\.{head}/(?!cv[23]\.).*"


def quantize(
    model_path: Path,
    calibration: CalibrationSet,
    out_dir: Path,
    *,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Quantize ``model_path`` (IR ``.xml`` or ``.onnx``) on ``calibration`` into
    ``out_dir/model.xml`` in a child process; the child's report (layers kept in float, counts,
    seconds). Raises :class:`ModelError` when NNCF is missing or the quantization fails."""
    if not quantize_available():
        raise ModelError(
            f"quantizing {model_path} to int8 needs NNCF: {INSTALL_HINT} (or give "
            f"{env_name('model')} an already quantized OpenVINO IR)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = out_dir / "calibration.npz"
    np.savez(inputs, *calibration.inputs)
    command = [sys.executable, "-m", "inference_service.model.quantize", str(model_path),
               str(inputs), str(out_dir)]  # fmt: skip
    log.info(
        "quantizing %s to int8 on %d calibration frames (once; cached in %s)",
        model_path,
        len(calibration.inputs),
        out_dir,
    )
    env = dict(os.environ)
    env["NNCF_CI"] = "1"  # NNCF's switch that turns its usage telemetry off
    env["CI"] = "true"  # openvino_telemetry's only one (it reads nothing else)
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise ModelError(f"quantizing {model_path} took longer than {timeout_s:.0f} s") from None
    finally:
        inputs.unlink(missing_ok=True)
    tail = (done.stderr or done.stdout).strip()[-2000:]
    if done.returncode == _EXIT_NO_HEAD:
        raise ModelError(done.stderr.strip().splitlines()[-1])
    if done.returncode != 0 or not (out_dir / INT8_NAME).is_file():
        raise ModelError(f"quantizing {model_path} to int8 failed:\n{tail}")
    try:
        report: dict[str, Any] = json.loads((out_dir / REPORT_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"quantizing {model_path}: no report from the quantizer ({exc})") from None
    return report


def _child(model_path: Path, inputs_path: Path, out_dir: Path) -> int:
    """The child process: read, quantize with NNCF, save."""
    import nncf
    import openvino as ov

    from inference_service.vision.letterbox import to_batch

    started = time.perf_counter()
    model = ov.Core().read_model(str(model_path))
    names = [op.get_friendly_name() for op in model.get_ordered_ops()]
    scope = head_scope(names)
    if scope is None:
        print(
            f"{model_path}: no YOLOv8 Detect head found (expected layers named like "
            "/model.22/cv2.0/..., as ultralytics exports them); int8 keeps the head's decode in "
            "float and needs to find it",
            file=sys.stderr,
        )
        return _EXIT_NO_HEAD
    with np.load(inputs_path) as data:
        inputs = [data[f"arr_{i}"] for i in range(len(data.files))]
    dataset = nncf.Dataset(inputs, to_batch)
    quantized = nncf.quantize(
        model,
        dataset,
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(inputs),
        ignored_scope=nncf.IgnoredScope(patterns=[scope], validate=False),
    )
    ov.save_model(quantized, str(out_dir / INT8_NAME), compress_to_fp16=False)
    kept = sorted(n for n in names if re.match(scope, n))
    ops = quantized.get_ordered_ops()
    report = {
        "recipe": RECIPE,
        "nncf": getattr(nncf, "__version__", "?"),
        "openvino": ov.get_version(),
        "calibration_frames": len(inputs),
        "ignored_scope": scope,
        "float_head_layers": len(kept),
        "fake_quantize": sum(op.get_type_name() == "FakeQuantize" for op in ops),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Quantize a YOLOv8 OpenVINO model to int8.")
    parser.add_argument("model", type=Path)
    parser.add_argument("inputs", type=Path, help=".npz of letterboxed uint8 inputs")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return _child(args.model, args.inputs, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
