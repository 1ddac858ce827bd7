"""Static checks of deploy/ (no Docker engine or cluster here): the facts operators rely on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from inference_service.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SETTINGS_VARS = {env_name(name) for name in Settings.model_fields}
AWS_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION"}
PORT = Settings.model_fields["http_port"].default


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s(kind: str) -> dict[str, Any]:
    found = [d for p in sorted(K8S.glob("*.yaml")) for d in load_all(p) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {K8S}, found {len(found)}"
    return found[0]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for word, rest in instructions:
        if word == "FROM":
            out.append([])
        if out:
            out[-1].append((word, rest))
    return out


def test_dockerfile_is_multi_stage_and_runs_as_non_root() -> None:
    instructions = dockerfile_instructions()
    all_stages = stages(instructions)
    assert len(all_stages) >= 2
    runtime = all_stages[-1]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users, "the runtime stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    assert args.get(user.strip("${}"), user) not in ("root", "0")
    assert ("EXPOSE", str(PORT)) in runtime
    assert any(w == "ENTRYPOINT" and "inference-service" in r for w, r in runtime)


def test_runtime_image_has_no_torch_and_ships_the_converted_model() -> None:
    runtime = stages(dockerfile_instructions())[-1]
    text = " ".join(rest for _word, rest in runtime)
    assert "[export]" not in text and "torch" not in text and "ultralytics" not in text
    copies = [rest for word, rest in runtime if word == "COPY"]
    assert any("/opt/model-cache" in c for c in copies), copies
    assert any("/models/best.pt" in c for c in copies), copies
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert "INFERENCE_MODEL=/models/best.pt" in env
    assert "INFERENCE_CACHE_DIR=/opt/model-cache" in env
    # The conversion happens in an earlier stage that installs the export extra.
    earlier = " ".join(
        rest for stage in stages(dockerfile_instructions())[:-1] for _w, rest in stage
    )
    assert "[export]" in earlier and "resolve_model" in earlier


def test_compose_runs_kafka_kraft_seaweedfs_and_the_service() -> None:
    (compose,) = load_all(DEPLOY / "compose.yaml")
    services = compose["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert not any("zookeeper" in str(s.get("image", "")) for s in services.values())
    assert "seaweedfs" in services["s3"]["image"]
    svc = services["inference"]
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / svc["build"]["context"]).resolve() == ROOT  # relative to the compose file
    assert (ROOT / svc["build"]["dockerfile"]).is_file()
    env = svc["environment"]
    unknown = set(env) - SETTINGS_VARS - AWS_VARS
    assert not unknown, f"not settings: {unknown}"
    assert env["INFERENCE_KAFKA_BOOTSTRAP_SERVERS"].startswith("kafka:")
    assert env["INFERENCE_S3_ENDPOINT_URL"].startswith("http://s3:")
    assert any(str(p).endswith(f":{PORT}") for p in svc["ports"])
    init = services["kafka-init"]["command"][0]
    for topic in ("inference_tasks", "inference_results", "inference_tasks.dlq"):
        assert topic in init


def test_deployment_probes_port_resources_and_env() -> None:
    dep = k8s("Deployment")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", PORT)
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (
        pod["terminationGracePeriodSeconds"] > Settings.model_fields["shutdown_timeout_s"].default
    )
    names = {e["name"] for e in container.get("env", [])}
    assert names <= SETTINGS_VARS, names - SETTINGS_VARS
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_configmap_names_only_settings() -> None:
    data = k8s("ConfigMap")["data"]
    assert set(data) <= SETTINGS_VARS, set(data) - SETTINGS_VARS
    assert data["INFERENCE_GROUP_ID"] == Settings.model_fields["group_id"].default
    assert data["INFERENCE_HTTP_PORT"] == str(PORT)


def test_metrics_service_selects_the_pods() -> None:
    svc = k8s("Service")
    dep = k8s("Deployment")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == PORT and port["targetPort"] in ("http", PORT)
    assert svc["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_keda_scales_on_the_lag_of_the_service_group() -> None:
    so = k8s("ScaledObject")
    assert so["apiVersion"].startswith("keda.sh/")
    assert so["spec"]["scaleTargetRef"]["name"] == k8s("Deployment")["metadata"]["name"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == Settings.model_fields["group_id"].default == "inference-group"
    assert meta["topic"] == Settings.model_fields["tasks_topic"].default == "inference_tasks"
    assert int(meta["lagThreshold"]) > 0
    assert meta["bootstrapServers"] == k8s("ConfigMap")["data"]["INFERENCE_KAFKA_BOOTSTRAP_SERVERS"]
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs and all("apiVersion" in d and "kind" in d for d in docs)
