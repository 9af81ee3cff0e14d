"""Expert parallelism, the autograd all-to-all and the device mesh on 4 gloo ranks, against single-process references.

One torchrun launch (tests/dist/ep_worker.py) runs every check and writes a JSON report; each test below asserts one
entry, so a failure names its check and shows the worker's traceback or error figures.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("ep_worker.py")
CHECKS = [
    "a2a_sync_None",
    "a2a_sync_bfloat16",
    "a2a_sync_fp8",
    "a2a_async_None",
    "a2a_async_fp8",
    "mesh",
    "ep_moe_ep4",
    "ep_moe_ep2",
    "ep_moe_ep4_fp8_dispatch",
    "ep_moe_ep2_bf16_combine",
    "ep_moe_ep4_capacity",
    "ep_moe_ep4_bf16_params",
    "apply_expert_parallel",
    "model_ep4",
    "fsdp_ep_ep2",
    "hsdp_ep_ep2",
    "dcp_ep4_to_ep2",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ep") / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and out.exists(), f"worker failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("check", CHECKS)
def test_check(report: dict, check: str) -> None:
    assert check in report, f"{check} did not run"
    entry = report[check]
    assert entry["ok"], "\n---\n".join(str(d) for d in entry["detail"])
