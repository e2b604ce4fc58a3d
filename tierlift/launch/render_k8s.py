"""``tierlift render k8s``: a KubeRay ``RayJob`` (ray.io/v1, KubeRay >= 1.7) for a run.

Two YAML documents: a ConfigMap with the resolved config, and the RayJob:

- a head group (the driver: ``tierlift train --backend ray``, which places one
  rank per GPU on the workers; the head has no GPU, so no rank lands on it),
- one GPU worker group of ``--nodes`` pods with ``nvidia.com/gpu: G`` each,
- a volume every pod mounts at /shared for the run directory (checkpoints): the
  PVC named by ``--pvc`` (ReadWriteMany), else an emptyDir that dies with the
  pods (a warning says so),
- the NVMe tier's directories as hostPath volumes on the worker's node, at the
  same path the config names,
- ``authOptions.mode: token`` (KubeRay creates the token Secret),
- ``backoffLimit``: KubeRay resubmits a failed job on a fresh cluster that many
  times; the entrypoint adds ``--resume`` when /shared holds a complete
  checkpoint, so each retry continues from it.
"""

from __future__ import annotations

import posixpath
import shlex
import sys

from tierlift.errors import LaunchError
from tierlift.launch.render_common import Job, check_dns_label, load_job, resume_test

__all__ = ["render_k8s", "SHARED_MOUNT", "CONFIG_MOUNT"]

SHARED_MOUNT = "/shared"  # the run directory lives at /shared/runs/<name> in every pod
CONFIG_MOUNT = "/etc/tierlift"  # the ConfigMap, on the head (the driver reads it)
_GPU = "nvidia.com/gpu"


def _entrypoint(job: Job, config_path: str) -> str:
    # /bin/sh runs the line; Ray sets $RAY_ADDRESS (the head's GCS) for a job's entrypoint.
    train = shlex.join(["tierlift", "train", config_path, "--backend", "ray", "--nnodes", str(job.nodes),
                        "--nproc-per-node", str(job.ranks_per_node)])
    return (f"if {resume_test('python', shlex.quote(job.run_dir))}; then R=--resume; else R=; fi; "
            f'exec {train} --address "$RAY_ADDRESS" $R')


def _volumes(job: Job, pvc: str | None) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) every worker pod needs."""
    shared = ({"name": "shared", "persistentVolumeClaim": {"claimName": pvc}} if pvc
              else {"name": "shared", "emptyDir": {}})
    volumes = [shared, {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "shared", "mountPath": SHARED_MOUNT}, {"name": "dshm", "mountPath": "/dev/shm"}]
    for i, path in enumerate(job.nvme_paths):
        volumes.append({"name": f"nvme-{i}", "hostPath": {"path": path, "type": "DirectoryOrCreate"}})
        mounts.append({"name": f"nvme-{i}", "mountPath": path})
    return volumes, mounts


def build_rayjob(job: Job, *, image: str, pvc: str | None, backoff_limit: int) -> list[dict]:
    """[ConfigMap, RayJob] as plain dicts."""
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{job.name}-config", "labels": {"app.kubernetes.io/name": "tierlift"}},
                  "data": {"config.yaml": job.config_yaml}}
    volumes, mounts = _volumes(job, pvc)
    head_volumes = volumes + [{"name": "config", "configMap": {"name": f"{job.name}-config"}}]
    head_mounts = mounts + [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
    head = {"rayStartParams": {},
            "template": {"spec": {"containers": [{
                "name": "ray-head", "image": image,
                "ports": [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                          {"containerPort": 10001, "name": "client"}],
                "volumeMounts": head_mounts}], "volumes": head_volumes}}}
    worker = {"groupName": "gpu", "replicas": job.nodes, "minReplicas": job.nodes, "maxReplicas": job.nodes,
              "rayStartParams": {},
              "template": {"spec": {
                  "containers": [{"name": "ray-worker", "image": image,
                                  "resources": {"limits": {_GPU: job.ranks_per_node}},
                                  "volumeMounts": mounts}],
                  "volumes": volumes,
                  "tolerations": [{"key": _GPU, "operator": "Exists", "effect": "NoSchedule"}]}}}
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob",
              "metadata": {"name": job.name, "labels": {"app.kubernetes.io/name": "tierlift"}},
              "spec": {"entrypoint": _entrypoint(job, posixpath.join(CONFIG_MOUNT, "config.yaml")),
                       "backoffLimit": backoff_limit,
                       "shutdownAfterJobFinishes": True,
                       "ttlSecondsAfterFinished": 3600,
                       "rayClusterSpec": {"authOptions": {"mode": "token"}, "headGroupSpec": head,
                                          "workerGroupSpecs": [worker]}}}
    return [config_map, rayjob]


def render_k8s(config: str, *, nodes: int, gpus_per_node: int, image: str, pvc: str | None = None,
               backoff_limit: int = 3) -> str:
    """The manifest text (two YAML documents)."""
    import yaml

    if not image or any(c.isspace() for c in image):
        raise LaunchError("is not a container image reference.", setting="--image", value=image,
                          fix="give the image with tierlift installed, e.g. --image ghcr.io/me/tierlift:0.1.")
    check_dns_label("--pvc", pvc)
    job = load_job(config, nodes=nodes, ranks_per_node=gpus_per_node, device="cuda", backend="ray",
                   run_root=posixpath.join(SHARED_MOUNT, "runs"))
    if pvc is None:
        print("tierlift: warning: no --pvc: the run directory is an emptyDir in each pod, so checkpoints are "
              "lost with the pods and a retried job starts over; pass --pvc NAME (a ReadWriteMany claim).",
              file=sys.stderr)
    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # shared lists written out in full: no &id001 anchors
            return True

    def _str(dumper, value):  # the config and the entrypoint as readable blocks
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    _Dumper.add_representer(str, _str)
    docs = build_rayjob(job, image=image, pvc=pvc, backoff_limit=backoff_limit)
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
