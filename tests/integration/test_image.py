"""The built container image, run as the Kubernetes pod runs it (``scripts/image_test.py``).

It needs a Docker engine and an image built beforehand (``make image``; the suite never builds
one: that takes minutes and downloads gigabytes). Where either is missing it skips and says so;
CI has no Docker engine, so there it skips. ``make image-test`` runs the same script directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.slow]

IMAGE = os.environ.get("INFERENCE_TEST_IMAGE", "inference-service:0.1.0")


def _why_not() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "no docker command here: install a Docker engine, `make image`, then rerun"
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30, check=False)
    if info.returncode != 0:
        return f"no Docker engine answers (`docker info`: {info.stderr.strip()[:200]})"
    image = subprocess.run(
        [docker, "image", "inspect", IMAGE], capture_output=True, timeout=30, check=False
    )
    if image.returncode != 0:
        return f"no image {IMAGE}: build it with `make image` (the suite does not build it)"
    return None


def test_image_runs_as_the_pod_does(stack_env: dict[str, str]) -> None:
    reason = _why_not()
    if reason is not None:
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "image_test.py"), "--image", IMAGE],
        env={**os.environ, **stack_env},
        capture_output=True,
        text=True,
        timeout=580,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert "image-test: passed" in done.stdout
