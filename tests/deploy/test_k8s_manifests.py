"""The Kubernetes manifests in deploy/k8s: the relations between them that a typo would break.

Each resource is checked against the others and against the daemon's own defaults
(`detector.config.Settings`), so that a renamed port, group or volume fails here rather than in a
cluster. `kubectl kustomize` renders the overlays too when it is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from detector.config import Settings, load_settings

yaml = pytest.importorskip("yaml", reason="PyYAML (a test-only dependency) is not installed")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = {name: K8S / "overlays" / name for name in ("cpu", "gpu")}
#: The uid the detector image runs as (its last USER): pods must use the same for the volumes.
SERVICE_UID = int(
    re.findall(r"^USER (\d+):", (K8S.parents[1] / "Dockerfile").read_text(), re.M)[-1]
)
GPU = "nvidia.com/gpu"

Resource = dict[str, Any]


def load_documents(path: Path) -> list[Resource]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def kustomization(folder: Path) -> Resource:
    (document,) = load_documents(folder / "kustomization.yaml")
    return document


def resource_list(folder: Path) -> list[Resource]:
    """The resources a kustomization gathers, bases included: what `kustomize build` starts from."""
    documents = []
    for entry in kustomization(folder)["resources"]:
        path = folder / entry
        documents += resource_list(path) if path.is_dir() else load_documents(path)
    return documents


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], Resource]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in resource_list(BASE)}


def one(resources: dict[tuple[str, str], Resource], kind: str) -> Resource:
    (resource,) = [doc for (doc_kind, _), doc in resources.items() if doc_kind == kind]
    return resource


def pod_spec(workload: Resource) -> Resource:
    spec = workload["spec"]
    template = (
        spec["jobTemplate"]["spec"]["template"] if "jobTemplate" in spec else spec["template"]
    )
    return template["spec"]


def container(workload: Resource) -> Resource:
    (only,) = pod_spec(workload)["containers"]
    return only


def mounts_by_claim(workload: Resource) -> dict[str, Resource]:
    """Each mounted PersistentVolumeClaim's name → its volumeMount."""
    claims = {
        volume["name"]: volume["persistentVolumeClaim"]["claimName"]
        for volume in pod_spec(workload)["volumes"]
        if "persistentVolumeClaim" in volume
    }
    return {
        claims[m["name"]]: m for m in container(workload)["volumeMounts"] if m["name"] in claims
    }


def is_subset(labels: dict[str, str], of: dict[str, str]) -> bool:
    return labels.items() <= of.items()


@pytest.fixture(scope="module")
def settings_env(base: dict[tuple[str, str], Resource]) -> dict[str, str]:
    """The detector's environment: the ConfigMap and the Secret it takes with envFrom."""
    deployment = base["Deployment", "seqsentinel-detector"]
    environ: dict[str, str] = {}
    for source in container(deployment)["envFrom"]:
        if "configMapRef" in source:
            environ |= base["ConfigMap", source["configMapRef"]["name"]]["data"]
        else:
            environ |= base["Secret", source["secretRef"]["name"]]["stringData"]
    return environ


def test_every_manifest_parses_into_typed_resources() -> None:
    paths = sorted(K8S.rglob("*.yaml"))

    assert len(paths) >= 12
    for path in paths:
        for document in load_documents(path):
            assert {"apiVersion", "kind"} <= document.keys(), path


def test_kustomizations_list_existing_files_and_overlays_build_on_base() -> None:
    for folder in [BASE, *OVERLAYS.values()]:
        spec = kustomization(folder)
        entries = spec["resources"] + [patch["path"] for patch in spec.get("patches", [])]
        for entry in entries:
            assert (folder / entry).exists(), f"{folder.name}: {entry}"
    for folder in OVERLAYS.values():
        assert [(folder / r).resolve() for r in kustomization(folder)["resources"]] == [BASE]
    listed = {BASE / entry for entry in kustomization(BASE)["resources"]}
    assert listed == set(BASE.glob("*.yaml")) - {BASE / "kustomization.yaml"}


