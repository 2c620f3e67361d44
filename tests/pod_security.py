"""The Restricted profile of the Kubernetes Pod Security Standards, as a check of a pod spec.

Written from https://kubernetes.io/docs/concepts/security/pod-security-standards/ (the Baseline
and Restricted policy tables, which the `restricted` level of Pod Security Admission enforces):
each control below names its row there. No Kubernetes API server runs here, so this check stands
in for the admission plugin that would reject the pod; it also checks what a scheduler needs (every
container with CPU and memory requests and limits), which the standard does not cover.

    violations = restricted_violations(pod_spec)       # [] when the pod is admitted
    assert not violations, violations
"""

from __future__ import annotations

from typing import Any

from lumos.k8s.resources import quantity_value

# Baseline "Capabilities": what a container may add (Restricted narrows it to NET_BIND_SERVICE).
RESTRICTED_ADD_CAPABILITIES = {"NET_BIND_SERVICE"}
# Restricted "Volume Types": the only volume sources allowed.
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
# Baseline "Sysctls": the safe set.
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
# Baseline "SELinux": allowed types (user and role must be unset).
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_ALLOWED = {"RuntimeDefault", "Localhost"}


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(field) or []:
            out.append((f"{field}[{c.get('name', '?')}]", c))
    return out


def restricted_violations(spec: dict[str, Any], *, require_resources: bool = True) -> list[str]:
    """Every way the pod spec `spec` breaks the Restricted profile (and, with
    `require_resources`, every container without CPU and memory requests and limits)."""
    bad: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    containers = _containers(spec)
    if not spec.get("containers"):
        bad.append("no containers")

    # --- Baseline ---------------------------------------------------------------------------
    # HostProcess
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        bad.append("HostProcess: spec.securityContext.windowsOptions.hostProcess is true")
    # Host Namespaces
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            bad.append(f"Host Namespaces: spec.{field} is true")
    # HostPath Volumes (and Restricted "Volume Types")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            bad.append(f"HostPath Volumes: volume {volume.get('name')} is a hostPath")
        elif not kinds <= RESTRICTED_VOLUME_TYPES:
            bad.append(f"Volume Types: volume {volume.get('name')} is {sorted(kinds)}")
    # Sysctls
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            bad.append(f"Sysctls: {sysctl.get('name')} is not in the safe set")
    # AppArmor / SELinux / Seccomp at pod level
    bad += _apparmor("spec.securityContext", pod_sc)
    bad += _selinux("spec.securityContext", pod_sc)
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_ALLOWED:
        bad.append(f"Seccomp: spec.securityContext.seccompProfile.type is {pod_seccomp}")
    # Running as Non-root user: runAsUser must not be 0
    if pod_sc.get("runAsUser") == 0:
        bad.append("Running as Non-root user: spec.securityContext.runAsUser is 0")

    for where, c in containers:
        sc = c.get("securityContext") or {}
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad.append(f"HostProcess: {where}")
        # Privileged Containers
        if sc.get("privileged"):
            bad.append(f"Privileged Containers: {where} is privileged")
        # Host Ports
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad.append(f"Host Ports: {where} uses hostPort {port['hostPort']}")
        bad += _apparmor(where, sc)
        bad += _selinux(where, sc)
        # /proc Mount Type
        if sc.get("procMount") not in (None, "Default"):
            bad.append(f"/proc Mount Type: {where} procMount is {sc['procMount']}")

        # --- Restricted ---------------------------------------------------------------------
        # Privilege Escalation: must be set to false
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"Privilege Escalation: {where} does not set allowPrivilegeEscalation false")
        # Running as Non-root: the container's runAsNonRoot, else the pod's, must be true
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            bad.append(f"Running as Non-root: {where} (or the pod) does not set runAsNonRoot true")
        if sc.get("runAsUser") == 0:
            bad.append(f"Running as Non-root user: {where} runAsUser is 0")
        # Seccomp: RuntimeDefault or Localhost, on the container or else on the pod
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in SECCOMP_ALLOWED:
            bad.append(f"Seccomp: {where} seccompProfile is {seccomp} (pod: {pod_seccomp})")
        # Capabilities: drop ALL, add at most NET_BIND_SERVICE
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"Capabilities: {where} does not drop ALL")
        added = set(caps.get("add") or []) - RESTRICTED_ADD_CAPABILITIES
        if added:
            bad.append(f"Capabilities: {where} adds {sorted(added)}")

        # --- What a scheduler needs (not part of the standard) --------------------------------
        if require_resources and not where.startswith("ephemeralContainers"):
            resources = c.get("resources") or {}
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(kind) or {})
                if missing:
                    bad.append(f"Resources: {where} has no {kind} for {sorted(missing)}")
        # The API server refuses a container whose request exceeds its limit.
        requests = (c.get("resources") or {}).get("requests") or {}
        for key, limit in ((c.get("resources") or {}).get("limits") or {}).items():
            if key in requests and quantity_value(str(requests[key])) > quantity_value(str(limit)):
                bad.append(f"Resources: {where} requests {key} {requests[key]} > limit {limit}")
    return bad


def _apparmor(where: str, sc: dict[str, Any]) -> list[str]:
    kind = (sc.get("appArmorProfile") or {}).get("type")
    if kind not in (None, "RuntimeDefault", "Localhost"):
        return [f"AppArmor: {where} appArmorProfile is {kind}"]
    return []


def _selinux(where: str, sc: dict[str, Any]) -> list[str]:
    options = sc.get("seLinuxOptions") or {}
    bad = []
    if options.get("type", "") not in SELINUX_TYPES:
        bad.append(f"SELinux: {where} type {options['type']}")
    for field in ("user", "role"):
        if options.get(field):
            bad.append(f"SELinux: {where} sets {field}")
    return bad


def pod_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The pod specs inside a rendered object, by where they are: Pod, Deployment, Job, CronJob
    (and other pod-template kinds), KServe ServingRuntime (its spec is a pod spec fragment)."""
    kind, name = obj.get("kind"), (obj.get("metadata") or {}).get("name")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return [(f"Pod/{name}", spec)]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [(f"{kind}/{name}", spec["template"]["spec"])]
    if kind == "CronJob":
        return [(f"{kind}/{name}", spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "ServingRuntime":
        return [(f"{kind}/{name}", spec)]
    if kind in ("TrainingRuntime", "ClusterTrainingRuntime"):
        jobs = spec["template"]["spec"]["replicatedJobs"]
        return [
            (f"{kind}/{name}/{j['name']}", j["template"]["spec"]["template"]["spec"]) for j in jobs
        ]
    return []
