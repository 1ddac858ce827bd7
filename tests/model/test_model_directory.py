"""``inference-service export`` of the real test model into a model directory, and that directory
served on a machine view without torch: a child process whose ``sitecustomize`` refuses every
import of torch, ultralytics, NNCF and pnnx (a ``sys.meta_path`` finder, recording each attempt)
and blocks the network. The service's own venv has the export extra installed, so the blocker is
what stands for "a venv without the extra": the child proves it can import none of them.

The export itself runs offline (network blocked in its children too). Detections from the
directory must equal those of the ``.pt`` resolved the usual way (its conversion cached).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from inference_service import Detector
from inference_service.model.manifest import read_manifest
from tests.conftest import ROOT, TEST_MODEL
from tests.model.netblock import SOCKET_BLOCKER, block_network_in_children

pytestmark = [pytest.mark.model]

PHOTOS = ROOT / "tests" / "data" / "photos"
PHOTO = PHOTOS / "brick_shapes.jpg"
BLOCKED = ("torch", "ultralytics", "nncf", "pnnx", "torchvision")
CALIBRATION_FRAMES = 8

IMPORT_BLOCKER = """
import os, sys
_imports_log = os.environ["IMPORT_ATTEMPTS_LOG"]
_blocked = set(os.environ["BLOCKED_IMPORTS"].split(","))
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _blocked:
            with open(_imports_log, "a") as f:
                f.write(name + "\\n")
            raise ImportError(f"{name} is not installed (blocked by the test)")
        return None
sys.meta_path.insert(0, _Refuse())
"""

CHILD = """
import json, sys
from pathlib import Path
try:
    import torch  # noqa: F401
    sys.exit("the blocker let torch in")
except ImportError:
    pass
