"""Static checks of deploy/ (no Docker engine or cluster here): the facts operators rely on."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
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
    assert any("/models/model" in c for c in copies), copies
    assert not any("best.pt" in c for c in copies), "the runtime ships the model directory only"
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert "INFERENCE_MODEL=/models/model" in env
    assert "INFERENCE_CACHE_DIR=/opt/model-cache" in env
    # The conversion happens in an earlier stage that installs the export extra's lock, with
    # `inference-service export`; the serving venv then resolves the directory.
    earlier = " ".join(
        rest for stage in stages(dockerfile_instructions())[:-1] for _w, rest in stage
    )
    assert "requirements/export.txt" in earlier and "resolve_model" in earlier
    assert "inference-service export /models/best.pt --out /models/model" in earlier


def test_every_stage_installs_from_the_hashed_locks() -> None:
    for stage in stages(dockerfile_instructions())[:-1]:
        installs = [r for w, r in stage if w == "RUN" and "pip install" in r]
        assert installs
        for run in installs:
            for command in run.split("&&"):
                if "pip install" in command:
                    assert ("--require-hashes" in command) or ("--no-deps" in command), command


def dockerignore_admits(path: str) -> bool:
    """Whether .dockerignore sends ``path`` (the last matching rule wins)."""
    admitted = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        keep = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            admitted = keep
    return admitted


def test_dockerignore_sends_what_the_dockerfile_copies_and_any_checkpoint() -> None:
    for word, rest in dockerfile_instructions():
        if word != "COPY" or rest.startswith("--from") or "${" in rest:
            continue
        for source in rest.split()[:-1]:
            assert dockerignore_admits(
                source.rstrip("/") + ("/x.py" if source.endswith("/") else "")
            ), source
    default_model = [
        r for w, r in dockerfile_instructions() if w == "ARG" and r.startswith("MODEL=")
    ]
    assert default_model and dockerignore_admits(default_model[0].split("=", 1)[1])
    # --build-arg MODEL=<your checkpoint>, anywhere under models/ (the README says so).
    for model in ("models/mine/best.pt", "models/site-a/v2/best.pth"):
        assert dockerignore_admits(model), model
    heavy = (
        ".venv/lib/x.pt",
        ".wheelhouse/torch.whl",
        ".stack/kafka/log",
        ".git/HEAD",
        "bench/out/a.pt",
    )
    for path in heavy:
        assert not dockerignore_admits(path), path
    # The legacy builder walks into an excluded directory only for a `!` rule starting with its
    # path: every exception must name a top-level entry.
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines()]
    for rule in rules:
        if rule.startswith("!"):
            assert not rule.startswith("!*"), f"{rule}: the legacy builder never applies it"


def test_locks_satisfy_pyproject() -> None:
    """requirements/*.txt pin every requirement of pyproject.toml (else: `make lock`)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_lock.py")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r $(LOCK)" in makefile


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
    assert "MODEL" in svc["build"]["args"]
    assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    # The broker writes where its volume is mounted (the image's default is /tmp/kraft-combined-logs).
    data_dir = kafka["environment"]["KAFKA_LOG_DIRS"]
    assert any(v.split(":", 1)[1] == data_dir for v in kafka["volumes"]), kafka["volumes"]
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
    dep = k8s("Deployment")
    assert so["apiVersion"].startswith("keda.sh/")
    assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert so["spec"]["scaleTargetRef"]["envSourceContainerName"] == container["name"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    # Read from the container's environment (the ConfigMap), never repeated in the trigger.
    assert not {"bootstrapServers", "consumerGroup", "topic"} & set(meta)
    from_env = {
        "bootstrapServersFromEnv": "kafka_bootstrap_servers",
        "consumerGroupFromEnv": "group_id",
        "topicFromEnv": "tasks_topic",
    }
    data = k8s("ConfigMap")["data"]
    for key, setting in from_env.items():
        assert meta[key] == env_name(setting), key
        assert meta[key] in data, f"{meta[key]} is not in the ConfigMap the pods read"
    assert data["INFERENCE_GROUP_ID"] == Settings.model_fields["group_id"].default
    assert data["INFERENCE_TASKS_TOPIC"] == Settings.model_fields["tasks_topic"].default
    assert int(meta["lagThreshold"]) > 0
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    # SASL for the scaler, matching the default PLAINTEXT of the ConfigMap.
    assert trigger["authenticationRef"]["name"] == k8s("TriggerAuthentication")["metadata"]["name"]
    assert data["INFERENCE_KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT"
    assert (meta["sasl"], meta["tls"]) == ("none", "disable")


def test_keda_trigger_authentication_reads_the_service_credentials() -> None:
    auth = k8s("TriggerAuthentication")
    (container,) = k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    params = {e["parameter"]: e for e in auth["spec"]["env"]}
    assert set(params) == {"username", "password"}
    assert params["username"]["name"] == env_name("kafka_sasl_username")
    assert params["password"]["name"] == env_name("kafka_sasl_password")
    assert {e["containerName"] for e in params.values()} == {container["name"]}
    secrets = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
    assert "inference-kafka-credentials" in secrets


def test_deployment_leaves_the_replica_count_to_keda_and_runs_as_its_account() -> None:
    dep = k8s("Deployment")
    assert "replicas" not in dep["spec"], "KEDA owns the count: a value resets it on every apply"
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == k8s("ServiceAccount")["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False


def test_read_only_root_has_writable_tmp_and_the_image_user() -> None:
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    assert mounts["/tmp"] in empty
    runtime = stages(dockerfile_instructions())[-1]
    uid = dict(r.split("=", 1) for w, r in runtime if w == "ARG" and "=" in r)["UID"]
    assert pod["securityContext"]["runAsUser"] == int(uid)
    env = {e["name"]: e["value"] for e in container["env"]}
    # The cache is empty in the image (the model directory is elsewhere); read-only is fine there
    # (tests/unit/test_read_only_cache.py), so it is not hidden under an emptyDir.
    assert env["INFERENCE_CACHE_DIR"] not in mounts
    assert any(
        f"INFERENCE_CACHE_DIR={env['INFERENCE_CACHE_DIR']}" in r for w, r in runtime if w == "ENV"
    )


def test_pod_disruption_budget_selects_the_pods() -> None:
    pdb = k8s("PodDisruptionBudget")
    labels = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_topics_job_creates_the_configmap_topics() -> None:
    job = k8s("Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert {"configMapRef": {"name": k8s("ConfigMap")["metadata"]["name"]}} in container["envFrom"]
    script = container["args"][0]
    for setting in ("tasks_topic", "results_topic", "dlq_topic", "kafka_bootstrap_servers"):
        assert f"${env_name(setting)}" in script, setting
    assert "--if-not-exists" in script
    assert container["image"].startswith("apache/kafka:")
    (compose,) = load_all(DEPLOY / "compose.yaml")
    assert container["image"] == compose["services"]["kafka"]["image"]


def test_kustomization_lists_every_manifest_and_sets_the_image() -> None:
    (kustomization,) = load_all(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    (image,) = kustomization["images"]
    (container,) = k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    assert image["name"] == container["image"]
    assert image["newTag"] != "latest"


# --- schemas: Kubernetes' own (kubernetes-validate) and KEDA's CRDs (vendored in tests/data) ---

KUBERNETES_VERSIONS = ("1.28", "1.37")
"""The oldest Kubernetes release still widely run, and the newest the package bundles."""
KEDA_CRDS = ROOT / "tests" / "data" / "keda"


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.name}:{d['kind']}", d)
        for p in sorted(K8S.glob("*.yaml"))
        if p.name != "kustomization.yaml"
        for d in load_all(p)
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "doc", [d for _n, d in _manifests() if not d["apiVersion"].startswith("keda.sh/")],
    ids=[n for n, d in _manifests() if not d["apiVersion"].startswith("keda.sh/")],
)  # fmt: skip
def test_manifest_is_valid_kubernetes(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    # strict: an unknown or misspelt field fails, as `kubectl apply --validate=strict` would.
    kubernetes_validate.validate(doc, version, strict=True)


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused (the API server would prune them silently)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    for path in sorted(KEDA_CRDS.glob("*.yaml")):
        (crd,) = load_all(path)
        if crd["spec"]["names"]["kind"] != kind:
            continue
        for version in crd["spec"]["versions"]:
            if f"{crd['spec']['group']}/{version['name']}" == api_version:
                assert version["served"], f"{api_version} {kind} is no longer served"
                schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
                return schema
    raise AssertionError(f"no CRD for {api_version} {kind} in {KEDA_CRDS}")


@pytest.mark.parametrize(
    "doc", [d for _n, d in _manifests() if d["apiVersion"].startswith("keda.sh/")],
    ids=[n for n, d in _manifests() if d["apiVersion"].startswith("keda.sh/")],
)  # fmt: skip
def test_keda_resource_matches_the_crd(doc: dict[str, Any]) -> None:
    import jsonschema

    schema = _strict(_crd_schema(doc["kind"], doc["apiVersion"]))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by the API server
    jsonschema.Draft7Validator(schema).validate(doc)


def test_keda_crd_check_refuses_a_misspelt_field() -> None:
    import jsonschema

    doc = k8s("ScaledObject")
    bad = {**doc, "spec": {**doc["spec"], "maxReplicas": 3}}
    schema = _strict(_crd_schema(doc["kind"], doc["apiVersion"]))
    schema["properties"]["metadata"] = {"type": "object"}
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        jsonschema.Draft7Validator(schema).validate(bad)


def test_kustomize_renders_the_manifests() -> None:
    """The kustomization as kubectl builds it (skipped where no kubectl is installed)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomization is checked statically above")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert {d["kind"] for d in docs} == {d["kind"] for _n, d in _manifests()}
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (image,) = load_all(K8S / "kustomization.yaml")[0]["images"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{image['newName']}:{image['newTag']}"


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs and all("apiVersion" in d and "kind" in d for d in docs)


def test_documented_commit_alert_matches_the_outcomes_the_code_counts() -> None:
    """The alert in docs/operations.md must fire on failures only, not on every commit."""
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "inference_service").rglob("*.py"))
    outcomes = set(re.findall(r'transactions\.labels\("([a-z_]+)"\)', source))
    assert "committed" in outcomes and len(outcomes) > 1, outcomes
    docs = (ROOT / "docs" / "operations.md").read_text()
    selectors = re.findall(r'inference_commits_total\{outcome(!=|=)"([a-z_]+)"\}', docs)
    assert selectors, "docs/operations.md gives no alert on inference_commits_total"
    for op, value in selectors:
        assert value in outcomes, f"outcome {value!r} is never counted (the code counts {outcomes})"
        assert (op, value) == ("!=", "committed"), "alert on every outcome but committed"
    for outcome in outcomes:
        assert f"`{outcome}`" in docs, f"outcome {outcome} is not documented"
