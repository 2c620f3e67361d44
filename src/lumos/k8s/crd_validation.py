"""Offline validation of Kubernetes resources: custom resources against their CRDs, core kinds
against the Kubernetes OpenAPI schemas (`kubernetes-validate`).

    validate_resource(obj)            # raises ResourceValidationError listing every violation
    validate_custom_resource(obj)     # custom resources only, against the CRD's served version

The CRDs live in `<repo>/../shared/crds` (override with `LUMOS_CRDS_DIR`). A CRD's
`openAPIV3Schema` is a *structural* schema with Kubernetes extensions; it is turned into a JSON
Schema that is as strict as the API server with `--validate=strict`:
- an object with declared `properties` rejects unknown fields (the server would prune or refuse
  them), unless it carries `x-kubernetes-preserve-unknown-fields`;
- `x-kubernetes-int-or-string` accepts an integer or a string;
- `nullable: true` also accepts null;
- a list-map (`x-kubernetes-list-type: map`) holds one entry per key (`x-kubernetes-list-map-keys`,
  e.g. one `env` entry per name).
CEL rules (`x-kubernetes-validations`) need the API server and are not evaluated here, except the
object-name rules every resource must follow, which are checked directly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from lumos.errors import LumosError

KUBERNETES_VERSION = "1.32"  # the cluster version core kinds are validated for

# metadata.name: DNS-1123 subdomain (what most kinds accept); TrainJob and Service need a label.
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# The ObjectMeta fields a manifest may set (the server fills the others).
_METADATA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": False,
}


class ResourceValidationError(LumosError, ValueError):
    """A resource does not match its schema. `violations` holds one "path: message" per problem."""

    def __init__(self, resource_name: str, violations: list[str]) -> None:
        self.resource_name = resource_name
        self.violations = violations
        lines = "\n".join(f"  - {v}" for v in violations)
        super().__init__(f"{resource_name} is invalid ({len(violations)} problem(s)):\n{lines}")


class CRDNotFoundError(LumosError, LookupError):
    """No CRD in the CRD directory defines this apiVersion/kind."""


def crds_dir() -> Path:
    """`$LUMOS_CRDS_DIR`, else `<repo root>/../shared/crds`."""
    override = os.environ.get("LUMOS_CRDS_DIR")
    if override:
        path = Path(override)
    else:
        repo_root = Path(__file__).resolve().parents[3]  # src/lumos/k8s/<this> -> repo root
        path = repo_root.parent / "shared" / "crds"
    if not path.is_dir():
        raise CRDNotFoundError(
            f"CRD directory {path} does not exist: set LUMOS_CRDS_DIR to a directory holding the "
            "CustomResourceDefinition YAML files (KServe, Kubeflow Trainer, KFP, Prometheus operator)"
        )
    return path


def _describe(obj: dict[str, Any]) -> str:
    name = (obj.get("metadata") or {}).get("name", "<unnamed>")
    return f"{obj.get('kind', '<no kind>')} {name!r} ({obj.get('apiVersion', '<no apiVersion>')})"


def _load_yaml_documents(path: Path) -> list[Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader: the KServe CRDs are MBs
    with path.open() as f:
        return [doc for doc in yaml.load_all(f, Loader=loader) if doc]


# controller-gen writes `spec.group` at indent 2 and `spec.names.kind` at indent 4: reading those
# two lines indexes a directory without parsing megabytes of schema.
_GROUP_LINE = re.compile(r"^  group: *['\"]?([\w.\-]+)", re.MULTILINE)
_KIND_LINE = re.compile(r"^    kind: *['\"]?(\w+)", re.MULTILINE)


@lru_cache(maxsize=4)
def _crd_index(directory: str) -> dict[tuple[str, str], Path]:
    """(group, kind) -> CRD file, for every CRD in the directory."""
    index: dict[tuple[str, str], Path] = {}
    for path in sorted(Path(directory).glob("*.y*ml")):
        text = path.read_text()
        group, kind = _GROUP_LINE.search(text), _KIND_LINE.search(text)
        if group and kind:
            index[(group.group(1), kind.group(1))] = path
            continue
        for doc in _load_yaml_documents(path):  # unusual formatting: parse it fully
            if doc.get("kind") == "CustomResourceDefinition":
                spec = doc["spec"]
                index[(spec["group"], spec["names"]["kind"])] = path
    return index


@lru_cache(maxsize=16)
def _crd_document(path: Path, group: str, kind: str) -> dict[str, Any]:
    for doc in _load_yaml_documents(path):
        spec = doc.get("spec", {})
        is_crd = doc.get("kind") == "CustomResourceDefinition"
        if is_crd and spec.get("group") == group and spec["names"]["kind"] == kind:
            return doc
    raise CRDNotFoundError(f"{path} does not define {kind}.{group}")


@lru_cache(maxsize=32)
def _crd_schema(path: Path, group: str, kind: str, version: str) -> dict[str, Any]:
    doc = _crd_document(path, group, kind)
    versions = {v["name"]: v for v in doc["spec"]["versions"]}
    if version not in versions:
        raise CRDNotFoundError(
            f"{kind}.{group} has no version {version!r} in {path} "
            f"(it defines {', '.join(sorted(versions))})"
        )
    entry = versions[version]
    if not entry.get("served", False):
        raise CRDNotFoundError(f"{kind}.{group}/{version} is defined but not served ({path})")
    return structural_to_json_schema(entry["schema"]["openAPIV3Schema"], top_level=True)


def crd_schema(api_version: str, kind: str, directory: Path | None = None) -> dict[str, Any]:
    """The JSON Schema for `kind` at `api_version` ("group/version"), from the CRD directory."""
    if "/" not in api_version:
        raise CRDNotFoundError(f"{kind} {api_version!r} is a core kind, not a custom resource")
    group, version = api_version.split("/", 1)
    directory = directory or crds_dir()
    index = _crd_index(str(directory))
    if (group, kind) not in index:
        known = ", ".join(f"{k}.{g}" for g, k in sorted(index))
        raise CRDNotFoundError(f"no CRD for {kind}.{group} in {directory} (found: {known})")
    return _crd_schema(index[(group, kind)], group, kind, version)


def structural_to_json_schema(schema: dict[str, Any], top_level: bool = False) -> dict[str, Any]:
    """Translate a Kubernetes structural schema into a strict JSON Schema (see module docstring)."""
    out = _translate(schema)  # builds a new tree: the cached CRD document stays as loaded
    if top_level:
        out.setdefault("properties", {})["metadata"] = _METADATA_SCHEMA
        out["properties"].setdefault("apiVersion", {"type": "string"})
        out["properties"].setdefault("kind", {"type": "string"})
        out.setdefault("type", "object")
        out["additionalProperties"] = False
    return out


_ANNOTATION_KEYWORDS = ("description", "default", "example")
# Our keyword for a list-map's keys (JSON Schema cannot say "unique by these fields"): {"keys":
# [...], "defaults": {...}}, checked by `_unique_list_map_keys`.
_LIST_MAP_KEYWORD = "lumosListMapKeys"


def _translate(node: Any) -> Any:
    if isinstance(node, list):
        return [_translate(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: _translate(v)
        for k, v in node.items()
        if k not in _ANNOTATION_KEYWORDS and k != "properties"
    }
    if "properties" in node:  # field names, not keywords: a field may be called "description"
        out["properties"] = {name: _translate(sub) for name, sub in node["properties"].items()}
    if out.pop("x-kubernetes-int-or-string", False):
        # anyOf [integer, string] is what controller-gen writes; a bare marker means the same
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-list-type") == "map" and node.get("x-kubernetes-list-map-keys"):
        keys = list(node["x-kubernetes-list-map-keys"])
        item_fields = (node.get("items") or {}).get("properties") or {}
        defaults = {
            k: item_fields[k]["default"] for k in keys if "default" in item_fields.get(k, {})
        }
        out[_LIST_MAP_KEYWORD] = {"keys": keys, "defaults": defaults}
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    embedded = out.pop("x-kubernetes-embedded-resource", False)
    for key in [k for k in out if k.startswith("x-kubernetes-")]:
        out.pop(key)  # CEL rules and the rest: enforced by the API server only
    if "properties" in out and not preserve and not embedded and "additionalProperties" not in out:
        out["additionalProperties"] = False
    # int32/int64/double etc. are OpenAPI formats unknown to JSON Schema: harmless, dropped for clarity
    if out.get("format") in ("int32", "int64", "double", "float", "byte"):
        out.pop("format")
    return out


def _format_path(parts: Any) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "<root>"


def _unique_list_map_keys(
    validator: Any, spec: dict[str, Any], instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    """A list-map's entries have distinct keys (a missing key counts as its default)."""
    if not validator.is_type(instance, "array"):
        return
    seen: set[str] = set()
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = ", ".join(f"{k}={item.get(k, spec['defaults'].get(k))!r}" for k in spec["keys"])
        if key in seen:
            yield jsonschema.ValidationError(
                f"duplicate entry {key}: a list-map keyed by {', '.join(spec['keys'])} holds one "
                "entry per key",
                path=[index],
            )
        seen.add(key)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {_LIST_MAP_KEYWORD: _unique_list_map_keys}
)