from inference_service import Detector
directory, cache, photo = sys.argv[1:4]
out = {}
for runtime, precision in [("onnxruntime", "fp32"), ("openvino", "fp32"), ("ncnn", "fp32"),
                           ("openvino", "int8")]:
    with Detector.from_model(directory, runtime=runtime, precision=precision, threads=1,
                             cache_dir=cache) as detector:
        found = detector.detect(Path(photo).read_bytes())
        out[f"{runtime}/{precision}"] = {
            "info": detector.info.to_dict(),
            "detections": [d.to_dict() for d in found.detections],
        }
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "ultralytics", "nncf"})
print(json.dumps({"results": out, "loaded": loaded}))
"""


@dataclass(frozen=True, slots=True)
class Exported:
    directory: Path
    stderr: str
    net_attempts: list[str]
    blocker_loaded: bool


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    if not TEST_MODEL.is_file():
        pytest.skip(f"{TEST_MODEL} not present (made by scripts/train_test_model.py)")
    pytest.importorskip("ultralytics", reason="exporting a .pt needs the export extra")
    pytest.importorskip("nncf", reason="int8 needs the export extra")
    tmp = tmp_path_factory.mktemp("export")
    frames = tmp / "frames"
    frames.mkdir()
    for photo in sorted(PHOTOS.glob("*.jpg"))[:CALIBRATION_FRAMES]:
        shutil.copy(photo, frames / photo.name)
    mp, attempts = block_network_in_children(tmp)
    mp.setenv("INFERENCE_CACHE_DIR", str(tmp / "export-cache"))
    out = tmp / "best"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "inference_service.cli", "export", str(TEST_MODEL),
             "--out", str(out), "--precision", "fp32", "int8", "--calibration", str(frames),
             "--calibration-frames", str(CALIBRATION_FRAMES)],
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
    finally:
        mp.undo()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(out)
    lines = attempts.read_text().splitlines() if attempts.exists() else []
    yield Exported(out, done.stderr, lines, Path(f"{attempts}.loaded").exists())


def test_export_made_every_conversion_offline(exported: Exported) -> None:
    assert exported.blocker_loaded and exported.net_attempts == []
    manifest = read_manifest(exported.directory)
    assert manifest.source_name == "best.pt"
    assert manifest.source_sha256 == hashlib.sha256(TEST_MODEL.read_bytes()).hexdigest()
    assert manifest.file("onnx") == "model.onnx"
    assert manifest.file("openvino", "fp32") == manifest.file("openvino", "bf16")
    assert manifest.file("openvino", "int8") == "int8/model.xml"
    assert manifest.file("ncnn") == "ncnn/model.ncnn.param"
    assert {"ultralytics", "torch", "openvino", "nncf", "pnnx"} <= set(manifest.tools)
    assert manifest.extra["int8"]["calibration_frames"] == CALIBRATION_FRAMES
    assert manifest.metadata.names and manifest.metadata.task == "detect"
    for step in ("to ONNX", "OpenVINO IR", "ncnn", "int8", "wrote"):
        assert step in exported.stderr, f"no progress line about {step!r} on stderr"


@pytest.fixture(scope="module")
def served(exported: Exported, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The directory served in a child that can import neither torch nor ultralytics."""
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "blocker").mkdir()
    (tmp / "blocker" / "sitecustomize.py").write_text(SOCKET_BLOCKER + IMPORT_BLOCKER)
    imports_log = tmp / "imports.log"
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(tmp / "blocker"),
        "NET_ATTEMPTS_LOG": str(tmp / "net.log"),
        "IMPORT_ATTEMPTS_LOG": str(imports_log),
        "BLOCKED_IMPORTS": ",".join(BLOCKED),
        "HOME": str(tmp),
        # `import openvino` itself reports usage to an analytics service unless CI=true (its only
        # switch), in any process that serves with OpenVINO, whatever the model: the service's
        # problem, not the directory's; switched off here so that any other attempt still fails.
        "CI": "true",
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(exported.directory), str(tmp / "cache"), str(PHOTO)],
        env=env, capture_output=True, text=True, timeout=600, check=False, cwd=tmp,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    report["net_attempts"] = (tmp / "net.log").read_text() if (tmp / "net.log").exists() else ""
    report["blocker_loaded"] = (tmp / "net.log.loaded").exists()
    # The child's own probe is the only attempt: nothing in the service tried to import them.
    report["import_attempts"] = imports_log.read_text().split()
    report["cache_files"] = [p.name for p in (tmp / "cache").rglob("*") if p.is_file()]
    return report


def test_the_directory_serves_without_torch_or_network(served: dict[str, Any]) -> None:
    assert served["blocker_loaded"] and served["net_attempts"] == ""
    assert served["import_attempts"] == ["torch"], served["import_attempts"]
    assert served["loaded"] == []
    results = served["results"]
    assert results["ncnn/fp32"]["info"]["runtime"] == "ncnn/fp32"
    assert results["openvino/int8"]["info"]["runtime"] == "openvino/int8"
    sha = hashlib.sha256(TEST_MODEL.read_bytes()).hexdigest()
    for name, result in results.items():
        assert result["info"]["sha256"] == sha, f"{name}: the identity is the .pt's"
        assert result["detections"], f"{name}: the test photo has shapes the model finds"
    # Nothing was converted or quantized into the cache (OpenVINO's compiled-model blobs aside).
    assert not [f for f in served["cache_files"] if f.endswith((".onnx", ".param", ".json"))]


def test_the_directory_detects_as_the_checkpoint_does(
    served: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    cache = tmp_path_factory.mktemp("pt-cache")
    with Detector.from_model(
        TEST_MODEL, runtime="onnxruntime", threads=1, cache_dir=str(cache)
    ) as detector:
        expected = [d.to_dict() for d in detector.detect(PHOTO.read_bytes()).detections]
    got = served["results"]["onnxruntime/fp32"]["detections"]
    assert [d["class_id"] for d in got] == [d["class_id"] for d in expected]
    for a, b in zip(got, expected, strict=True):
        assert abs(a["confidence"] - b["confidence"]) < 1e-3
        for key in ("x1", "y1", "x2", "y2"):
            assert abs(a["bbox"][key] - b["bbox"][key]) < 0.5
