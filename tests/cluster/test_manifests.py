"""Cloud and KubeRay manifests: parse, and hold the invariants a deploy relies on."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
K8S = sorted((CLUSTER / "k8s").glob("*.yaml"))
ALL = LAUNCHER + K8S
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"(?i)aws_secret_access_key\s*[:=]"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)\b(password|secret_key|secretKey)\s*:"),
]


def ray_minor() -> str:
    """'2.60' from the `ray[...]>=2.60,<2.61` range in pyproject.toml (the lock pins the patch)."""
    (pin,) = [d for d in PYPROJECT["dependencies"] if d.startswith("ray[")]
    return re.search(r"(?:==|>=)\s*(\d+\.\d+)", pin).group(1)


def python_tag() -> str:
    """'py311' from `requires-python = ">=3.11,<3.12"`."""
    major, minor = re.search(r">=\s*(\d+)\.(\d+)", PYPROJECT["requires-python"]).groups()
    return f"py{major}{minor}"


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments): continuation lines joined, comment lines dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, args = current.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def base_image() -> str:
    """The Dockerfile's FROM image, with ARG defaults declared before it substituted."""
    args, froms = {}, []
    for keyword, rest in dockerfile():
        if keyword == "ARG" and not froms:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip("\"'")
        elif keyword == "FROM":
            froms.append([w for w in rest.split() if not w.startswith("--")][0])
    assert len(froms) == 1, f"Dockerfile: expected one FROM (Ray's image), got {froms}"
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], froms[0])


def base_ray_version() -> str:
    """'2.60.0' from FROM rayproject/ray:2.60.0-py311-gpu."""
    return base_image().split(":", 1)[1].split("-")[0]


def shell_commands(run: str) -> list[list[str]]:
    """A RUN line's commands (split at &&, ||, ; and |, outside quotes), each as shell words."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    commands = [[]]
    for word in lexer:
        if word in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


IMAGE_KEYS = ("image", "head_image", "worker_image")


def images(node) -> list[str]:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in IMAGE_KEYS and isinstance(v, str):
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


def project_image_name() -> str:
    """'tans-on-ray': the repository of the Makefile's `IMAGE ?= tans-on-ray:$(TANS_VERSION)`."""
    (image,) = re.findall(r"^IMAGE \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    return image.rsplit(":", 1)[0]


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_parses_runs_the_project_image_and_holds_no_secrets(path):
    doc = yaml.safe_load(path.read_text())
    found = images(doc)
    assert found, f"{path.name}: no image"
    for image in found:
        name, _, tag = image.rpartition(":")
        assert not image.startswith("rayproject/"), f"{path.name}: {image} lacks the project; use the project image"
        assert name.rsplit("/", 1)[-1] == project_image_name(), image
        assert tag == PYPROJECT["version"], f"{path.name}: {image}: tag it with pyproject.toml's version"
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"{path.name}: looks like a secret ({pattern.pattern})"


def test_every_manifest_names_the_same_project_image():
    everywhere = {image for path in ALL for image in images(yaml.safe_load(path.read_text()))}
    assert len(everywhere) == 1, f"one project image name in every manifest, got {sorted(everywhere)}"


def test_dockerfile_builds_from_the_pinned_ray_image():
    image = base_image()
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_minor())}\.\d+-{python_tag()}-gpu", image), image
    assert "ENTRYPOINT" not in [k for k, _ in dockerfile()]  # Ray's own entrypoint stays
    assert any(re.search(r"\bRAY_USAGE_STATS_ENABLED=0\b", rest) for k, rest in dockerfile() if k == "ENV")
    text = DOCKERFILE.read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"Dockerfile: looks like a secret ({pattern.pattern})"
    for keyword, rest in dockerfile():
        if keyword in ("ARG", "ENV"):
            assert not re.search(r"(?i)token|secret|password|access_key", rest), f"{keyword} {rest}: no credentials"


