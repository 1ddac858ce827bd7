"""Shared fixtures.

The local stack (``scripts/stack``: a real Apache Kafka broker and a real SeaweedFS S3 server on
loopback) is started once per session by :func:`stack_env`, which reuses a stack that already runs
and stops only the servers that it started itself. Everything that talks to Kafka or S3 depends on
it, directly or through :func:`kafka_bootstrap`, :func:`kafka_admin` or :func:`s3_client`.

Fixtures (add new ones under the matching heading):

- ``stack_env`` (session) -> ``dict[str, str]``: the variables that ``scripts/stack up`` exports,
  also set in ``os.environ`` for the session.
- ``kafka_bootstrap`` (session) -> ``str``: ``host:port`` of the broker.
- ``kafka_admin`` (session) -> ``confluent_kafka.admin.AdminClient``.
- ``unique_topic`` (function) -> ``(partitions: int = 1, prefix: str = "test") -> str``: creates a
  uniquely named topic, waits until every partition has a leader, deletes it afterwards.
- ``s3_client`` (session) -> a boto3 S3 client on the stack, path-style addressing.
- ``s3_bucket`` (function) -> ``(prefix: str = "test") -> str``: creates a uniquely named bucket,
  empties and deletes it afterwards.

Constants (``from tests.conftest import ...``): ``TEST_MODEL``, the test model's path (its home is
``inference_devtools.paths``; ``scripts/train_test_model.py`` makes it); ``CONF``, ``IOU`` and
``MAX_DETECTIONS``, the service's defaults (from its settings), for tests that stand in for the
service.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from inference_devtools import paths
from inference_service.settings import default_of

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "scripts" / "stack"
STACK_UP_TIMEOUT_S = 600  # the first run fetches the Kafka jars with Maven

TEST_MODEL: Path = paths.TEST_MODEL
CONF: float = default_of("conf")
IOU: float = default_of("iou")
MAX_DETECTIONS: int = default_of("max_detections")


def parse_exports(text: str) -> dict[str, str]:
    """``export NAME=value`` lines (as ``scripts/stack up`` prints them) to a dict."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) != 2 or words[0] != "export" or "=" not in words[1]:
            raise ValueError(f"not an export line: {line!r}")
        name, _, value = words[1].partition("=")
        env[name] = value
    return env


# --- the local stack ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Start (or reuse) the local stack once; its variables are set in os.environ meanwhile."""
    started_file = tmp_path_factory.mktemp("stack") / "started"
    proc = subprocess.run(
        [str(STACK), "up", "--started-file", str(started_file)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STACK_UP_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/stack up failed (exit {proc.returncode}):\n{proc.stderr}")
    env = parse_exports(proc.stdout)
    started = started_file.read_text().split() if started_file.exists() else []
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        if started:  # never stop servers that ran before this session
            subprocess.run(
                [str(STACK), "down", "--only", ",".join(started)],
                stdin=subprocess.DEVNULL,
                timeout=120,
                check=False,
            )


# --- Kafka --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap(stack_env: dict[str, str]) -> str:
    """``host:port`` of the local broker."""
    return stack_env["INFERENCE_KAFKA_BOOTSTRAP_SERVERS"]


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Any:
    """A confluent-kafka AdminClient on the local broker."""
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": kafka_bootstrap})


def _wait_for_leaders(admin: Any, topic: str, partitions: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        if (
            meta is not None
            and meta.error is None
            and len(meta.partitions) == partitions
            and all(p.leader >= 0 for p in meta.partitions.values())
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {topic}: partitions without a leader after {timeout} s")


@pytest.fixture
def unique_topic(kafka_admin: Any) -> Iterator[Callable[..., str]]:
    """Factory: ``unique_topic(partitions=1, prefix="test")`` creates a topic, returns its name.

    Every topic created is deleted when the test ends.
    """
    from confluent_kafka.cimpl import NewTopic

    created: list[str] = []

    def create(partitions: int = 1, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        futures = kafka_admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)]
        )
        futures[name].result(timeout=30)
        created.append(name)
        _wait_for_leaders(kafka_admin, name, partitions)
        return name

    yield create
    if created:
        for future in kafka_admin.delete_topics(created, operation_timeout=30).values():
            try:
                future.result(timeout=60)
            except Exception as exc:  # cleanup only: report, do not fail the test
                print(f"unique_topic: delete failed: {exc}")


# --- S3 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_client(stack_env: dict[str, str]) -> Any:
    """A boto3 S3 client on the local S3 server (path-style addressing, the stack's credentials)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=stack_env["INFERENCE_S3_ENDPOINT_URL"],
        aws_access_key_id=stack_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack_env["AWS_SECRET_ACCESS_KEY"],
        region_name=stack_env["AWS_DEFAULT_REGION"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


@pytest.fixture
def s3_bucket(s3_client: Any) -> Iterator[Callable[..., str]]:
    """Factory: ``s3_bucket(prefix="test")`` creates a fresh bucket, returns its name.

    Every bucket created is emptied and deleted when the test ends.
    """
    created: list[str] = []

    def create(prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        s3_client.create_bucket(Bucket=name)
        created.append(name)
        return name

    yield create
    for name in created:
        try:
            for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    s3_client.delete_object(Bucket=name, Key=obj["Key"])
            s3_client.delete_bucket(Bucket=name)
        except Exception as exc:  # cleanup only: report, do not fail the test
            print(f"s3_bucket: cleanup of {name} failed: {exc}")
