"""data.executor=slurm: the stage's chain goes through datatrove's real SlurmPipelineExecutor (sbatch scripts,
job arrays, dependencies, pickled pipelines) to a stand-in Slurm on this machine that runs each submitted array at
once; the outputs are the ones the local executor writes."""

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from data.outputs import stage_outputs
from data.prepare import run
from pipeline.io import hash_path
from tests.unit.test_data_prepare import make_cfg

pytestmark = pytest.mark.slow

SBATCH = r"""#!/usr/bin/env python3
# stand-in sbatch: runs every task of the submitted array now, in order, then prints the job id like sbatch
import os, re, subprocess, sys
state = os.environ["FAKE_SLURM_STATE"]
args, script = sys.argv[1:-1], sys.argv[-1]
text = open(script).read()
ids = os.path.join(state, "last_id")
job = int(open(ids).read()) + 1 if os.path.exists(ids) else 1
open(ids, "w").write(str(job))
deps = [a.split(":", 1)[1] for a in args if a.startswith("--dependency=")]
failed = open(os.path.join(state, "failed")).read().split() if os.path.exists(os.path.join(state, "failed")) else []
m = re.search(r"#SBATCH --array=0-(\d+)", text)
env = dict(os.environ, SLURM_NODELIST="localhost", SLURM_JOB_ID=str(job))
for a in args:
    if a.startswith("--export=ALL,"):
        env.update(kv.split("=", 1) for kv in a[len("--export=ALL,"):].split(","))
if not any(d.split(":")[-1] in failed for d in deps):  # afterok: a failed dependency stops the job
    for i in range(int(m.group(1)) + 1 if m else 1):
        r = subprocess.run(["bash", script], env=dict(env, SLURM_ARRAY_TASK_ID=str(i)), capture_output=True, text=True)
        with open(os.path.join(state, f"job_{job}_{i}.log"), "w") as f:
            f.write(r.stdout + r.stderr)
        if r.returncode:
            open(os.path.join(state, "failed"), "a").write(f"{job}\n")
print(f"Submitted batch job {job}")
"""
SRUN = """#!/bin/bash
# stand-in srun: run the command after the options
while [[ "$1" == -* ]]; do if [[ "$1" == "-n" ]]; then shift; fi; shift; done
exec "$@"
"""
SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] && echo localhost
exit 0
"""
SQUEUE = "#!/bin/bash\nexit 0\n"  # every job has ended by the time anyone asks


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir, state = tmp_path / "fakebin", tmp_path / "slurm_state"
    bin_dir.mkdir()
    state.mkdir()
    for name, body in (("sbatch", SBATCH), ("srun", SRUN), ("scontrol", SCONTROL), ("squeue", SQUEUE)):
        p = bin_dir / name
        p.write_text(body)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    venv_bin = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", f"{bin_dir}:{venv_bin}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_STATE", str(state))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    return state


def test_slurm_executor_writes_the_local_outputs(tmp_path, fake_slurm):
    local = make_cfg(tmp_path, name="local")
    local.data.num_proc = 2
    run(local)
    cfg = make_cfg(tmp_path, name="slurm")
    cfg.data.executor, cfg.data.tasks, cfg.data.num_proc = "slurm", 2, 1
    cfg.data.slurm.partition, cfg.data.slurm.poll_s = "cpu", 0.1
    metrics = run(cfg)
    jobs = sorted(p.name for p in fake_slurm.glob("job_*.log"))
    assert not (fake_slurm / "failed").exists(), [(p.name, p.read_text()[-2000:]) for p in fake_slurm.glob("job_*")]
    assert len(jobs) >= 2 * 8  # eight stages, each with its merge_stats job, arrays of several tasks
    a = stage_outputs(tmp_path / "outputs" / "local" / "data")
    b = stage_outputs(tmp_path / "outputs" / "slurm" / "data")
    for name in ("train", "val", "tokenizer"):
        assert hash_path(a[name]) == hash_path(b[name]), name
    sa, sb = (json.loads(x["stats"].read_text()) for x in (a, b))
    assert sa["removed"] == sb["removed"] and metrics["documents_kept"] == sa["documents_kept"]