def test_dockerfile_installs_the_project_and_the_corpus_packages():
    steps = dockerfile()
    copies = [shlex.split(rest) for k, rest in steps if k == "COPY"]
    sources = [w for words in copies for w in [w for w in words if not w.startswith("--")][:-1]]
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    deb_lists = [s for s in sources if s.endswith("debian_packages.txt")]
    assert deb_lists and "requirements.lock" in sources and "." in sources
    assert f"DEB_LIST := {deb_lists[0]}" in (REPO / "Makefile").read_text()  # the list `make setup` installs

    runs = [(i, shell_commands(rest)) for i, (k, rest) in enumerate(steps) if k == "RUN"]
    commands = [(i, c) for i, cmds in runs for c in cmds]
    pip = [(i, c) for i, c in commands if c[:2] == ["pip", "install"] or c[1:4] == ["-m", "pip", "install"]]
    project = [i for i, c in pip if "." in c and "-e" not in c and "--editable" not in c]
    assert project, "Dockerfile: no `pip install .` of the project"
    # the lock, exactly as `make setup` installs it; it holds the corpus-only packages too
    assert any("--no-deps" in c and any(w.endswith("requirements.lock") for w in c) for _, c in pip)
    assert "LOCK ?= requirements.lock" in (REPO / "Makefile").read_text()
    lock = (REPO / "requirements.lock").read_text().splitlines()
    locked = {line.split("==")[0].lower().replace("_", "-") for line in lock if "==" in line}
    corpus = (REPO / "tans/data/builtin/python_requirements.txt").read_text().splitlines()
    for name in [line.split("==")[0].strip().lower() for line in corpus if "==" in line and not line.startswith("#")]:
        assert name in locked, f"requirements.lock lacks the corpus package {name}"
    apt = [i for i, c in commands if "apt-get" in c and "install" in c]
    assert apt and any(Path(deb_lists[0]).name in " ".join(steps[i][1].split()) for i in apt)

    users = [(i, rest) for i, (k, rest) in enumerate(steps) if k == "USER"]
    assert all([u for j, u in users if j < i][-1:] == ["root"] for i in apt), "apt-get runs as root"
    assert users and users[-1][1] == "ray" and all(users[-1][0] < i for i in project), "pip runs as Ray's `ray` user"

    workdir = [rest for k, rest in steps if k == "WORKDIR"][-1]
    assert any(c[-2:] == [".", workdir] or c[-2:] == [".", "."] for c in copies), "the repository is the WORKDIR"


def test_dockerignore_keeps_the_context_small():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "outputs", "build", "dist"} <= patterns
    assert {"**/__pycache__", "**/*.egg-info"} <= patterns


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
    # The image holds every dependency: a setup command may only point the package at the rsynced copy.
    setup = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands") for c in doc.get(key) or []]
    for command in setup:
        if "pip install" in command:
            assert "--no-deps" in command and " -r " not in command, f"{path.name}: {command}"
    workdir = [rest for k, rest in dockerfile() if k == "WORKDIR"][-1]
    assert list(doc["file_mounts"]) == [workdir], "the rsynced copy replaces the image's copy, at its WORKDIR"
    assert all(workdir in c for c in setup if "pip install" in c)
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
    assert spec["rayVersion"] == base_ray_version(), "rayVersion is the Ray of the project image (Dockerfile FROM)"
    assert spec.get("enableInTreeAutoscaling") is True
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") not in ("LoadBalancer", "NodePort")
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups and all(g["minReplicas"] == 0 and g["maxReplicas"] > 0 for g in gpu_groups)


def test_rayjob_runs_the_zoo_build_with_the_image_dependencies():
    doc = yaml.safe_load((CLUSTER / "k8s" / "rayjob.yaml").read_text())
    entrypoint = doc["spec"]["entrypoint"].split()
    assert entrypoint[:4] == ["python", "-m", "jobs.build_zoo", "--config"]
    assert entrypoint[4].startswith("configs/zoo/") and (REPO / entrypoint[4]).is_file()
    # The pinned torch/torchvision/ofa live in requirements.lock and so in the image: no copied list here.
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert not {"pip", "uv", "conda"} & set(runtime_env), "dependencies come from the project image"


def test_submit_runtime_env_excludes_the_heavy_paths():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    for path in (".venv/", ".git/", "outputs/"):
        assert path in env["excludes"]
    readme = (CLUSTER / "README.md").read_text()
    assert "RAY_AUTH_MODE=token" in readme and "--runtime-env cluster/runtime_env.yaml" in readme
    assert "make image IMAGE=" in readme and "docker push" in readme


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
    assert spec["rayVersion"].startswith(ray_minor() + ".") and spec["rayVersion"] == base_ray_version()
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


def test_serve_latency_switches_are_set_wherever_serve_runs():
    """SERVE_LATENCY_ENV, the one definition, in the app's runtime_env (replicas), the image's ENV
    (every process of a launcher or KubeRay node, proxies included) and the RayService pods' env."""
    from serve.args import SERVE_LATENCY_ENV

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    (app,) = config["applications"]
    assert app["runtime_env"]["env_vars"] == SERVE_LATENCY_ENV
    image_env = dict(
        pair.split("=", 1) for keyword, args in dockerfile() if keyword == "ENV" for pair in shlex.split(args)
    )
    assert {k: image_env.get(k) for k in SERVE_LATENCY_ENV} == SERVE_LATENCY_ENV
    pods = _env_entries(yaml.safe_load(RAYSERVICE.read_text()))
    for name, value in SERVE_LATENCY_ENV.items():
        assert {e.get("value") for e in pods if e["name"] == name} == {value}, name
