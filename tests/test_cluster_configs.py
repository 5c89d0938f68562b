"""What can be checked of the cluster configs without a cloud: they parse, carry the required
fields, keep token authentication on, run Ray unprivileged and admit no one from outside the
cluster but its job clients, pin what pyproject.toml pins, name entrypoints and options that
exist, and give their spot workers an on-demand floor that the elastic training commands fit."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib

import yaml

from digit_models import RUNTIME_ENV_VARS
from digit_models.cli import _train_config, build_parser
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


# A training command line: `digits train ...` or the job entrypoint's `python jobs/digits_job.py
# train ...`, up to the end of the line, a `&&`, a closing backtick or a comment.
TRAIN_COMMAND = re.compile(r"(?:^|[\s`])(?:digits|python jobs/digits_job\.py) train(?=\s|$)([^&`#\n]*)")


def _strings(node):
    """Every string in a parsed YAML document (a RayJob's entrypoint, a node's commands)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _comments(text: str) -> str:
    """A YAML file's comments (whole-line and trailing), shell continuation lines joined."""
    lines = [line.split("#", 1)[1] for line in text.splitlines() if line.lstrip().startswith("#") or "  # " in line]
    return "\n".join(lines).replace("\\\n", " ")


def _train_commands(name: str) -> list[list[str]]:
    """The options of every training command line in a config, in its values and comments."""
    text = (CLUSTER / name).read_text()
    return [
        shlex.split(match.group(1))
        for where in [*_strings(yaml.safe_load(text)), _comments(text)]
        for match in TRAIN_COMMAND.finditer(where)
    ]


def _valid_train_config(options: list[str]):
    """What `digits train OPTIONS` would run with, checked as train() checks it (exits on an
    unknown option, raises DigitsError on a bad value)."""
    config = _train_config(build_parser().parse_args(["train", *options]))
    config.validate()
    return config


def _spot_node_type(node_type: dict) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def _capacity_type(group: dict) -> str:
    return group["template"]["spec"]["nodeSelector"]["karpenter.sh/capacity-type"]


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


def test_autoscaler_nodes_are_in_a_security_group_closed_to_the_internet():
    """Each node type names the same security group (one the user made: the autoscaler's own
    opens SSH to 0.0.0.0/0), and nothing in the file opens anything to every address."""
    config = _load("aws-gpu.yaml")
    groups = [node_type["node_config"]["SecurityGroupIds"] for node_type in config["available_node_types"].values()]
    assert groups[0] and all(group == groups[0] for group in groups)
    assert "security_group" not in config["provider"]  # no rules for the autoscaler to add
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    assert "0.0.0.0/0" not in text and "::/0" not in text


def test_autoscaler_config_has_an_on_demand_floor_and_spot_gpu_workers():
    config = _load("aws-gpu.yaml")
    types = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    spot = {name: t for name, t in types.items() if _spot_node_type(t)}
    on_demand = {name: t for name, t in types.items() if name not in spot}
    assert spot and on_demand
    for node_type in types.values():
        assert node_type["node_config"]["InstanceType"].startswith(("g4dn", "g5", "g6", "p3", "p4", "p5"))
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    # Spot nodes reach the bucket the run directory is in, as the on-demand ones do.
    assert len({str(t["node_config"]["IamInstanceProfile"]) for t in types.values()}) == 1
    floor = sum(t["max_workers"] for t in on_demand.values())
    most = sum(t["max_workers"] for t in types.values())
    assert floor >= 1 and sum(t["max_workers"] for t in spot.values()) >= 1
    assert config["max_workers"] == most  # the cluster's cap neither cuts a type short nor exceeds them

    commands = _train_commands("aws-gpu.yaml")
    assert commands
    for options in commands:
        run = _valid_train_config(options)
        assert run.out.startswith("s3://") and run.data.startswith("s3://")
        assert run.min_workers is not None, "a run on spot nodes should be elastic"
        assert run.fewest_workers < run.workers <= most
        assert run.fewest_workers <= floor  # what --min-workers needs is never reclaimed
        assert run.max_failures > 1  # a reclaim without notice counts as a failure here


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


