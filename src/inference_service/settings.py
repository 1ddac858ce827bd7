"""Settings: the single home of every default.

Read from environment variables with the prefix ``INFERENCE_`` (SPEC.md, Configuration) and
overridable by CLI flags (``--kafka-bootstrap-servers`` for ``INFERENCE_KAFKA_BOOTSTRAP_SERVERS``,
and so on; see :func:`add_cli_flags`). Nothing here does I/O beyond reading the environment and
the secret files it names (``INFERENCE_*_FILE``, see :data:`SECRET_FILES`).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from inference_service.domain import is_bucket_name
from inference_service.errors import ConfigError

log = logging.getLogger(__name__)

ENV_PREFIX = "INFERENCE_"

Delivery = Literal["exactly_once", "at_least_once"]
Runtime = Literal["auto", "openvino", "onnxruntime", "ncnn", "onnxruntime-cuda", "openvino-gpu"]
Precision = Literal["fp32", "bf16", "int8"]
KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class Settings(BaseSettings):
    """Every setting of the service, with its default and meaning."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        validate_default=True,
    )

    # --- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap_servers: str = Field("localhost:9092", description="Kafka bootstrap servers.")
    tasks_topic: str = Field("inference_tasks", description="Input topic of frame tasks.")
    results_topic: str = Field("inference_results", description="Output topic of results.")
    dlq_topic: str = Field("inference_tasks.dlq", description="Dead-letter topic for bad tasks.")
    group_id: str = Field("inference-group", description="Kafka consumer group.")
    kafka_security_protocol: KafkaSecurityProtocol = Field(
        "PLAINTEXT",
        description="How every Kafka client talks to the brokers: PLAINTEXT, SSL, SASL_PLAINTEXT "
        "or SASL_SSL.",
    )
    kafka_sasl_mechanism: SaslMechanism = Field(
        "PLAIN",
        description="SASL mechanism of the SASL_* protocols: PLAIN, SCRAM-SHA-256 or "
        "SCRAM-SHA-512.",
    )
    kafka_sasl_username: str | None = Field(
        None, description="SASL user name (required by the SASL_* protocols)."
    )
    kafka_sasl_password: SecretStr | None = Field(
        None,
        description="SASL password (required by the SASL_* protocols; never printed). The flag "
        "shows in the process list: prefer INFERENCE_KAFKA_SASL_PASSWORD_FILE.",
    )
    kafka_sasl_password_file: Path | None = Field(
        None,
        description="File holding the SASL password (a mounted secret; a trailing newline is "
        "stripped), instead of INFERENCE_KAFKA_SASL_PASSWORD.",
    )
    kafka_ssl_ca_location: Path | None = Field(
        None,
        description="PEM file of the CA that signed the brokers' certificates (SSL, SASL_SSL); "
        "unset: the system's CAs.",
    )
    delivery: Delivery = Field(
        "exactly_once",
        description="exactly_once (Kafka transactions) or at_least_once (commit after ack).",
    )
    transactional_id_prefix: str = Field(
        "inference-service",
        description="Transactional id prefix (exactly_once): <prefix>-<group>-<instance id>.",
    )
    instance_id: str | None = Field(
        None,
        description="This replica's stable name in its transactional id (exactly_once), e.g. the "
        "pod name of a StatefulSet: a replica restarted with the same id fences its previous "
        "incarnation at once. Unset: the host name and the lowest slot free among the processes "
        "of this network namespace (<host>-0, <host>-1, ...; held while the process runs).",
        pattern=r"^[A-Za-z0-9._-]{1,200}$",
    )
    transaction_timeout_ms: int = Field(
        60_000,
        ge=1000,
        description="exactly_once: how long an open transaction of a dead instance blocks readers.",
    )
    session_timeout_ms: int = Field(
        10_000, ge=1000, description="Kafka group session timeout: how soon a dead replica is seen."
    )
    max_poll_records: int = Field(
        256, ge=1, description="Most records taken from Kafka in one poll."
    )
    commit_interval_ms: int = Field(
        500,
        ge=10,
        le=60_000,
        description="How often results and offsets are committed (one transaction each).",
    )

    # --- S3 ----------------------------------------------------------------------------------
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333; unset means AWS."
    )
    s3_bucket: str = Field("frames", description="Default bucket of frames.")
    s3_allowed_buckets: str | None = Field(
        None,
        description="Buckets a task may name besides INFERENCE_S3_BUCKET, comma-separated "
        "(unset: INFERENCE_S3_BUCKET alone; * : any bucket the credentials reach). A task "
        "naming another gets invalid_task.",
    )
    s3_region: str = Field("us-east-1", description="S3 region.")
    s3_concurrency: int = Field(32, ge=1, le=1024, description="Most S3 GETs under way at once.")

    # --- Model and detection -------------------------------------------------------------------
    model: Path | str = Field(
        Path("best.pt"),
        description="A YOLOv8 .pt checkpoint, an .onnx file, an OpenVINO IR directory, a model "
        "directory made by `inference-service export`, or s3://bucket/key (an .onnx, a .pt, or "
        "a model directory's prefix/), fetched into INFERENCE_CACHE_DIR and reused while "
        "unchanged.",
    )
    conf: float = Field(0.25, gt=0.0, lt=1.0, description="Confidence threshold.")
    iou: float = Field(0.45, gt=0.0, le=1.0, description="IoU threshold of NMS.")
    max_detections: int = Field(300, ge=1, description="Most detections kept per frame.")
    imgsz: int | None = Field(
        None, ge=32, description="Inference size (long side); unset means the model's own."
    )
    runtime: Runtime = Field(
        "auto",
        description="openvino, onnxruntime, ncnn (or a GPU provider); auto picks by measurement.",
    )
    precision: Precision = Field(
        "fp32",
        description="fp32 (as the reference), bf16 (faster on CPUs with native bf16) or int8 "
        "(OpenVINO, quantized once on INFERENCE_CALIBRATION's frames; fastest on every x86 CPU).",
    )
    calibration: str | None = Field(
        None,
        description="int8 only: the frames to calibrate on, letterboxed as served: a folder of "
        "images, a video file, or s3://bucket/prefix/ (frames already in the bucket).",
    )
    calibration_frames: int = Field(
        300,
        ge=1,
        le=10_000,
        description="int8 only: how many frames of INFERENCE_CALIBRATION calibrate (evenly spaced "
        "over the first 10 times as many; fewer than 32 warns).",
    )
    workers: int | Literal["auto"] = Field(
        "auto", description="Detector processes; auto sizes them by the CPUs available."
    )
    threads: int | Literal["auto"] = Field(
        "auto", description="Inference threads per detector process; auto: CPUs / workers."
    )
    cache_dir: Path = Field(
        Path("~/.cache/inference-service"),
        description="Where converted models are cached (keyed by the model file's sha256).",
    )
    model_poll_s: float = Field(
        0.0,
        ge=0.0,
        description="Seconds between checks of the serving model's source for a replacement (S3 "
        "ETags, or a local file's size and mtime); a change swaps the model without downtime. "
        "0: never (SIGHUP or POST /v1/model swap it).",
    )

    # --- Limits --------------------------------------------------------------------------------
    max_frame_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest encoded frame accepted, in bytes."
    )
    max_frame_pixels: int = Field(
        50_000_000, ge=1024, description="Largest decoded frame accepted, in pixels (w × h)."
    )
    max_in_flight: int = Field(
        128,
        ge=1,
        description="Most tasks consumed but not yet published; consumption pauses at this many "
        "and resumes at three quarters.",
    )
    max_in_flight_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024, description="Most frame bytes held in memory at once."
    )
    max_task_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest task record accepted, in bytes."
    )
    worker_retries: int = Field(
        1, ge=0, le=5, description="Retries of a frame on a fresh worker after a worker crash."
    )
    frame_timeout_s: float = Field(
        30.0,
        ge=0.0,
        description="Longest detection of one frame in a worker; past it the worker is replaced "
        "and the frame retried once alone, then inference_timeout (0: no limit).",
    )

    # --- Service -------------------------------------------------------------------------------
    http_host: str = Field("0.0.0.0", description="Address the HTTP server binds to.")
    http_port: int = Field(8003, ge=0, le=65535, description="HTTP port.")
    http_max_body_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="Largest body POST /v1/detect accepts, in bytes (413 over it).",
    )
    http_max_pending: int = Field(
        8,
        ge=1,
        le=1024,
        description="Most POST /v1/detect requests read, waiting or detected at once; one more "
        "gets 503 with Retry-After. Kafka frames go to the workers first.",
    )
    http_token: SecretStr | None = Field(
        None,
        description="Bearer token POST /v1/detect requires (unset: none; never printed). The "
        "probe and metrics endpoints stay open. Prefer INFERENCE_HTTP_TOKEN_FILE.",
    )
    http_token_file: Path | None = Field(
        None,
        description="File holding the HTTP bearer token (a mounted secret; a trailing newline is "
        "stripped), instead of INFERENCE_HTTP_TOKEN.",
    )
    startup_timeout_s: float = Field(
        300.0, ge=0.0, description="How long start-up waits for Kafka and S3 (0: forever)."
    )
    shutdown_timeout_s: float = Field(
        30.0, ge=1.0, description="Longest graceful shutdown before in-flight work is handed back."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )

    @field_validator("workers", "threads", mode="before")
    @classmethod
    def _auto_or_positive(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ValueError("expected a positive integer or 'auto'") from None
        if isinstance(value, int) and value < 1:
            raise ValueError("expected a positive integer or 'auto'")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model_path_or_uri(cls, value: object) -> object:
        """``s3://bucket/key`` stays a string (a Path would fold its ``//``); anything else is a
        local path, relative to the working directory as given."""
        if isinstance(value, Path) and str(value).startswith("s3:/"):
            value = "s3://" + str(value).removeprefix("s3:/")  # a Path folded the URI's "//"
        if isinstance(value, str):
            text = value.strip()
            if not text:
                raise ValueError("empty: name a model file, directory or s3://bucket/key")
            if text.startswith("s3://"):
                bucket = text.removeprefix("s3://").partition("/")[0]
                if not is_bucket_name(bucket):
                    raise ValueError(
                        f"{bucket!r} is not an S3 bucket name (3-63 of a-z, 0-9, '.' and '-')"
                    )
                return text
            return Path(text)
        return value

    @field_validator("s3_allowed_buckets", mode="before")
    @classmethod
    def _bucket_list(cls, value: object) -> object:
        """Normalise ``a, b,,a`` to ``a,b``: bucket names, or ``*`` alone; empty is unset."""
        if isinstance(value, list | tuple | set | frozenset):
            value = ",".join(str(v) for v in value)
        if not isinstance(value, str):
            return value
        names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
        if not names:
            return None
        if "*" in names:
            if len(names) > 1:
                raise ValueError("'*' (any bucket) stands alone, not in a list of buckets")
            return "*"
        for name in names:
            if not is_bucket_name(name):
                raise ValueError(
                    f"{name!r} is not an S3 bucket name (3-63 of a-z, 0-9, '.' and '-')"
                )
        return ",".join(names)

    @field_validator(
        "s3_endpoint_url",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_sasl_password_file",
        "kafka_ssl_ca_location",
        "http_token",
        "http_token_file",
        "calibration",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        """Read each ``*_FILE`` setting into its secret (see :data:`SECRET_FILES`)."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for secret, file_field in SECRET_FILES.items():
            path = out.get(file_field)
            if path is None or (isinstance(path, str) and not path.strip()):
                continue
            given = out.get(secret)
            if isinstance(given, SecretStr):
                given = given.get_secret_value()
            if isinstance(given, str) and given.strip():
                raise ValueError(
                    f"{env_name(secret)} and {env_name(file_field)} are both set: set only one"
                )
            out[secret] = SecretStr(read_secret_file(file_field, Path(path)))
        return out

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL_") and (
            self.kafka_sasl_username is None or self.kafka_sasl_password is None
        ):
            raise ValueError(
                f"{env_name('kafka_security_protocol')}={self.kafka_security_protocol} needs "
                f"{env_name('kafka_sasl_username')} and {env_name('kafka_sasl_password')} "
                f"(or {env_name('kafka_sasl_password_file')}) "
                f"(flags {flag_name('kafka_sasl_username')}, {flag_name('kafka_sasl_password')})"
            )
        return self

    @model_validator(mode="after")
    def _int8_runs_on_openvino(self) -> Settings:
        if self.precision == "int8" and self.runtime not in ("auto", "openvino", "openvino-gpu"):
            raise ValueError(
                f"{env_name('precision')}=int8 runs on OpenVINO only: set {env_name('runtime')} "
                f"to auto or openvino (not {self.runtime}), or {env_name('precision')} to fp32"
            )
        return self

    def allowed_buckets(self) -> frozenset[str] | None:
        """The buckets a task may name besides ``s3_bucket``; None when any may be named."""
        if self.s3_allowed_buckets is None:
            return frozenset()
        if self.s3_allowed_buckets == "*":
            return None
        return frozenset(self.s3_allowed_buckets.split(","))

    def s3_store_options(self) -> dict[str, str]:
        """obstore ``S3Store`` keyword arguments for this service's S3: region, endpoint, and the
        ``AWS_*`` credentials from the environment when both halves are set (else obstore's own
        chain: instance profile, web identity, ...)."""
        options = {"region": self.s3_region}
        if self.s3_endpoint_url:
            options["endpoint"] = self.s3_endpoint_url
        key_id = os.environ.get("AWS_ACCESS_KEY_ID")
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if key_id and secret:
            options["access_key_id"] = key_id
            options["secret_access_key"] = secret
            if token := os.environ.get("AWS_SESSION_TOKEN"):
                options["session_token"] = token
        return options

    def cache_path(self) -> Path:
        """The cache directory with ``~`` expanded."""
        return self.cache_dir.expanduser()


SECRET_FILES: dict[str, str] = {
    "kafka_sasl_password": "kafka_sasl_password_file",
    "http_token": "http_token_file",
}
"""Each secret setting → the setting naming a file to read it from (a mounted Kubernetes secret),
so that the secret need not be in the environment or, worse, on the command line."""


def read_secret_file(file_field: str, path: Path) -> str:
    """The content of a secret file, one trailing newline (``\\n`` or ``\\r\\n``) stripped.

    Raises ``ValueError`` naming the variable (never the content) when the file is missing,
    unreadable or empty.
    """
    where = f"{env_name(file_field)}={str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{where}: is a directory, not a file") from None
    except PermissionError:
        raise ValueError(f"{where}: permission denied (not readable by this user)") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it: {exc.strerror}") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text.strip():
        raise ValueError(f"{where}: the file is empty")
    return text


def env_name(field_name: str) -> str:
    """The environment variable of a setting (``startup_timeout_s`` ->
    ``INFERENCE_STARTUP_TIMEOUT_S``): messages name a setting through this, never by hand."""
    if field_name not in Settings.model_fields:
        raise KeyError(f"no setting {field_name!r}")
    return ENV_PREFIX + field_name.upper()


def default_of(field_name: str) -> Any:
    """A setting's default: for code that takes the value as a parameter but is also called
    without settings (tests, benchmarks), so that the default is still written only here."""
    return Settings.model_fields[field_name].default


def flag_name(field_name: str) -> str:
    """The CLI flag of a setting."""
    return "--" + field_name.replace("_", "-")


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from the environment, then ``overrides`` (CLI flags) on top.

    Raises :class:`ConfigError` naming each bad variable and what it accepts.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    lines = ["invalid settings:"]
    for err in exc.errors():
        if not err["loc"]:  # a rule across settings: its message names them (no input echoed)
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
            continue
        name = str(err["loc"][0])
        field = Settings.model_fields.get(name)
        accepted = field.description if field is not None else ""
        given = "'**********'" if name in SECRET_FILES else repr(err.get("input"))
        lines.append(
            f"  {env_name(name)} (flag {flag_name(name)}) = {given}: {err['msg']}"
            + (f". Accepted: {accepted}" if accepted else "")
        )
    return "\n".join(lines)


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """Add one optional flag per setting; unset flags leave the environment's value."""
    group = parser.add_argument_group("settings (each also read from its environment variable)")
    for name, field in Settings.model_fields.items():
        default = field.default
        group.add_argument(
            flag_name(name),
            dest=f"setting_{name}",
            default=None,
            metavar=name.upper(),
            help=f"{field.description} [{env_name(name)}, default: {default}]",
        )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as CLI flags, by field name.

    A secret given as a flag is taken, with a warning: every user of the host can read it in the
    process list.
    """
    out: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = getattr(args, f"setting_{name}", None)
        if value is not None:
            out[name] = value
            if name in SECRET_FILES:
                log.warning(
                    "%s puts a secret in the process list (ps, /proc/*/cmdline): set %s to a "
                    "mounted secret file instead, or %s",
                    flag_name(name),
                    env_name(SECRET_FILES[name]),
                    env_name(name),
                )
    return out


def settings_table() -> str:
    """A Markdown table of every setting (the README's settings section is generated from it)."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "unset" if default is None else f"`{default}`"
        rows.append(f"| `{env_name(name)}` | `{flag_name(name)}` | {shown} | {field.description} |")
    return "\n".join(rows)
