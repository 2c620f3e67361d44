"""Pod-level settings shared by the TrainJob, the InferenceService and the pipeline's steps:
compute resources, tolerations and the object-store secret as environment variables."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A Kubernetes resource quantity: "4", "500m", "32Gi", "1.5", "2e3".
_QUANTITY = re.compile(r"^(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?\d+))?$")
_LABEL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# The keys of the object-store secret (`lumos-s3`): what `lumos.storage` reads from the environment.
S3_SECRET_KEYS = ("LUMOS_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_SECRET_OPTIONAL_KEYS = ("LUMOS_S3_REGION",)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_quantity(value: str) -> str:
    if not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity: use e.g. '4', '500m', '32Gi'")
    return value


_SUFFIX = {
    "": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def quantity_value(value: str) -> float:
    """A Kubernetes quantity as a number: "16Gi" -> 17179869184.0, "500m" -> 0.5, "2e3" -> 2000."""
    match = _QUANTITY.match(check_quantity(value))
    assert match is not None
    number, suffix = float(match.group(1)), match.group(3) or ""
    if suffix[:1] in ("e", "E") and suffix != "E":
        return number * 10 ** int(suffix[1:])
    return number * _SUFFIX[suffix]


def check_dns_label(value: str, what: str = "name") -> str:
    if len(value) > 63 or not _LABEL_NAME.match(value):
        raise ValueError(
            f"{what} {value!r} must be a DNS-1123 label: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value


class Toleration(Strict):
    """A pod toleration; the default tolerates the NoSchedule taint GPU node pools usually carry."""

    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"

    @model_validator(mode="after")
    def _value_matches_operator(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError(f"toleration {self.key!r}: operator Exists takes no value")
        if self.operator == "Equal" and self.value is None:
            raise ValueError(f"toleration {self.key!r}: operator Equal needs a value")
        return self

    def to_k8s(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ComputeResources(Strict):
    """Requests and limits of one container (or one training node). GPUs are requested and limited
    alike (Kubernetes requires it for extended resources); memory is limited to what is requested
    so a pod is never OOM-killed for using memory the scheduler did not reserve."""

    cpu: str = "4"
    memory: str = "16Gi"
    gpu: int = Field(0, ge=0)
    gpu_resource: str = "nvidia.com/gpu"
    cpu_limit: str | None = Field(
        default=None, description="None: no CPU limit (avoids CFS throttling)"
    )

    @field_validator("cpu", "memory", "cpu_limit")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        return value if value is None else check_quantity(value)

    def to_k8s(self) -> dict[str, dict[str, Any]]:
        requests: dict[str, Any] = {"cpu": self.cpu, "memory": self.memory}
        limits: dict[str, Any] = {"memory": self.memory}
        if self.cpu_limit:
            limits["cpu"] = self.cpu_limit
        if self.gpu:
            requests[self.gpu_resource] = str(self.gpu)
            limits[self.gpu_resource] = str(self.gpu)
        return {"requests": requests, "limits": limits}


def secret_env(secret_name: str) -> list[dict[str, Any]]:
    """Environment variables taken from the object-store secret, one per key `lumos.storage` reads;
    the region is optional (MinIO ignores it)."""
    env = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}
        for key in S3_SECRET_KEYS
    ]
    env += [
        {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key, "optional": True}},
        }
        for key in S3_SECRET_OPTIONAL_KEYS
    ]
    return env
