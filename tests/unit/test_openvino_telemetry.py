"""OpenVINO is imported without its usage telemetry reaching for the network.

Each child process runs with a ``sitecustomize`` that records (and refuses) every non-Unix
connect and name lookup, and with ``CI`` unset (CI runners set it, and it is the switch under
test). A bare ``import openvino`` tries the network (the control, so the check can fail); the
service's import does not, and leaves ``CI`` as it found it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model.netblock import block_network_in_children

WAIT = "import time; time.sleep(1.5)"
"""The telemetry sends from a thread of its own: give it time before the child exits."""


def _attempts(tmp_path: Path, code: str) -> tuple[str, str]:
    mp, log = block_network_in_children(tmp_path)
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
        src = str(Path(__file__).resolve().parents[2] / "src")
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], src])
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
    finally:
        mp.undo()
    assert proc.returncode == 0, proc.stderr
    assert Path(str(log) + ".loaded").exists(), "the network blocker did not load"
    return (log.read_text() if log.exists() else ""), proc.stdout


@pytest.mark.slow
def test_a_bare_import_reaches_for_the_network(tmp_path: Path) -> None:
    tried, _ = _attempts(tmp_path, f"import openvino; {WAIT}")
    assert tried, "OpenVINO's telemetry no longer tries the network: the guard may be obsolete"


@pytest.mark.slow
def test_the_services_import_tries_nothing(tmp_path: Path) -> None:
    code = (
        "import os; from inference_service.runtime.openvino_import import import_openvino; "
        "ov = import_openvino(); ov.Core().available_devices; "
        f"print(os.environ.get('CI')); {WAIT}"
    )
    tried, out = _attempts(tmp_path, code)
    assert tried == ""
    assert out.strip() == "None"  # CI restored (unset)
