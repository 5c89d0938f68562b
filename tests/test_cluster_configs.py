"""What can be checked of the cluster configs without a cloud: they parse, carry the required
fields, keep token authentication on, pin what pyproject.toml pins, and name entrypoints and
options that exist."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib

import yaml

from digit_models import RUNTIME_ENV_VARS
from digit_models.cli import build_parser
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEPENDENCIES = set(PYPROJECT["project"]["dependencies"])
GPU_TENSORFLOW = PYPROJECT["project"]["optional-dependencies"]["gpu"][0]
RAY_PIN = re.search(r"ray\[[^]]*\]>=([0-9.]+)", " ".join(DEPENDENCIES)).group(1)  # "2.60"


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _as_gpu(dependencies: set[str]) -> set[str]:
    return {GPU_TENSORFLOW if d.startswith("tensorflow>") else d for d in dependencies}


def test_every_config_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.name for f in files} >= {"runtime_env.yaml", "aws-gpu.yaml", "raycluster.yaml", "rayjob.yaml"}
    for path in files:
        assert yaml.safe_load(path.read_text()), path
    assert subprocess.run(["bash", "-n", str(CLUSTER / "local_cluster.sh")]).returncode == 0


def test_runtime_env_pins_and_environment_match_the_project():
    env = _load("runtime_env.yaml")
    assert set(env["pip"]["packages"]) == DEPENDENCIES
    assert env["env_vars"] == RUNTIME_ENV_VARS
    assert env["working_dir"] == "."
    assert {".venv/", "data/", "runs/", ".git/"} <= set(env["excludes"])


def test_autoscaler_config_for_a_gpu_cluster():
    config = _load("aws-gpu.yaml")
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    workers = config["available_node_types"]["gpu_workers"]
    assert workers["node_config"]["InstanceType"].startswith(("g4dn", "g5", "g6", "p3", "p4", "p5"))
    assert workers["max_workers"] >= 1
    assert config["docker"]["image"] == f"rayproject/ray:{RAY_PIN}.0-py311-gpu"
    installed = set(shlex.split(config["setup_commands"][0])[3:])  # after `pip install --quiet`
    assert installed == _as_gpu(DEPENDENCIES)
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_kuberay_cluster_has_token_auth_and_a_gpu_group():
    cluster = _load("kuberay/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == f"{RAY_PIN}.0"
    assert spec["authOptions"]["mode"] == "token"
    images = [c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    gpu_group = spec["workerGroupSpecs"][0]
    container = gpu_group["template"]["spec"]["containers"][0]
    images.append(container["image"])
    assert all(image.startswith(f"rayproject/ray:{RAY_PIN}.0-py311") for image in images)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_kuberay_job_runs_training_then_scoring_with_valid_options():
    job = _load("kuberay/rayjob.yaml")
    cluster = _load("kuberay/raycluster.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    commands = [shlex.split(part) for part in job["spec"]["entrypoint"].split("&&")]
    assert [command[2] for command in commands] == ["train", "predict"]
    for command in commands:
        assert command[:2] == ["python", "jobs/digits_job.py"]
        assert (REPO / command[1]).is_file()
        build_parser().parse_args(command[2:])  # every option exists (exits on a bad one)
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(runtime_env["pip"]["packages"]) == _as_gpu(DEPENDENCIES)
    assert runtime_env["env_vars"] == RUNTIME_ENV_VARS


def test_readme_cluster_commands_use_the_runtime_env_and_token():
    readme = (REPO / "README.md").read_text().replace("\\\n", " ")  # join continued lines
    section = readme.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    submits = [line for line in section.splitlines() if line.startswith("ray job submit")]
    assert submits and all("--runtime-env cluster/runtime_env.yaml" in line for line in submits)
    assert "RAY_AUTH_MODE=token" in section and "cluster/local_cluster.sh start" in section
