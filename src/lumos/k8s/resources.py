"""Pod-level pieces shared by the TrainJob, the InferenceService and the pipeline's steps: the
object-store secret as environment variables, and resource quantities as numbers. The settings
themselves (tolerations, compute resources) are configs: `lumos.configs.k8s`."""

from __future__ import annotations

from typing import Any

from lumos.configs.k8s import QUANTITY, check_quantity

# The keys of the object-store secret (`lumos-s3`): what `lumos.storage` reads from the environment.
S3_SECRET_KEYS = ("LUMOS_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_SECRET_OPTIONAL_KEYS = ("LUMOS_S3_REGION",)


_SUFFIX = {
    "": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def quantity_value(value: str) -> float:
    """A Kubernetes quantity as a number: "16Gi" -> 17179869184.0, "500m" -> 0.5, "2e3" -> 2000."""
    match = QUANTITY.match(check_quantity(value))
    if match is None:
        raise RuntimeError("broken invariant: match is not None")
    number, suffix = float(match.group(1)), match.group(3) or ""
    if suffix[:1] in ("e", "E") and suffix != "E":
        return number * 10 ** int(suffix[1:])
    return number * _SUFFIX[suffix]


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
