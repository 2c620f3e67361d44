"""A stand-in for Kubeflow Trainer v2: a TrainJob and its runtime become the node pods' specs, and
those pods run as local processes. No Kubernetes cluster or Trainer controller can run here; this
does what their source does with the fields Lumos uses (kubeflow/trainer, read 2026-12-02):

- `pkg/runtime/core/trainingruntime.go` (`newRuntimeInfo`, `mergeRuntimePatches`): the runtime's
  JobSet template, strategic-merge-patched with each `runtimePatches` entry (lists of named
  objects merged by name, volume mounts by mount path, other lists replaced);
  `trainer.resourcesPerNode` is merged into the `node` container's requests and limits.
- `pkg/runtime/framework/plugins/jobset/builder.go` (`Trainer`): `trainer.image`, `command` and
  `args` replace the `node` container's; `trainer.env` is upserted into its env.
- `pkg/runtime/framework/plugins/torch/torch.go` (`Validate`, `EnforceMLPolicy`): `trainer.env`
  may not set a PET_* name; the node count is `numNodes`; PET_NNODES, PET_NPROC_PER_NODE
  (`numProcPerNode`), PET_NODE_RANK (the Job completion index, i.e. the node's index),
  PET_MASTER_ADDR (`<job>-node-0-0.<job>`, node 0's pod behind the headless service) and
  PET_MASTER_PORT (29500) are upserted into the `node` container's env.

Running the pods: each is a process started from the container's command, verbatim, with the
container's env (secret references resolved from `secrets`) on top of the image's own env
(`image_env`, e.g. PATH). Node 0's DNS name does not resolve here, so PET_MASTER_ADDR and
PET_MASTER_PORT are replaced by 127.0.0.1 and a free port: the only change, and the one a cluster's
DNS and pod network make.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

RESERVED_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                "PET_MASTER_PORT"}  # fmt: skip
TRAINER_PORT = 29500  # ContainerTrainerPort, pkg/constants/constants.go
MERGE_KEYS = {
    "replicatedJobs": "name", "containers": "name", "initContainers": "name", "volumes": "name",
    "env": "name", "imagePullSecrets": "name", "volumeMounts": "mountPath",
    "ports": "containerPort",
}  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parents[1]


class TrainJobRejected(Exception):
    """What the Trainer's admission webhook would answer."""


def strategic_merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """Kubernetes' strategic merge of `patch` into `base` for the fields a JobSet spec holds."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        out = [copy.deepcopy(item) for item in base]
        for item in patch:
            at = [i for i, b in enumerate(out) if b.get(merge_key) == item.get(merge_key)]
            if at:
                out[at[0]] = strategic_merge(out[at[0]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def load_runtime(path: Path = REPO_ROOT / "manifests/base/training-runtime.yaml") -> dict:
    return yaml.safe_load(path.read_text())


def _upsert(env: list[dict], entries: list[dict]) -> list[dict]:
    out = [dict(e) for e in env]
    for entry in entries:
        at = [i for i, e in enumerate(out) if e["name"] == entry["name"]]
        if at:
            out[at[0]] = dict(entry)
        else:
            out.append(dict(entry))
    return out


def node_pods(trainjob: dict, runtime: dict) -> list[dict]:
    """The pod spec of each node of `trainjob`, as the Trainer builds them from `runtime`."""
    name, trainer = trainjob["metadata"]["name"], trainjob["spec"].get("trainer") or {}
    reserved = sorted(RESERVED_ENV & {e["name"] for e in trainer.get("env") or []})
    if reserved:
        raise TrainJobRejected(f"spec.trainer.env: must not have reserved envs: {reserved}")
    jobset = copy.deepcopy(runtime["spec"]["template"]["spec"])
    for patch in trainjob["spec"].get("runtimePatches") or []:
        template = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec")
        if template:
            jobset = strategic_merge(jobset, template)
    [node_job] = [
        job
        for job in jobset["replicatedJobs"]
        if (job["template"].get("metadata") or {})
        .get("labels", {})
        .get("trainer.kubeflow.org/trainjob-ancestor-step")
        == "trainer"
    ]
    pod = node_job["template"]["spec"]["template"]["spec"]
    [container] = [c for c in pod["containers"] if c["name"] == "node"]
    if "resourcesPerNode" in trainer:
        resources = container.setdefault("resources", {})
        for kind, values in trainer["resourcesPerNode"].items():
            resources[kind] = {**(resources.get(kind) or {}), **values}
    for field in ("image", "command", "args"):
        if field in trainer:
            container[field] = copy.deepcopy(trainer[field])
    container["env"] = _upsert(container.get("env") or [], trainer.get("env") or [])
    num_nodes = trainer.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
    per_node = trainer.get("numProcPerNode", "auto")
    pods = []
    for node in range(num_nodes):
        node_pod = copy.deepcopy(pod)
        [node_container] = [c for c in node_pod["containers"] if c["name"] == "node"]
        node_container["env"] = _upsert(
            node_container["env"],
            [
                {"name": "PET_NNODES", "value": str(num_nodes)},
                {"name": "PET_NPROC_PER_NODE", "value": str(per_node)},
                # valueFrom the Job completion index annotation: the node's index
                {"name": "PET_NODE_RANK", "value": str(node)},
                {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
                {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)},
            ],
        )
        node_container.setdefault("ports", []).append({"containerPort": TRAINER_PORT})
        pods.append(node_pod)
    return pods


def container_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's env as the kubelet resolves it (plain values and secret keys)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        env.update(secrets[source["secretRef"]["name"]])
    for entry in container.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        values = secrets.get(ref["name"], {})
        if ref["key"] in values:
            env[entry["name"]] = values[ref["key"]]
        elif not ref.get("optional"):
            raise RuntimeError(f"secret {ref['name']} has no key {ref['key']}: pod not started")
    return env


def run_pods(
    pods: list[dict],
    image_env: dict[str, str],
    master_port: int,
    secrets: dict[str, dict[str, str]] | None = None,
    timeout_s: float = 300,
) -> list[tuple[int, str, str]]:
    """Run each pod's `node` container command verbatim; (returncode, stdout, stderr) per pod."""
    procs = []
    for pod in pods:
        [container] = [c for c in pod["containers"] if c["name"] == "node"]
        env = {**image_env, **container_env(container, secrets or {})}
        env["PET_MASTER_ADDR"], env["PET_MASTER_PORT"] = "127.0.0.1", str(master_port)
        procs.append(
            subprocess.Popen(
                [*container["command"], *container.get("args", [])],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, err = proc.communicate()
        results.append((proc.returncode, out, err))
    return results