def _schema_violations(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    validator = _Validator(schema)
    violations = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        message = err.message
        if err.validator == "anyOf" and err.context:  # say which alternative came closest
            message = f"{message}: {jsonschema.exceptions.best_match(err.context).message}"
        violations.append(f"{_format_path(err.absolute_path)}: {message}")
    return violations


def _name_violations(obj: dict[str, Any]) -> list[str]:
    metadata = obj.get("metadata") or {}
    name = metadata.get("name")
    if name is None:
        return [] if metadata.get("generateName") else ["metadata.name: is required"]
    label_kinds = {"TrainJob", "Service", "Namespace", "InferenceService"}
    if obj.get("kind") in label_kinds:
        if not _DNS1123_LABEL.match(name) or len(name) > 63:
            return [f"metadata.name: {name!r} must be a DNS-1123 label (a-z, 0-9, '-', <= 63)"]
        if obj.get("kind") == "TrainJob" and not name[0].isalpha():
            return [f"metadata.name: {name!r} must start with a letter (RFC 1035 label)"]
    elif not _DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        return [f"metadata.name: {name!r} must be a DNS-1123 subdomain (a-z, 0-9, '-', '.')"]
    return []


def is_core_kind(obj: dict[str, Any]) -> bool:
    """Kinds served by Kubernetes itself (core and built-in API groups)."""
    api_version = obj.get("apiVersion", "")
    group = api_version.split("/", 1)[0] if "/" in api_version else ""
    return group == "" or "." not in group or group.endswith(".k8s.io")


def validate_custom_resource(obj: dict[str, Any], directory: Path | None = None) -> None:
    """Validate a custom resource against its CRD; raise `ResourceValidationError` if invalid."""
    schema = crd_schema(obj.get("apiVersion", ""), obj.get("kind", ""), directory)
    violations = _name_violations(obj) + _schema_violations(schema, obj)
    if violations:
        raise ResourceValidationError(_describe(obj), violations)


def validate_core_resource(
    obj: dict[str, Any], kubernetes_version: str = KUBERNETES_VERSION
) -> None:
    """Validate a core kind strictly (unknown fields are errors) with `kubernetes-validate`."""
    import kubernetes_validate

    violations = _name_violations(obj)
    try:
        kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as err:
        raise ResourceValidationError(
            _describe(obj),
            [f"<root>: no schema for this kind in Kubernetes {kubernetes_version}: {err}"],
        ) from None
    except kubernetes_validate.ValidationError as err:
        violations.append(f"{_format_path(err.absolute_path)}: {err.message}")
    if violations:
        raise ResourceValidationError(_describe(obj), violations)


def validate_resource(obj: dict[str, Any], directory: Path | None = None) -> None:
    """Validate one resource: core kinds strictly for Kubernetes 1.32, custom ones against the CRDs."""
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        raise ResourceValidationError(
            repr(obj)[:80], ["<root>: a Kubernetes resource needs apiVersion and kind"]
        )
    if is_core_kind(obj):
        validate_core_resource(obj)
    else:
        validate_custom_resource(obj, directory)


def validate_resources(objs: list[dict[str, Any]], directory: Path | None = None) -> None:
    """Validate every resource, then raise once with the problems of all invalid ones."""
    failures: list[str] = []
    for obj in objs:
        try:
            validate_resource(obj, directory)
        except ResourceValidationError as err:
            failures.extend(f"{err.resource_name}: {v}" for v in err.violations)
    if failures:
        raise ResourceValidationError(f"{len(objs)} resources", failures)
