"""A stand-in of the KFP API server's v2beta1 REST API: a real HTTP server on 127.0.0.1 that
records every request and answers as the API server's handlers do.

It is a stand-in because no KFP API server can run here (no Go toolchain, no Kubernetes, no MySQL:
see /work/shared/ENVIRONMENT.md). It implements the routes kfp.Client 2.17 calls for `lumos deploy`
and `lumos trigger`, with the behaviour read from kubeflow/pipelines (backend, 2.x):
- routes and bodies: backend/api/v2beta1/{pipeline,experiment,recurring_run,run,healthz}.proto
  (google.api.http options), JSON with proto field names and unpopulated fields left out
  (backend/src/apiserver/common/utils.go CustomMarshaler: UseProtoNames, EmitUnpopulated=false;
  int64 fields such as max_concurrency as JSON strings, as protojson writes them);
- uploads: backend/src/apiserver/server/pipeline_upload_server.go (multipart `uploadfile`, query
  `name` / `display_name` / `pipelineid` / `description`; display name defaults to the name;
  409 when the name exists: CreatePipelineVersion's AlreadyExists);
- one pipeline per name and namespace, one version per name and pipeline, one experiment per name
  and namespace (409 AlreadyExists), as the stores' unique indexes make them;
- filters: backend/api/v2beta1/filter.proto, keys checked against each model's APIToModelFieldMap
  (backend/src/apiserver/model/{pipeline,pipeline_version,job,run,experiment}.go), 400 otherwise;
- recurring runs: toModelJob (backend/src/apiserver/server/api_converter.go: a display name, max
  concurrency 1..10, a cron robfig/cron parses), BaseJobServer.createJob (job_server.go) and
  V2Spec.validatePipelineJobInputs (backend/src/apiserver/template/v2_template.go: every parameter
  declared by the pipeline's root and of its type, required ones given), no update route;
- runs: the same parameter validation, state PENDING when created.
Errors are grpc-gateway's JSON ({"error", "code", "message", "details"}) with the HTTP status of
the gRPC code. Only the EQUALS filter operation is implemented (the only one these commands use).
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

PREFIX = "/apis/v2beta1"
# gRPC code -> (HTTP status, code number), as grpc-gateway maps them.
INVALID, NOT_FOUND, EXISTS = (400, 3), (404, 5), (409, 6)
FILTER_KEYS = {  # APIToModelFieldMap of each model
    "pipelines": {"id", "pipeline_id", "name", "display_name", "created_at", "description",
                  "namespace"},
    "versions": {"id", "pipeline_version_id", "name", "display_name", "created_at", "status",
                 "description", "pipeline_spec"},
    "experiments": {"id", "experiment_id", "name", "display_name", "created_at", "description",
                    "namespace", "storage_state", "last_run_created_at"},
    "recurringruns": {"id", "recurring_run_id", "name", "display_name", "created_at",
                      "updated_at", "description"},
    "runs": {"run_id", "id", "display_name", "name", "created_at", "finished_at", "description",
             "scheduled_at", "storage_state", "status", "namespace", "experiment_id", "state",
             "state_history", "runtime_details", "recurring_run_id"},
}  # fmt: skip
OPERATIONS = {1: "EQUALS", "EQUALS": "EQUALS"}
_CRON_FIELD = re.compile(r"^[0-9*/,\-?A-Za-z]+$")


class ApiError(Exception):
    def __init__(self, status: tuple[int, int], message: str) -> None:
        super().__init__(message)
        self.http, self.code = status
        self.message = message


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    body: Any = None


@dataclass
class KfpApiState:
    multi_user: bool = False
    requests: list[Recorded] = field(default_factory=list)
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, dict] = field(default_factory=dict)
    experiments: dict[str, dict] = field(default_factory=dict)
    recurring_runs: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def writes(self) -> list[Recorded]:
        """The requests that change something (every method but GET)."""
        return [r for r in self.requests if r.method != "GET"]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(item: dict, raw_filter: str | None, kind: str) -> bool:
    if not raw_filter:
        return True
    try:
        predicates = json.loads(raw_filter).get("predicates", [])
    except ValueError:
        raise ApiError(INVALID, f"Invalid filter: {raw_filter!r} is not JSON") from None
    for p in predicates:
        key = p.get("key")
        if key not in FILTER_KEYS[kind]:
            raise ApiError(INVALID, f"Invalid input error: no support for filtering on {key!r}")
        if OPERATIONS.get(p.get("operation")) != "EQUALS":
            raise ApiError(INVALID, f"stand-in: only EQUALS filters, got {p.get('operation')}")
        value = p.get("string_value", p.get("stringValue"))
        if str(item.get(key, "")) != str(value):
            return False
    return True


def _cron_ok(cron: str) -> bool:
    fields = cron.split()  # robfig/cron: seconds first, day of week optional
    return len(fields) in (5, 6) and all(_CRON_FIELD.match(f) for f in fields)


def _check_parameters(spec: dict, parameters: dict[str, Any]) -> None:
    """V2Spec.validatePipelineJobInputs."""
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    types = {"STRING": str, "BOOLEAN": bool, "LIST": list, "STRUCT": dict}
    for name, param in declared.items():
        if name not in parameters:
            if not param.get("isOptional") and "defaultValue" not in param:
                raise ApiError(INVALID, f"parameter {name} is not optional, yet has neither "
                                        "default value nor user provided value")  # fmt: skip
            continue
        value, kind = parameters[name], param.get("parameterType")
        if kind in ("NUMBER_INTEGER", "NUMBER_DOUBLE"):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = isinstance(value, types.get(kind, ()))
        if not ok:
            raise ApiError(INVALID, f"input parameter {name} requires type {kind}, but the "
                                    f"parameter value {value!r} is not of that type")  # fmt: skip
    extra = sorted(set(parameters) - set(declared))
    if extra:
        raise ApiError(INVALID, "parameter(s) provided are not required by pipeline: "
                                + ", ".join(extra))  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    state: KfpApiState

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps({k: v for k, v in payload.items() if v not in (None, "", [], {})})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data.encode())

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any = None
        if raw and self.headers.get_content_type() == "application/json":
            body = json.loads(raw)
        elif raw and self.headers.get_content_type() == "multipart/form-data":
            body = self._multipart(raw)
        state = self.state
        with state.lock:
            state.requests.append(Recorded(method, url.path, query, body))
            try:
                status, payload = self._route(method, url.path, query, body)
            except ApiError as err:
                status = err.http
                payload = {"error": err.message, "code": err.code, "message": err.message,
                           "details": []}  # fmt: skip
        self._send(status, payload)

    def _multipart(self, raw: bytes) -> dict[str, Any]:
        header = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + raw)
        parts = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            parts[name] = {
                "filename": part.get_filename(),
                "content": part.get_payload(decode=True).decode(),
            }
        return parts

    do_GET = lambda self: self._handle("GET")  # noqa: E731
    do_POST = lambda self: self._handle("POST")  # noqa: E731
    do_DELETE = lambda self: self._handle("DELETE")  # noqa: E731

    # -- routes ---------------------------------------------------------------------------------
    def _route(self, method: str, path: str, q: dict[str, str], body: Any) -> tuple[int, dict]:
        s = self.state
        if not path.startswith(PREFIX):
            raise ApiError(NOT_FOUND, f"Not Found: {path}")
        path = path.removeprefix(PREFIX)
        if (method, path) == ("GET", "/healthz"):
            return 200, {"multi_user": s.multi_user, "pipeline_store": "database"}
        if (method, path) == ("GET", "/pipelines"):
            return 200, self._list("pipelines", s.pipelines.values(), q, "pipelines")
        if (method, path) == ("POST", "/pipelines"):
            return 200, self._create_pipeline(body or {})
        if (method, path) == ("POST", "/pipelines/upload_version"):
            return 200, self._upload_version(q, body or {})
        m = re.fullmatch(r"/pipelines/([^/]+)/versions", path)
        if method == "GET" and m:
            if m.group(1) not in s.pipelines:
                raise ApiError(NOT_FOUND, f"Pipeline {m.group(1)} not found")
            versions = [v for v in s.versions.values() if v["pipeline_id"] == m.group(1)]
            return 200, self._list("versions", versions, q, "pipeline_versions")
        if (method, path) == ("GET", "/experiments"):
            return 200, self._list("experiments", s.experiments.values(), q, "experiments")
        if (method, path) == ("POST", "/experiments"):
            return 200, self._create_experiment(body or {})
        if (method, path) == ("GET", "/recurringruns"):
            # The proto field is named recurringRuns (recurring_run.proto ListRecurringRunsResponse)
            return 200, self._list("recurringruns", s.recurring_runs.values(), q, "recurringRuns")
        if (method, path) == ("POST", "/recurringruns"):
            return 200, self._create_recurring_run(body or {})
        m = re.fullmatch(r"/recurringruns/([^/:]+)", path)
        if method == "DELETE" and m:
            if s.recurring_runs.pop(m.group(1), None) is None:
                raise ApiError(NOT_FOUND, f"Recurring run {m.group(1)} not found")
            return 200, {}
        if (method, path) == ("GET", "/runs"):
            return 200, self._list("runs", s.runs.values(), q, "runs")
        if (method, path) == ("POST", "/runs"):
            return 200, self._create_run(body or {})
        raise ApiError(NOT_FOUND, f"Not Found: {method} {PREFIX}{path}")

    def _list(self, kind: str, items: Any, q: dict[str, str], key: str) -> dict:
        found = [i for i in items if _matches(i, q.get("filter"), kind)]
        if q.get("experiment_id"):
            found = [i for i in found if i.get("experiment_id") == q["experiment_id"]]
        if q.get("namespace"):
            found = [i for i in found if i.get("namespace", "") == q["namespace"]]
        sort = q.get("sort_by", "")
        if sort:
            field_name, _, order = sort.partition(" ")
            found.sort(key=lambda i: i.get(field_name, ""), reverse=order == "desc")
        size = int(q.get("page_size") or 0) or len(found)
        return {key: found[:size], "total_size": len(found)}

    def _create_pipeline(self, body: dict) -> dict:
        name = body.get("name") or body.get("display_name")
        if not name:
            raise ApiError(INVALID, "Pipeline name cannot be empty")
        namespace = body.get("namespace", "")
        if any(p["name"] == name and p.get("namespace", "") == namespace
               for p in self.state.pipelines.values()):  # fmt: skip
            raise ApiError(EXISTS, f"Failed to create a pipeline: {name!r} already exists")
        pipeline = {
            "pipeline_id": str(uuid.uuid4()),
            "name": name,
            "display_name": body.get("display_name") or name,
            "description": body.get("description", ""),
            "namespace": namespace,
            "created_at": _now(),
        }
        self.state.pipelines[pipeline["pipeline_id"]] = pipeline
        return pipeline

    def _upload_version(self, q: dict[str, str], parts: dict) -> dict:
        upload = parts.get("uploadfile")
        if not upload:
            raise ApiError(INVALID, "Failed to create a pipeline version")
        pipeline_id = q.get("pipelineid", "")
        if not pipeline_id or pipeline_id not in self.state.pipelines:
            raise ApiError(INVALID, "Failed to create a pipeline version")
        try:
            docs = [d for d in yaml.safe_load_all(upload["content"]) if d]
        except yaml.YAMLError:
            raise ApiError(INVALID, "Failed to create a pipeline version") from None
        if not docs or "pipelineInfo" not in docs[0] or "root" not in docs[0]:
            raise ApiError(INVALID, "Failed to create a pipeline version: not a pipeline spec")
        name = q.get("name") or q.get("display_name") or upload["filename"]
        if any(v["name"] == name and v["pipeline_id"] == pipeline_id
               for v in self.state.versions.values()):  # fmt: skip
            raise ApiError(EXISTS, "Failed to create a pipeline version")
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": str(uuid.uuid4()),
            "name": name,
            "display_name": q.get("display_name") or name,
            "description": q.get("description", ""),
            "created_at": _now(),
            "pipeline_spec": docs[0],
            "platform_spec": docs[1] if len(docs) > 1 else None,
        }
        self.state.versions[version["pipeline_version_id"]] = version
        return {k: v for k, v in version.items() if k != "platform_spec"}

    def _create_experiment(self, body: dict) -> dict:
        name = body.get("display_name")
        if not name:
            raise ApiError(INVALID, "Experiment must have a non-empty name")
        namespace = body.get("namespace", "")
        if any(e["display_name"] == name and e.get("namespace", "") == namespace
               for e in self.state.experiments.values()):  # fmt: skip
            raise ApiError(EXISTS, f"Failed to create a new experiment: {name!r} already exists")
        experiment = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": name,
            "description": body.get("description", ""),
            "namespace": namespace,
            "created_at": _now(),
            "storage_state": "AVAILABLE",
        }
        self.state.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _version_of(self, body: dict) -> dict:
        ref = body.get("pipeline_version_reference") or {}
        version = self.state.versions.get(ref.get("pipeline_version_id", ""))
        if version is None:
            raise ApiError(NOT_FOUND, f"Pipeline version {ref.get('pipeline_version_id')} "
                                      "not found")  # fmt: skip
        return version

    def _experiment_of(self, body: dict) -> str:
        experiment = body.get("experiment_id") or ""
        if experiment and experiment not in self.state.experiments:
            raise ApiError(NOT_FOUND, f"Experiment {experiment} not found")
        return experiment

    def _create_recurring_run(self, body: dict) -> dict:
        if not body.get("display_name"):
            raise ApiError(INVALID, "Recurring run's name cannot be empty")
        trigger = body.get("trigger")
        if not trigger:
            raise ApiError(INVALID, "API Trigger cannot be nil")
        max_concurrency = int(body.get("max_concurrency") or 0)
        if not 1 <= max_concurrency <= 10:
            raise ApiError(INVALID, "Max concurrency of a recurring run must be at least 1 and "
                                    f"at most 10. Received {max_concurrency}")  # fmt: skip
        cron = (trigger.get("cron_schedule") or {}).get("cron")
        if cron is not None and not _cron_ok(cron):
            raise ApiError(INVALID, "Schedule cron is not a supported format")
        experiment = self._experiment_of(body)
        version = self._version_of(body)
        parameters = (body.get("runtime_config") or {}).get("parameters") or {}
        _check_parameters(version["pipeline_spec"], parameters)
        enabled = body.get("mode", "ENABLE") == "ENABLE"
        run = {
            "recurring_run_id": str(uuid.uuid4()),
            "display_name": body["display_name"],
            "description": body.get("description", ""),
            "pipeline_version_reference": body["pipeline_version_reference"],
            "runtime_config": {"parameters": parameters},
            "service_account": body.get("service_account", ""),
            "max_concurrency": str(max_concurrency),
            "trigger": trigger,
            "mode": "ENABLE" if enabled else "DISABLE",
            "status": "ENABLED" if enabled else "DISABLED",
            "no_catchup": bool(body.get("no_catchup")),
            "namespace": self.state.experiments.get(experiment, {}).get("namespace", ""),
            "experiment_id": experiment,
            "created_at": _now(),
            "updated_at": _now(),
        }
        self.state.recurring_runs[run["recurring_run_id"]] = run
        return run

    def _create_run(self, body: dict) -> dict:
        experiment = self._experiment_of(body)
        version = self._version_of(body)
        parameters = (body.get("runtime_config") or {}).get("parameters") or {}
        _check_parameters(version["pipeline_spec"], parameters)
        run = {
            "run_id": str(uuid.uuid4()),
            "display_name": body.get("display_name", ""),
            "experiment_id": experiment,
            "pipeline_version_reference": body["pipeline_version_reference"],
            "runtime_config": {"parameters": parameters},
            "service_account": body.get("service_account", ""),
            "state": "PENDING",
            "created_at": _now(),
            "storage_state": "AVAILABLE",
        }
        self.state.runs[run["run_id"]] = run
        return run


@contextlib.contextmanager
def kfp_api_standin(multi_user: bool = False) -> Iterator[tuple[str, KfpApiState]]:
    """Serve the stand-in on a free port of 127.0.0.1; yield (its URL, its state)."""
    state = KfpApiState(multi_user=multi_user)
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
