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
    import json, os, signal, sys
    import lumos.training.train as loop
    from lumos.configs.training import TrainConfig
    from lumos.training.train import train

    # LUMOS_TEST_SIGTERM=rank:step: that process sends itself SIGTERM during that step (as
    # Kubernetes would, preempting its node), before the step's EMA update.
    if os.environ.get("LUMOS_TEST_SIGTERM"):
        rank, at_step = map(int, os.environ["LUMOS_TEST_SIGTERM"].split(":"))
        update_ema, calls = loop.update_ema, []

        def update_ema_then_signal(*args):
            calls.append(1)
            if int(os.environ["RANK"]) == rank and len(calls) == at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            update_ema(*args)

        loop.update_ema = update_ema_then_signal
    result = train(TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], sys.argv[3])
    if os.environ["RANK"] == "0":
        print("RESULT " + result.model_dump_json())
    """
)


def launch(
    tmp_path, cfg: dict, dataset: str, out: str, timeout_s: float = 300, nodes: int = 1,
    node_env: list[dict[str, str]] | None = None,
) -> dict:  # fmt: skip
    """Train with `cfg` on 2 processes; rank 0's TrainResult as a dict. `nodes=2` starts them
    as two nodes of one process each (two torchrun agents on this machine, as a TrainJob's
    nodes), `node_env` adding each node's environment."""
    outputs = run_processes(tmp_path, cfg, dataset, out, timeout_s, nodes, node_env)
    for returncode, _, stderr in outputs:
        assert returncode == 0, stderr[-3000:]
    line = next(x for x in outputs[0][1].splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def run_processes(
    tmp_path, cfg: dict, dataset: str, out: str, timeout_s: float = 300, nodes: int = 1,
    node_env: list[dict[str, str]] | None = None,
) -> list[tuple[int, str, str]]:  # fmt: skip
    """`launch`'s run: each torchrun agent's (returncode, stdout, stderr), whatever they are."""
    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    per_node = ["--nproc_per_node", str(2 // nodes), "--nnodes", str(nodes)]
    procs = []
    # A session of its own, so that a run past its time limit takes its workers down with it.
    for node in range(nodes):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", *per_node, "--node_rank", str(node),
            "--master_addr", "127.0.0.1", "--master_port", port,
            str(script), json.dumps(cfg), dataset, out,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**env, **(node_env[node] if node_env else {})},
                start_new_session=True,
            )  # fmt: skip
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout_s))
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        raise
    return [
        (p.returncode, stdout, stderr) for p, (stdout, stderr) in zip(procs, outputs, strict=True)
    ]


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
