"""Validation against the real CRDs (../shared/crds) and the real Kubernetes schemas."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

from lumos.k8s.crd_validation import (
    CRDNotFoundError,
    ResourceValidationError,
    structural_to_json_schema,
    validate_resource,
    validate_resources,
)


def isvc() -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "lumos-t2i", "namespace": "lumos"},
        "spec": {
            "predictor": {
                "serviceAccountName": "lumos-serving",
                "minReplicas": 1,
                "model": {
                    "modelFormat": {"name": "lumos-onnx"},
                    "runtime": "lumos-onnx",
                    "storageUri": "s3://lumos/models/t2i/v0001",
                    "resources": {
                        "requests": {"cpu": 4, "memory": "16Gi", "nvidia.com/gpu": "1"},
                        "limits": {"memory": "16Gi", "nvidia.com/gpu": 1},
                    },
                },
            }
        },
    }


def test_valid_inference_service_passes(crds_dir: Path) -> None:
    validate_resource(isvc(), crds_dir)  # int-or-string quantities: 4 and "16Gi" both accepted


def test_every_violation_is_listed_with_its_path(crds_dir: Path) -> None:
    bad = isvc()
    model = bad["spec"]["predictor"]["model"]
    model["storageURI"] = model.pop("storageUri")  # a typo the API server would silently prune
    model["resources"]["requests"]["memory"] = "16 GB"  # not a quantity
    bad["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(ResourceValidationError) as info:
        validate_resource(bad, crds_dir)
    violations = info.value.violations
    assert len(violations) == 3, violations
    text = str(info.value)
    assert "spec.predictor.model: Additional properties are not allowed ('storageURI'" in text
    assert "spec.predictor.model.resources.requests.memory" in text
    assert "spec.predictor.minReplicas: 'one' is not of type 'integer'" in text
    assert "InferenceService 'lumos-t2i'" in text


def test_preserve_unknown_fields_and_fields_named_like_keywords(crds_dir: Path) -> None:
    version = {
        "apiVersion": "pipelines.kubeflow.org/v2beta1",
        "kind": "PipelineVersion",
        "metadata": {"name": "lumos-v1"},
        # `description` is a field here, not the schema keyword; pipelineSpec takes anything
        "spec": {"description": "d", "pipelineName": "lumos", "pipelineSpec": {"any": [1, {}]}},
    }
    validate_resource(version, crds_dir)
    del version["spec"]["pipelineSpec"]
    with pytest.raises(ResourceValidationError, match="'pipelineSpec' is a required property"):
        validate_resource(version, crds_dir)


def test_required_status_of_scheduled_workflow(crds_dir: Path) -> None:
    swf = {"apiVersion": "kubeflow.org/v1beta1", "kind": "ScheduledWorkflow",
           "metadata": {"name": "x"}, "spec": {"anything": True}}  # fmt: skip
    with pytest.raises(ResourceValidationError, match="'status' is a required property"):
        validate_resource(swf, crds_dir)
    validate_resource({**swf, "status": {}}, crds_dir)


def test_metadata_is_checked(crds_dir: Path) -> None:
    bad = isvc()
    bad["metadata"]["name"] = "Lumos_T2I"
    bad["metadata"]["labels"] = {"a": 1}
    bad["metadata"]["uid"] = "set-by-the-server"
    with pytest.raises(ResourceValidationError) as info:
        validate_resource(bad, crds_dir)
    text = str(info.value)
    assert "DNS-1123 label" in text and "metadata.labels.a" in text and "'uid'" in text


def test_unknown_custom_kind_and_version(crds_dir: Path) -> None:
    with pytest.raises(CRDNotFoundError, match="no CRD for Widget.example.com"):
        validate_resource({"apiVersion": "example.com/v1", "kind": "Widget",
                           "metadata": {"name": "w"}}, crds_dir)  # fmt: skip
    with pytest.raises(CRDNotFoundError, match="no version 'v1'"):
        validate_resource({**isvc(), "apiVersion": "serving.kserve.io/v1"}, crds_dir)


def test_core_kinds_are_validated_strictly() -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {
            "selector": {"matchLabels": {"app": "d"}},
            "template": {
                "metadata": {"labels": {"app": "d"}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            },
        },
    }
    validate_resource(deployment)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(ResourceValidationError, match="imagePullPolcy"):
        validate_resource(typo)
    with pytest.raises(ResourceValidationError, match="needs apiVersion and kind"):
        validate_resource({"metadata": {}})


def test_validate_resources_reports_all_invalid_ones(crds_dir: Path) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": 1}}
    bad = isvc()
    bad["spec"]["predictor"]["bogus"] = True
    with pytest.raises(ResourceValidationError) as info:
        validate_resources([cm, isvc(), bad], crds_dir)
    assert len(info.value.violations) == 2
    assert any("ConfigMap 'c'" in v for v in info.value.violations)
    assert any("bogus" in v for v in info.value.violations)


def test_crds_dir_override(crds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(crds_dir / "pipelines.kubeflow.org_pipelines.yaml", tmp_path)
    monkeypatch.setenv("LUMOS_CRDS_DIR", str(tmp_path))
    pipeline = {"apiVersion": "pipelines.kubeflow.org/v2beta1", "kind": "Pipeline",
                "metadata": {"name": "p"}, "spec": {"displayName": "P"}}  # fmt: skip
    validate_resource(pipeline)  # found in the override directory
    with pytest.raises(CRDNotFoundError, match="no CRD for InferenceService"):
        validate_resource(isvc())
    monkeypatch.setenv("LUMOS_CRDS_DIR", str(tmp_path / "missing"))
    with pytest.raises(CRDNotFoundError, match="set LUMOS_CRDS_DIR"):
        validate_resource(pipeline)


def test_structural_schema_translation() -> None:
    schema = structural_to_json_schema(
        {
            "type": "object",
            "properties": {
                "port": {"x-kubernetes-int-or-string": True},
                "note": {"type": "string", "nullable": True, "description": "text"},
                "free": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {"a": {"type": "integer"}},
                },  # fmt: skip
            },
        }
    )
    props = schema["properties"]
    assert props["port"] == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert props["note"] == {"type": ["string", "null"]}
    assert "additionalProperties" not in props["free"]
    assert schema["additionalProperties"] is False


WIDGET_CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  names:
    kind: Widget
    plural: widgets
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              ports:
                type: array
                x-kubernetes-list-type: map
                x-kubernetes-list-map-keys: [containerPort, protocol]
                items:
                  type: object
                  required: [containerPort]
                  properties:
                    containerPort: {type: integer}
                    protocol: {type: string, default: TCP}
"""


def test_list_map_keys_are_unique(tmp_path: Path) -> None:
    """A list-map (x-kubernetes-list-type: map) holds one entry per key, as the API server
    enforces; a key left out counts as its default."""
    (tmp_path / "widgets.yaml").write_text(WIDGET_CRD)
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
              "spec": {"ports": [{"containerPort": 80}, {"containerPort": 80, "protocol": "UDP"}]}}  # fmt: skip
    validate_resource(widget, tmp_path)
    widget["spec"]["ports"].append({"containerPort": 80, "protocol": "TCP"})  # = the first one
    with pytest.raises(ResourceValidationError) as info:
        validate_resource(widget, tmp_path)
    assert info.value.violations == [
        "spec.ports[2]: duplicate entry containerPort=80, protocol='TCP': a list-map keyed by "
        "containerPort, protocol holds one entry per key"
    ]
