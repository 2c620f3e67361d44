"""Training metrics pushed to a real Pushgateway process (Debian's prometheus-pushgateway)."""

from __future__ import annotations

import shutil
import urllib.request

import pytest
from local_servers import free_port, local_server

from lumos.training.monitoring import TrainingMetrics
from lumos.training.train import train

PUSHGATEWAY = shutil.which("prometheus-pushgateway")


@pytest.fixture()
def pushgateway_url():
    if PUSHGATEWAY is None:
        pytest.skip(
            "prometheus-pushgateway is not installed (apt-get install prometheus-pushgateway)"
        )
    # Debian's build persists metrics to /var/lib/prometheus by default: each test's gateway
    # must start empty, not with what earlier runs pushed.
    command = [PUSHGATEWAY, "--web.listen-address=127.0.0.1:{port}", "--persistence.file="]
    with local_server(lambda port: [c.format(port=port) for c in command], "/-/ready") as url:
        yield url


def _gauges(url: str) -> dict[str, tuple[str, float]]:
    """The lumos_train_* samples on the gateway: name -> (label text, value)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("lumos_train_"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            found[name] = (labels, float(value))
    return found


def test_training_pushes_its_metrics(pushgateway_url, images_features, tmp_path, tiny_config):
    cfg = tiny_config(steps=3, log_every=1, pushgateway_url=pushgateway_url)
    result = train(cfg, images_features, str(tmp_path / "run"))

    gauges = _gauges(pushgateway_url)
    labels, step = gauges["lumos_train_step"]
    assert step == 3.0
    assert 'head="i2i"' in labels and 'job="lumos-train"' in labels and "run=" in labels
    assert gauges["lumos_train_loss"][1] == pytest.approx(result.final_loss, rel=1e-6)
    assert gauges["lumos_train_images_per_second"][1] > 0
    assert gauges["lumos_train_gpu_memory_bytes"][1] == 0.0  # CPU run


def test_an_unreachable_gateway_is_a_warning_not_an_error():
    metrics = TrainingMetrics(
        run="r", head="i2i", pushgateway_url=f"http://127.0.0.1:{free_port()}"
    )
    metrics.update(step=1, loss=0.5, images_per_second=10.0)
    with pytest.warns(RuntimeWarning, match="could not push training metrics"):
        assert metrics.push() is False
    assert metrics.push_failures == 1
