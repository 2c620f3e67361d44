"""Launch `train()` in two processes with torch.distributed.run on CPUs (gloo): the multi-GPU
code paths (DDP, FSDP) as far as they can run without GPUs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import torch
from local_servers import free_port

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from lumos.training.train import TrainConfig, train

    result = train(TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], sys.argv[3])
    if os.environ["RANK"] == "0":
        print("RESULT " + result.model_dump_json())
    """
)


def launch(tmp_path, cfg: dict, dataset: str, out: str, timeout_s: float = 300) -> dict:
    """Train with `cfg` on 2 processes; rank 0's TrainResult as a dict."""
    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), str(script), json.dumps(cfg), dataset, out,
    ]  # fmt: skip
    # A session of its own, so that a run past its time limit takes its workers down with it.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def assert_resumed_exactly(full: dict, first: dict, second: dict) -> None:
    """A run stopped after `first` and resumed as `second` logged exactly `full`'s losses."""
    assert second["resumed_from"] == first["checkpoint_uri"]
    resumed = [loss for _, loss in first["losses"] + second["losses"]]
    expected = [loss for _, loss in full["losses"]]
    torch.testing.assert_close(
        torch.tensor(resumed, dtype=torch.float64),
        torch.tensor(expected, dtype=torch.float64),
        rtol=1e-6,
        atol=1e-9,
    )
