"""Cloud and KubeRay manifests: parse, and hold the invariants a deploy relies on."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
K8S = sorted((CLUSTER / "k8s").glob("*.yaml"))
ALL = LAUNCHER + K8S

SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"(?i)aws_secret_access_key\s*[:=]"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)\b(password|secret_key|secretKey)\s*:"),
]


def ray_minor() -> str:
    """'2.60' from the `ray[...]==2.60.*` pin in pyproject.toml."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("ray[")]
    return re.search(r"==(\d+\.\d+)", pin).group(1)


def images(node) -> list[str]:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "image" and isinstance(v, str):
                found.append(v)
            else:
                found += images(v)
    elif isinstance(node, list):
        for v in node:
            found += images(v)
    return found


def test_manifests_exist():
    assert all(p.is_file() for p in LAUNCHER)
    assert {p.name for p in K8S} >= {"raycluster.yaml", "rayjob.yaml"}


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_parses_and_pins_the_ray_version(path):
    doc = yaml.safe_load(path.read_text())
    ray_images = [i for i in images(doc) if i.startswith("rayproject/ray:")]
    assert ray_images, f"{path.name}: no rayproject/ray image"
    for image in ray_images:
        assert image.split(":", 1)[1].startswith(ray_minor() + "."), image
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"{path.name}: looks like a secret ({pattern.pattern})"


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_has_autoscaling_spot_gpu_workers_and_a_private_dashboard(path):
    doc = yaml.safe_load(path.read_text())
    nodes = doc["available_node_types"]
    head = nodes[doc["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    workers = [v for k, v in nodes.items() if k != doc["head_node_type"]]
    assert workers and all(w["min_workers"] == 0 and w["max_workers"] > 0 for w in workers)
    config = str(workers[0]["node_config"])
    assert ("spot" in config.lower()) or ("preemptible" in config.lower())
    assert ("InstanceType" in workers[0]["node_config"] and "g5" in config) or "guestAccelerators" in config
    assert any("pip install" in c and "tans" in c for c in doc["setup_commands"])
    head_cmds = " ".join(doc["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head_cmds and "--dashboard-host=127.0.0.1" in head_cmds
    assert ".venv" in doc["rsync_exclude"]


def _cluster_spec(doc):
    return {"RayJob": lambda: doc["spec"]["rayClusterSpec"], "RayService": lambda: doc["spec"]["rayClusterConfig"]}.get(
        doc["kind"], lambda: doc["spec"])()


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kuberay_versions_gpus_autoscaling_and_no_public_service(path):
    doc = yaml.safe_load(path.read_text())
    spec = _cluster_spec(doc)
    assert spec["rayVersion"].startswith(ray_minor() + ".")
    assert spec.get("enableInTreeAutoscaling") is True
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") not in ("LoadBalancer", "NodePort")
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups and all(g["minReplicas"] == 0 and g["maxReplicas"] > 0 for g in gpu_groups)


def test_rayjob_runs_the_zoo_build_with_the_pinned_torch():
    doc = yaml.safe_load((CLUSTER / "k8s" / "rayjob.yaml").read_text())
    assert doc["spec"]["entrypoint"].startswith("python -m jobs.build_zoo --config configs/zoo/")
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for pinned in ("torch==", "torchvision==", "ofa=="):
        (want,) = [d for d in deps if d.startswith(pinned)]
        assert want in runtime_env["pip"], want


def test_submit_runtime_env_excludes_the_heavy_paths():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    for path in (".venv/", ".git/", "outputs/"):
        assert path in env["excludes"]
    readme = (CLUSTER / "README.md").read_text()
    assert "RAY_AUTH_MODE=token" in readme and "--runtime-env cluster/runtime_env.yaml" in readme


RAYSERVICE = CLUSTER / "k8s" / "rayservice.yaml"


def test_rayservice_serve_config_is_serve_config_yaml():
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(RAYSERVICE.read_text())
    assert doc["kind"] == "RayService"
    config_text = (REPO / "serve" / "config.yaml").read_text()
    embedded = doc["spec"]["serveConfigV2"]
    assert yaml.safe_load(embedded) == yaml.safe_load(config_text)
    assert embedded.strip() == config_text.strip(), "paste serve/config.yaml into serveConfigV2 verbatim"
    ServeDeploySchema.model_validate(yaml.safe_load(embedded))
    assert "host" not in str(yaml.safe_load(embedded).get("http_options", {}))


def test_rayservice_versions_match_the_ray_pin_and_the_head_stays_private():
    doc = yaml.safe_load(RAYSERVICE.read_text())
    spec = doc["spec"]["rayClusterConfig"]
    assert spec["rayVersion"].startswith(ray_minor() + ".")
    tags = {i.split(":", 1)[1] for i in images(doc) if i.startswith("rayproject/ray:")}
    assert tags and all(t.split("-")[0] == spec["rayVersion"] for t in tags), tags
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert "dashboard-host" not in spec["headGroupSpec"].get("rayStartParams", {})  # KubeRay's default, in-cluster
    gpu = [g for g in spec["workerGroupSpecs"] if "gpu" in g["groupName"]]
    assert gpu and gpu[0]["minReplicas"] == 0 and gpu[0]["maxReplicas"] > 0


def _env_entries(node) -> list[dict]:
    if isinstance(node, dict):
        return list(node.get("env", [])) + [e for v in node.values() for e in _env_entries(v)]
    if isinstance(node, list):
        return [e for v in node for e in _env_entries(v)]
    return []


def test_rayservice_has_no_inline_secrets():
    doc = yaml.safe_load(RAYSERVICE.read_text())
    envs = _env_entries(doc)
    token = [e for e in envs if e["name"] == "TANS_SERVE_TOKEN"]
    assert token and all("value" not in e and "secretKeyRef" in e["valueFrom"] for e in token)
    for e in envs:
        if re.search(r"TOKEN|SECRET|PASSWORD|KEY", e["name"]):
            assert "value" not in e, f"{e['name']} is set inline; use a Secret (valueFrom.secretKeyRef)"
    text = RAYSERVICE.read_text()
    assert not re.search(r"(?i)authorization:\s*bearer\s+\S", text)
    assert all(m == "..." for m in re.findall(r"from-literal=token=([^\s`]*)", text))  # a placeholder, not a token
