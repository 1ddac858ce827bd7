"""The local stack itself: a real Kafka broker and a real S3 server behave as the service needs."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from confluent_kafka import Consumer, KafkaError, Producer

STACK = Path(__file__).resolve().parents[2] / "scripts" / "stack"


def _consume(
    bootstrap: str, topic: str, count: int, timeout: float = 30.0, isolation: str | None = None
) -> list[Any]:
    """Read ``count`` records of ``topic`` from the beginning with a fresh group."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **({"isolation.level": isolation} if isolation else {}),
        }
    )
    consumer.subscribe([topic])
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError(f"consume error: {err}")
            records.append(msg)
    finally:
        consumer.close()
    assert len(records) == count, f"read {len(records)} of {count} records of {topic}"
    return records


def _stack(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STACK), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _stack_pids() -> dict[str, int]:
    """Server name -> pid of the running stack, from ``scripts/stack status``."""
    out = _stack("status").stdout
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+pid (\d+)", out, re.MULTILINE)}


# --- Kafka --------------------------------------------------------------------------------------


@pytest.mark.kafka
def test_keyed_records_keep_partition_and_order(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic(partitions=3)
    keys = [f"video-{i}" for i in range(8)]
    per_key = 20
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for seq in range(per_key):
        for key in keys:
            producer.produce(topic, key=key.encode(), value=f"{key}:{seq}".encode())
    assert producer.flush(30) == 0

    records = _consume(kafka_bootstrap, topic, len(keys) * per_key)
    partitions: dict[str, set[int]] = {}
    sequences: dict[str, list[int]] = {}
    for msg in records:
        key = msg.key().decode()
        partitions.setdefault(key, set()).add(msg.partition())
        value_key, _, seq = msg.value().decode().partition(":")
        assert value_key == key
        sequences.setdefault(key, []).append(int(seq))
    assert sorted(partitions) == sorted(keys)
    assert all(len(p) == 1 for p in partitions.values()), partitions  # same key, same partition
    assert len(set().union(*partitions.values())) > 1  # the keys do spread over partitions
    for key, seqs in sequences.items():
        assert seqs == list(range(per_key)), f"order of {key} not kept: {seqs}"


@pytest.mark.kafka
def test_transactions_read_committed_hides_aborted(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic(partitions=1)
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"test-{uuid.uuid4().hex}"}
    )
    producer.init_transactions(30)

    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic, key=b"k", value=f"committed-{i}".encode())
    producer.commit_transaction(30)

    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic, key=b"k", value=f"aborted-{i}".encode())
    producer.flush(30)  # the aborted records do reach the log
    producer.abort_transaction(30)

    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"after")
    producer.commit_transaction(30)

    committed = _consume(kafka_bootstrap, topic, 4, isolation="read_committed")
    assert [m.value() for m in committed] == [
        b"committed-0",
        b"committed-1",
        b"committed-2",
        b"after",
    ]
    uncommitted = _consume(kafka_bootstrap, topic, 7, isolation="read_uncommitted")
    assert [m.value() for m in uncommitted][3:6] == [b"aborted-0", b"aborted-1", b"aborted-2"]


# --- S3 -----------------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_put_get_and_missing_key(s3_client: Any) -> None:
    key = f"test/{uuid.uuid4().hex}.bin"
    body = uuid.uuid4().bytes * 4096  # 64 KiB
    s3_client.put_object(Bucket="frames", Key=key, Body=body, ContentType="image/jpeg")
    try:
        got = s3_client.get_object(Bucket="frames", Key=key)
        assert got["Body"].read() == body
        assert got["ContentLength"] == len(body)

        with pytest.raises(ClientError) as missing:
            s3_client.get_object(Bucket="frames", Key=f"{key}.missing")
        assert missing.value.response["Error"]["Code"] == "NoSuchKey"
    finally:
        s3_client.delete_object(Bucket="frames", Key=key)


@pytest.mark.s3
@pytest.mark.parametrize(
    ("access_key", "secret_key"),
    [("inference", "wrong-secret"), ("nobody", "inference-secret")],
    ids=["wrong-secret", "unknown-key"],
)
def test_s3_refuses_wrong_credentials(
    stack_env: dict[str, str], s3_client: Any, access_key: str, secret_key: str
) -> None:
    import boto3
    from botocore.config import Config

    key = f"test/{uuid.uuid4().hex}.bin"
    s3_client.put_object(Bucket="frames", Key=key, Body=b"secret frame")
    try:
        intruder = boto3.client(
            "s3",
            endpoint_url=stack_env["INFERENCE_S3_ENDPOINT_URL"],
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )
        refused = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"}
        with pytest.raises(ClientError) as get:
            intruder.get_object(Bucket="frames", Key=key)
        assert get.value.response["Error"]["Code"] in refused
        with pytest.raises(ClientError) as put:
            intruder.put_object(Bucket="frames", Key=f"{key}.intruder", Body=b"x")
        assert put.value.response["Error"]["Code"] in refused
    finally:
        s3_client.delete_object(Bucket="frames", Key=key)


