"""Run the built image as the Kubernetes pod runs it, against the local stack (``make image-test``).

Run with the stack's environment (``scripts/stack run -- .venv/bin/python scripts/image_test.py``).
The container gets the pod's security context from ``deploy/k8s/deployment.yaml``: read-only root
filesystem, uid/gid 10001, every capability dropped, no privilege escalation, the pod's emptyDir
paths as tmpfs, and the environment of ``deploy/k8s/configmap.yaml`` plus the Deployment's own
``env``, with the addresses, credentials, topics and group pointed at the local stack (topics and
group unique to the run, so nothing else is disturbed). Over the host network it must:

1. become ready (``/readyz`` 200);
2. process a submitted video completely (``inference-service collect --expect``: one result per
   frame, none missing, none duplicated);
3. answer ``/metrics`` with the results counted;
4. stop on SIGTERM (``docker stop`` with the pod's grace period) with exit status 0, in time.

Then the same image once more with a model mounted at run time (``--mounted``, on by default): the
image's own model directory (made by ``inference-service export`` at build time) copied into a
host directory, mounted read-only, and ``INFERENCE_MODEL`` pointed at it. Exit status 0 when
every check passed; 2 when Docker or the image is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
READY_TIMEOUT_S = 240.0
# The stack's variables the container needs; the rest of the host's environment stays out.
STACK_VARS = (
    "INFERENCE_KAFKA_BOOTSTRAP_SERVERS",
    "INFERENCE_S3_ENDPOINT_URL",
    "INFERENCE_S3_BUCKET",
    "INFERENCE_S3_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)


def _manifest(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((K8S / name).read_text())
    assert isinstance(doc, dict)
    return doc


def pod_spec() -> dict[str, Any]:
    """The container's settings as the Deployment gives them (its own env over the ConfigMap's)."""
    pod = _manifest("deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {str(k): str(v) for k, v in _manifest("configmap.yaml")["data"].items()}
    env.update({e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e})
    security = container["securityContext"]
    tmpfs = [m["mountPath"] for m in container.get("volumeMounts", [])]
    return {
        "env": env,
        "user": f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}",
        "read_only": bool(security.get("readOnlyRootFilesystem")),
        "drop": security.get("capabilities", {}).get("drop", []),
        "no_new_privileges": security.get("allowPrivilegeEscalation") is False,
        "tmpfs": tmpfs,
        "fs_group": int(pod["securityContext"]["fsGroup"]),
        "grace_s": int(pod["terminationGracePeriodSeconds"]),
        "memory": container["resources"]["limits"]["memory"],
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    proc = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise SystemExit(f"docker {' '.join(args[:2])} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "inference_service.cli", *args]
    return subprocess.run(
        cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def _step(name: str, t0: float) -> None:
    print(f"image-test: {name} ({time.monotonic() - t0:.1f} s)", flush=True)


def create_topics(env: dict[str, str]) -> None:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": env["INFERENCE_KAFKA_BOOTSTRAP_SERVERS"]})
    topics = [
        NewTopic(env["INFERENCE_TASKS_TOPIC"], num_partitions=3, replication_factor=1),
        NewTopic(env["INFERENCE_RESULTS_TOPIC"], num_partitions=3, replication_factor=1),
        NewTopic(env["INFERENCE_DLQ_TOPIC"], num_partitions=1, replication_factor=1),
    ]
    for future in admin.create_topics(topics).values():
        future.result(timeout=30)


def delete_topics(env: dict[str, str]) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": env["INFERENCE_KAFKA_BOOTSTRAP_SERVERS"]})
    names = [
        env[k] for k in ("INFERENCE_TASKS_TOPIC", "INFERENCE_RESULTS_TOPIC", "INFERENCE_DLQ_TOPIC")
    ]
    for future in admin.delete_topics(names).values():
        try:
            future.result(timeout=30)
        except Exception as exc:  # best effort: the run's own topics only
            print(f"image-test: deleting a topic: {exc}", file=sys.stderr)


def render_frames(folder: Path, frames: int, seed: int) -> None:
    import cv2
    import numpy as np

    from inference_devtools import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index, (image, _boxes) in enumerate(synthetic.render_sequence(rng, 640, 384, frames, 4)):
        cv2.imwrite(str(folder / f"{index:06d}.jpg"), image)


class Container:
    """One ``docker run -d`` of the image under the pod's security context."""

    def __init__(
        self,
        image: str,
        spec: dict[str, Any],
        env: dict[str, str],
        volumes: list[str],
        env_file: Path,
    ) -> None:
        env_file.write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items())))
        args = ["run", "-d", "--network=host", "--user", spec["user"], "--env-file", str(env_file)]
        args += ["--memory", spec["memory"].replace("Gi", "g").replace("Mi", "m")]
        if spec["read_only"]:
            args.append("--read-only")
        args += [f"--cap-drop={cap}" for cap in spec["drop"]]
        if spec["no_new_privileges"]:
            args += ["--security-opt", "no-new-privileges:true"]
        for path in spec["tmpfs"]:
            # An emptyDir is writable by the pod's user and fsGroup; so is this tmpfs (a mode
            # option would not do: Docker copies the image directory's owner and mode up).
            owner = f"uid={spec['user'].split(':')[0]},gid={spec['fs_group']}"
            args += ["--tmpfs", f"{path}:rw,nosuid,nodev,size=256m,{owner}"]
        for volume in volumes:
            args += ["-v", volume]
        self.id = _docker(*args, image)
        self.port = int(env["INFERENCE_HTTP_PORT"])

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def running(self) -> bool:
        return _docker("inspect", "-f", "{{.State.Running}}", self.id) == "true"

    def logs(self) -> str:
        proc = subprocess.run(
            ["docker", "logs", self.id], capture_output=True, text=True, check=False, timeout=60
        )
        return proc.stdout + proc.stderr

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.running():
                raise SystemExit(f"the container exited before ready:\n{self.logs()[-4000:]}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise SystemExit(f"not ready after {READY_TIMEOUT_S:.0f} s:\n{self.logs()[-4000:]}")

    def stop(self, grace_s: int) -> tuple[int, float]:
        t0 = time.monotonic()
        _docker("stop", "--time", str(grace_s), self.id, timeout=grace_s + 30)
        took = time.monotonic() - t0
        return int(_docker("inspect", "-f", "{{.State.ExitCode}}", self.id)), took

    def remove(self) -> None:
        _docker("rm", "-f", self.id, check=False)


def run_once(
    image: str, label: str, frames: int, volumes: list[str], env_over: dict[str, str], work: Path
) -> dict[str, Any]:
    """One container from start to SIGTERM; returns what was measured. Exits on a failed check."""
    spec = pod_spec()
    run = f"image-test-{label}-{secrets.token_hex(3)}"
    env = dict(spec["env"])
    env.update({k: os.environ[k] for k in STACK_VARS if k in os.environ})
    env.update(
        INFERENCE_TASKS_TOPIC=f"{run}-tasks",
        INFERENCE_RESULTS_TOPIC=f"{run}-results",
        INFERENCE_DLQ_TOPIC=f"{run}-tasks.dlq",
        INFERENCE_GROUP_ID=f"{run}-group",
        INFERENCE_HTTP_PORT=str(_free_port()),
    )
    env.update(env_over)
    host_env = {**os.environ, **{k: v for k, v in env.items() if k.startswith("INFERENCE_")}}
    create_topics(env)
    t0 = time.monotonic()
    container = Container(image, spec, env, volumes, work / f"{label}.env")
    try:
        container.wait_ready()
        ready_s = time.monotonic() - t0
        _step(f"{label}: ready", t0)
        video = f"{run}-video"
        render_frames(work / label, frames, seed=20261202)
        submitted = _cli(host_env, "submit", str(work / label), "--video-id", video)
        if submitted.returncode != 0:
            raise SystemExit(f"submit failed:\n{submitted.stderr[-3000:]}")
        out = work / f"{label}-results.json"
        collected = _cli(
            host_env, "collect", "--video-id", video, "--expect", str(frames),
            "--out", str(out), "--timeout", "180",
        )  # fmt: skip
        if collected.returncode != 0:
            raise SystemExit(
                f"collect: incomplete (exit {collected.returncode}):\n{collected.stderr[-3000:]}\n"
                f"container log:\n{container.logs()[-4000:]}"
            )
        document = json.loads(out.read_text())
        results = document["frames"]
        errors = [r for r in results if r.get("status") != "ok"]
        if len(results) != frames or errors:
            raise SystemExit(f"{len(results)} results for {frames} frames, errors: {errors[:3]}")
        detections = sum(len(r["detections"]) for r in results)
        runtime = results[0]["model"]["runtime"]
        _step(f"{label}: {frames}/{frames} frames done, {detections} detections, {runtime}", t0)
        status, metrics = container.get("/metrics")
        counted = [
            line for line in metrics.splitlines()
            if line.startswith('inference_results_total{status="ok"}')
        ]  # fmt: skip
        if status != 200 or not counted or float(counted[0].split()[-1]) < frames:
            raise SystemExit(f"/metrics: {status}, {counted or 'no inference_results_total'}")
        _step(f"{label}: /metrics {counted[0]}", t0)
        code, stop_s = container.stop(spec["grace_s"])
        logs = container.logs()
        if code != 0 or stop_s >= spec["grace_s"]:
            raise SystemExit(f"SIGTERM: exit {code} after {stop_s:.1f} s:\n{logs[-4000:]}")
        if "Traceback" in logs:
            raise SystemExit(f"a traceback in the container's log:\n{logs[-4000:]}")
        _step(f"{label}: SIGTERM → exit 0 in {stop_s:.1f} s (grace {spec['grace_s']} s)", t0)
        return {
            "label": label,
            "ready_s": round(ready_s, 1),
            "frames": frames,
            "detections": detections,
            "runtime": runtime,
            "stop_s": round(stop_s, 1),
            "log_warnings": [line for line in logs.splitlines() if "WARNING" in line][:5],
        }
    finally:
        container.remove()
        delete_topics(env)


def copy_model_directory(image: str, folder: Path) -> Path:
    """The image's own model directory (``inference-service export``'s output), copied out to
    ``folder``: what a user mounts to run another model without rebuilding."""
    source = pod_spec()["env"]["INFERENCE_MODEL"]
    name = _docker("create", image)
    try:
        _docker("cp", f"{name}:{source}", str(folder))
    finally:
        _docker("rm", name, check=False)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--image", default="inference-service:0.1.0")
    parser.add_argument("--frames", type=int, default=48, help="frames of the submitted video")
    parser.add_argument("--no-mounted", action="store_true", help="skip the mounted-model run")
    args = parser.parse_args(argv)
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0
    ):
        print("image-test: no Docker engine answers (docker info failed)", file=sys.stderr)
        return 2
    if (
        subprocess.run(
            ["docker", "image", "inspect", args.image], capture_output=True, check=False
        ).returncode
        != 0
    ):
        print(f"image-test: no image {args.image}: run `make image` first", file=sys.stderr)
        return 2
    missing = [k for k in STACK_VARS[:2] if k not in os.environ]
    if missing:
        print(f"image-test: {missing} unset: run under `scripts/stack run --`", file=sys.stderr)
        return 2
    measured = []
    with tempfile.TemporaryDirectory(prefix="image-test-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        measured.append(run_once(args.image, "built-in", args.frames, [], {}, work))
        if not args.no_mounted:
            model = copy_model_directory(args.image, work / "mounted-model")
            measured.append(
                run_once(
                    args.image,
                    "mounted-model-directory",
                    args.frames // 2,
                    [f"{model}:/models/mounted:ro"],
                    {"INFERENCE_MODEL": "/models/mounted"},
                    work,
                )
            )
    print(json.dumps(measured, indent=2))
    print("image-test: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