def test_probes_and_ports_match_the_daemon_defaults(
    base: dict[tuple[str, str], Resource], settings_env: dict[str, str]
) -> None:
    detector = container(base["Deployment", "seqsentinel-detector"])
    service = base["Service", "seqsentinel-detector"]
    port = Settings().http.port

    assert int(settings_env["SEQSENTINEL_HTTP__PORT"]) == port
    assert detector["ports"] == [{"name": "http", "containerPort": port}]
    probes = {name: detector[name]["httpGet"] for name in ("livenessProbe", "readinessProbe")}
    assert probes == {
        "livenessProbe": {"path": "/healthz", "port": "http"},
        "readinessProbe": {"path": "/readyz", "port": "http"},
    }
    assert detector["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert service["spec"]["ports"] == [{"name": "http", "port": port, "targetPort": "http"}]


def test_grace_period_outlasts_the_shutdown_budget(
    base: dict[tuple[str, str], Resource], settings_env: dict[str, str]
) -> None:
    grace = pod_spec(base["Deployment", "seqsentinel-detector"])["terminationGracePeriodSeconds"]
    budget = float(settings_env["SEQSENTINEL_PROCESSING__SHUTDOWN_TIMEOUT_S"])

    assert grace == 35
    assert grace > budget
    assert grace > Settings().processing.shutdown_timeout_s


@pytest.mark.parametrize(
    ("kind", "name"), [("Deployment", "seqsentinel-detector"), ("CronJob", "seqsentinel-retrain")]
)
def test_pods_are_locked_down(base: dict[tuple[str, str], Resource], kind: str, name: str) -> None:
    workload = base[kind, name]
    pod = pod_spec(workload)
    main = container(workload)
    tmp = [m["name"] for m in main["volumeMounts"] if m["mountPath"] == "/tmp"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == SERVICE_UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"requests", "limits"} <= main["resources"].keys()
    assert [volume["emptyDir"] for volume in pod["volumes"] if volume["name"] in tmp]


def test_retrain_job_writes_the_model_the_detectors_read(
    base: dict[tuple[str, str], Resource], settings_env: dict[str, str]
) -> None:
    deployment = base["Deployment", "seqsentinel-detector"]
    cronjob = base["CronJob", "seqsentinel-retrain"]
    claim = "seqsentinel-models"
    detector_mount, retrain_mount = (
        mounts_by_claim(deployment)[claim],
        mounts_by_claim(cronjob)[claim],
    )
    model = Path(settings_env["SEQSENTINEL_MODEL__PATH"])
    config_maps = [s["configMapRef"]["name"] for s in container(cronjob)["envFrom"]]

    assert detector_mount["mountPath"] == retrain_mount["mountPath"] == "/models"
    assert model.parent == Path(detector_mount["mountPath"])
    assert detector_mount.get("readOnly") is True
    assert retrain_mount.get("readOnly", False) is False
    assert base["PersistentVolumeClaim", claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert config_maps == ["seqsentinel-detector"]  # where SEQSENTINEL_MODEL__PATH comes from
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert re.fullmatch(r"\S+ \S+ \* \* \d", cronjob["spec"]["schedule"])  # weekly


@pytest.mark.parametrize(("status", "job_status"), [(0, 0), (3, 0), (1, 1), (2, 2)])
def test_retrain_job_counts_a_kept_champion_as_success(
    base: dict[tuple[str, str], Resource], tmp_path: Path, status: int, job_status: int
) -> None:
    """The Job's shell wrapper, run with `trainer` standing in as a script that records its argv."""
    retrain = container(base["CronJob", "seqsentinel-retrain"])
    trainer = tmp_path / "trainer"
    trainer.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/argv"\nexit {status}\n')
    trainer.chmod(trainer.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SEQSENTINEL_MODEL__PATH": "/models/m.onnx"}

    result = subprocess.run([*retrain["command"], *retrain["args"]], env=env, check=False)
    argv = (tmp_path / "argv").read_text().split()

    assert result.returncode == job_status
    assert argv[0] == "retrain"
    assert argv[argv.index("--champion") + 1] == "/models/m.onnx"
    assert argv[argv.index("--promote-to") + 1] == "/models/m.onnx"


def test_configmap_and_secret_hold_real_settings(
    settings_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in settings_env.items():
        # A top-level typo would be ignored silently; nested unknown keys fail load_settings.
        section = re.fullmatch(r"SEQSENTINEL_([A-Z]+)__[A-Z_]+", name)
        assert section and section[1].lower() in Settings.model_fields, name
        monkeypatch.setenv(name, value)

    settings = load_settings()

    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.kafka.sasl_password is not None
    assert settings.http.port == Settings().http.port


def test_keda_scales_on_the_detector_group_and_input_topic(
    base: dict[tuple[str, str], Resource], settings_env: dict[str, str]
) -> None:
    scaled = one(base, "ScaledObject")["spec"]
    (trigger,) = scaled["triggers"]
    metadata = trigger["metadata"]
    auth = base["TriggerAuthentication", trigger["authenticationRef"]["name"]]["spec"]
    defaults = Settings()

    assert scaled["scaleTargetRef"]["name"] == "seqsentinel-detector"
    assert trigger["type"] == "kafka"
    group = settings_env.get("SEQSENTINEL_KAFKA__GROUP_ID", defaults.kafka.group_id)
    assert metadata["consumerGroup"] == group
    assert metadata["topic"] == settings_env.get("SEQSENTINEL_TOPICS__INPUT", defaults.topics.input)
    assert metadata["bootstrapServers"] == settings_env["SEQSENTINEL_KAFKA__BOOTSTRAP_SERVERS"]
    assert isinstance(scaled["maxReplicaCount"], int)
    assert scaled["maxReplicaCount"] >= scaled["minReplicaCount"] >= 1
    for ref in auth["secretTargetRef"]:
        assert ref["key"] in base["Secret", ref["name"]]["stringData"], ref


def test_selectors_find_what_they_should(base: dict[tuple[str, str], Resource]) -> None:
    deployment = base["Deployment", "seqsentinel-detector"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = base["Service", "seqsentinel-detector"]
    monitor = one(base, "ServiceMonitor")["spec"]
    budget = one(base, "PodDisruptionBudget")["spec"]

    assert is_subset(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert is_subset(service["spec"]["selector"], pod_labels)
    assert is_subset(budget["selector"]["matchLabels"], pod_labels)
    assert is_subset(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [endpoint["port"] for endpoint in monitor["endpoints"]] == ["http"]
    assert monitor["endpoints"][0]["path"] == "/metrics"


def patched_containers(overlay: Path) -> dict[str, tuple[Resource, Resource]]:
    """Each container an overlay patches, by name → (the container, its pod spec)."""
    patches = [load_documents(overlay / p["path"])[0] for p in kustomization(overlay)["patches"]]
    return {container(patch)["name"]: (container(patch), pod_spec(patch)) for patch in patches}


def test_gpu_overlay_requests_a_gpu_and_tolerates_gpu_nodes() -> None:
    patched = patched_containers(OVERLAYS["gpu"])
    tags = {image["name"]: image["newTag"] for image in kustomization(OVERLAYS["gpu"])["images"]}

    assert patched.keys() == {"detector", "retrain"}
    for main, pod in patched.values():
        assert main["resources"]["limits"][GPU] == 1
        assert [t["key"] for t in pod["tolerations"]] == [GPU]
    assert all(tag.endswith("-gpu") for tag in tags.values())
    assert tags.keys() == {"seqsentinel-detector", "seqsentinel-trainer"}
    assert GPU not in (OVERLAYS["cpu"] / "kustomization.yaml").read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_kubectl_kustomize_renders_the_overlay(overlay: str) -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS[overlay])], capture_output=True, text=True
    )
    assert rendered.returncode == 0, rendered.stderr
    resources = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered.stdout)}
    detector = container(resources["Deployment", "seqsentinel-detector"])
    limits = detector["resources"]["limits"]

    assert {d["metadata"].get("namespace") for d in resources.values()} == {"seqsentinel"}
    assert detector["image"].startswith("seqsentinel-detector:0.1.0")
    assert (GPU in limits, detector["image"].endswith("-gpu")) == (overlay == "gpu",) * 2
    assert {"cpu", "memory"} <= limits.keys()  # the GPU patch merges into the base's limits