@pytest.mark.s3
def test_s3_limited_identity_reads_only_frames_buckets(
    stack_env: dict[str, str], s3_client: Any, s3_bucket: Callable[..., str]
) -> None:
    """The second identity may read and list buckets named ``frames*`` and nothing else."""
    from botocore.config import Config

    readable, private = s3_bucket("frames"), s3_bucket("private")
    for bucket in (readable, private):
        s3_client.put_object(Bucket=bucket, Key="k.jpg", Body=b"frame")
    limited = boto3.client(
        "s3",
        endpoint_url=stack_env["INFERENCE_S3_ENDPOINT_URL"],
        aws_access_key_id=stack_env["STACK_S3_LIMITED_ACCESS_KEY_ID"],
        aws_secret_access_key=stack_env["STACK_S3_LIMITED_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    assert limited.get_object(Bucket=readable, Key="k.jpg")["Body"].read() == b"frame"
    assert limited.list_objects_v2(Bucket=readable)["KeyCount"] == 1
    for call in (
        lambda: limited.get_object(Bucket=private, Key="k.jpg"),
        lambda: limited.get_object(Bucket=private, Key="missing.jpg"),  # 403, not 404
        lambda: limited.list_objects_v2(Bucket=private),
        lambda: limited.put_object(Bucket=readable, Key="w.jpg", Body=b"x"),
    ):
        with pytest.raises(ClientError) as refused:
            call()
        assert refused.value.response["Error"]["Code"] == "AccessDenied"


# --- the stack script ---------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.s3
def test_up_twice_starts_nothing_twice(stack_env: dict[str, str]) -> None:
    before = _stack_pids()
    assert set(before) == {"kafka", "s3"}
    again = _stack("up")
    assert again.returncode == 0, again.stderr
    assert again.stdout == _stack("env").stdout  # stdout: the export lines only
    assert f"export AWS_ACCESS_KEY_ID={stack_env['AWS_ACCESS_KEY_ID']}" in again.stdout.splitlines()
    assert "already running" in again.stderr
    assert _stack_pids() == before


@pytest.mark.kafka
@pytest.mark.s3
def test_servers_listen_on_loopback_only(stack_env: dict[str, str]) -> None:
    if shutil.which("ss") is None:
        pytest.fail("`ss` (iproute2) is missing: `make venv` installs it")
    pids = _stack_pids()
    assert set(pids) == {"kafka", "s3"}
    out = subprocess.run(
        ["ss", "-ltnpH"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    listening: dict[str, list[str]] = {name: [] for name in pids}
    for line in out.splitlines():
        fields = line.split()
        local, process = fields[3], " ".join(fields[5:])
        for name, pid in pids.items():
            if f"pid={pid}," in process:
                listening[name].append(local)
    bootstrap_port = stack_env["INFERENCE_KAFKA_BOOTSTRAP_SERVERS"].rsplit(":", 1)[1]
    s3_port = stack_env["INFERENCE_S3_ENDPOINT_URL"].rsplit(":", 1)[1]
    assert f"127.0.0.1:{bootstrap_port}" in listening["kafka"], listening
    assert f"127.0.0.1:{s3_port}" in listening["s3"], listening
    loopback = ("127.", "[::1]:", "[::ffff:127.")
    for name, addresses in listening.items():
        exposed = [a for a in addresses if not a.startswith(loopback)]
        assert not exposed, f"{name} listens beyond loopback: {exposed}"


@pytest.mark.slow
@pytest.mark.kafka
@pytest.mark.s3
def test_down_then_up_keeps_data(
    kafka_bootstrap: str, s3_client: Any, unique_topic: Callable[..., str]
) -> None:
    key = f"test/{uuid.uuid4().hex}.bin"
    body = uuid.uuid4().bytes * 1024
    s3_client.put_object(Bucket="frames", Key=key, Body=body)
    topic = unique_topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "acks": "all"})
    for i in range(5):
        producer.produce(topic, key=b"video", value=f"kept-{i}".encode())
    assert producer.flush(30) == 0
    before = _stack_pids()

    try:
        down = _stack("down")
        assert down.returncode == 0, down.stderr
        assert _stack("status").returncode == 1  # both stopped
    finally:
        up = _stack("up")  # other tests use the stack: always bring it back
    assert up.returncode == 0, up.stderr
    after = _stack_pids()
    assert set(after) == {"kafka", "s3"}
    assert all(after[n] != before[n] for n in after)  # really restarted

    assert s3_client.get_object(Bucket="frames", Key=key)["Body"].read() == body
    s3_client.delete_object(Bucket="frames", Key=key)
    records = _consume(kafka_bootstrap, topic, 5, timeout=60)
    assert [m.value() for m in records] == [f"kept-{i}".encode() for i in range(5)]
