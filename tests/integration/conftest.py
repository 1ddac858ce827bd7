"""Fixtures for tests of the whole service on the real stack.

- ``model_env`` (session) -> ``dict[str, str]``: the stack's variables plus the test model, a model
  cache converted once for the session, and a light worker layout (1 process × 1 thread).
- ``pipeline`` (function) -> :class:`harness.Pipeline`: fresh topics (tasks with 3 partitions), a
  fresh bucket and group; services started through it are stopped at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import TEST_MODEL, Pipeline


@pytest.fixture(scope="session")
def model_env(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    if not TEST_MODEL.exists():
        pytest.fail(
            f"the test model {TEST_MODEL} is missing (scripts/train_test_model.py makes it)"
        )
    cache = tmp_path_factory.mktemp("model-cache")
    env = dict(os.environ)
    env.update(stack_env)
    env.update(
        INFERENCE_MODEL=str(TEST_MODEL),
        INFERENCE_CACHE_DIR=str(cache),
        INFERENCE_WORKERS="1",
        INFERENCE_THREADS="1",
        INFERENCE_LOG_LEVEL=os.environ.get("TEST_SERVICE_LOG_LEVEL", "INFO"),
        YOLO_OFFLINE="1",
        YOLO_AUTOINSTALL="False",
        YOLO_CONFIG_DIR=str(cache / "ultralytics"),
        PYTHONUNBUFFERED="1",
    )
    # Convert the checkpoint once, so that every service process of the session starts from the cache.
    from inference_service.model.resolve import resolve_model
    from inference_service.settings import Settings

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        resolve_model(Settings())
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return env


@pytest.fixture
def pipeline(
    model_env: dict[str, str],
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    s3_bucket: Callable[..., str],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Pipeline]:
    p = Pipeline(
        bootstrap=kafka_bootstrap,
        tasks_topic=unique_topic(3, "tasks"),
        results_topic=unique_topic(3, "results"),
        dlq_topic=unique_topic(1, "dlq"),
        bucket=s3_bucket("frames"),
        group=f"group-{uuid.uuid4().hex[:8]}",
        base_env=model_env,
        workdir=tmp_path,
    )
    yield p
    p.stop_all()
    report: Any = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for svc in p.services:
            print(f"--- {svc.log_path} ---\n{svc.log_tail(120)}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, "rep_" + rep.when, rep)