def test_kuberay_cluster_has_an_on_demand_floor_and_a_spot_group():
    groups = _load("kuberay/raycluster.yaml")["spec"]["workerGroupSpecs"]
    assert len({group["groupName"] for group in groups}) == len(groups)
    by_capacity = {}
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == f"rayproject/ray:{RAY_PIN}.0-py311-gpu"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        by_capacity.setdefault(_capacity_type(group), []).append(group)
    assert set(by_capacity) == {"on-demand", "spot"}
    assert sum(group["minReplicas"] for group in by_capacity["on-demand"]) >= 1
    for group in by_capacity["spot"]:
        assert group["replicas"] >= 1
        pod = group["template"]["spec"]
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        drain = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
        # Longer than Ray's default 30 s, within EC2's two minutes, and Kubernetes must not
        # kill the pod before the deadline Ray announces on SIGTERM.
        assert 30 < drain < pod["terminationGracePeriodSeconds"] <= 120


def _pod_specs(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    return [
        spec["headGroupSpec"]["template"]["spec"],
        *(group["template"]["spec"] for group in spec["workerGroupSpecs"]),
    ]


def test_kuberay_pods_run_unprivileged():
    """The image's user has passwordless sudo: every container, the job's submitter's too, runs
    as a non-root uid, without privilege escalation (sudo) or capabilities."""
    submitter = _load("kuberay/rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"]
    for pod in [*_pod_specs(_load("kuberay/raycluster.yaml")), submitter]:
        context = pod["securityContext"]
        # The kubelet can check runAsNonRoot only against a numeric user; the image names `ray`.
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_kuberay_network_policy_admits_only_the_cluster_and_its_job_clients():
    cluster = _load("kuberay/raycluster.yaml")
    job = _load("kuberay/rayjob.yaml")
    policy = _load("kuberay/networkpolicy.yaml")
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    own_pods = {"matchLabels": {"ray.io/cluster": cluster["metadata"]["name"]}}
    assert policy["spec"]["podSelector"] == own_pods and policy["spec"]["policyTypes"] == ["Ingress"]
    head_ports = {
        port["name"]: port["containerPort"]
        for port in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    clients = []
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            assert "ipBlock" not in peer and peer["podSelector"]["matchLabels"]  # named pods only
            assert peer.get("namespaceSelector", {"matchLabels": "its own"})["matchLabels"]  # named namespaces
            if peer == {"podSelector": own_pods}:
                assert "ports" not in rule  # Ray's nodes talk to each other on many ports
            else:
                assert rule["ports"] == [{"port": head_ports["dashboard"], "protocol": "TCP"}]
                clients.append(peer["podSelector"]["matchLabels"])
    assert {"batch.kubernetes.io/job-name": job["metadata"]["name"]} in clients  # its submitter


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


def test_kuberay_job_trains_elastically_within_the_cluster():
    groups = _load("kuberay/raycluster.yaml")["spec"]["workerGroupSpecs"]
    floor = sum(g["minReplicas"] for g in groups if _capacity_type(g) == "on-demand")
    most = sum(g["replicas"] for g in groups)
    [options] = _train_commands("kuberay/rayjob.yaml")
    run = _valid_train_config(options)
    assert run.out.startswith("s3://")  # a new group on other nodes finds the checkpoints there
    assert run.gpus_per_worker == 1
    assert run.min_workers is not None and run.fewest_workers < run.workers <= most
    assert run.fewest_workers <= floor


def test_every_training_command_in_the_configs_is_valid():
    """Each `digits train` line anywhere under cluster/ parses with the real parser and passes
    TrainConfig's checks; the elastic ones (with --min-workers) have MIN < MAX."""
    seen = 0
    for path in sorted(CLUSTER.rglob("*.yaml")):
        for options in _train_commands(str(path.relative_to(CLUSTER))):
            run = _valid_train_config(options)
            assert run.min_workers is None or run.min_workers < run.workers, (path.name, options)
            seen += 1
    assert seen >= 2  # aws-gpu.yaml's example and rayjob.yaml's entrypoint


def test_readme_cluster_commands_use_the_runtime_env_and_token():
    readme = (REPO / "README.md").read_text().replace("\\\n", " ")  # join continued lines
    section = readme.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    submits = [line for line in section.splitlines() if line.startswith("ray job submit")]
    assert submits and all("--runtime-env cluster/runtime_env.yaml" in line for line in submits)
    assert "RAY_AUTH_MODE=token" in section and "cluster/local_cluster.sh start" in section
