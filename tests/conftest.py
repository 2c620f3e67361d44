"""Shared fixtures. The S3 server is a real HTTP server process (moto's), on 127.0.0.1."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from local_servers import local_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start `moto_server` as a separate process for the whole session; yield its endpoint URL."""
    exe = str(Path(sys.executable).with_name("moto_server"))
    with local_server(lambda port: [exe, "-H", "127.0.0.1", "-p", str(port)]) as url:
        yield url


@pytest.fixture()
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment a Kubernetes secret would provide: endpoint and credentials."""
    env = {
        "LUMOS_S3_ENDPOINT": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "LUMOS_S3_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture()
def s3_bucket(s3_env: dict[str, str]) -> str:
    """A fresh, empty bucket on the test server; yields its name."""
    from minio import Minio

    endpoint = s3_env["LUMOS_S3_ENDPOINT"].removeprefix("http://")
    client = Minio(endpoint, access_key="testing", secret_key="testing", secure=False)
    name = f"lumos-test-{uuid.uuid4().hex[:12]}"
    client.make_bucket(name)
    return name
