"""The SLURM launcher config (conf/hydra/launcher/slurm.yaml) composes with the pretraining config and names the
submitit launcher, and a multi-task SLURM job started by it exports torch.distributed's env:// variables."""

import os

from hydra import compose, initialize_config_dir
from hydra.utils import get_class

import pipeline.config  # noqa: F401  (registers the structured "schema" config)
from pipeline.config import CONF_DIR


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "parallel=hsdp"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert cfg.parallel.dp_replicate == 2


def test_submitit_slurm_task_exports_the_torch_env(monkeypatch):
    from train.parallel.parallelize import world_size_from_env

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "unset")  # recorded, so that what the export writes is undone after the test
        monkeypatch.delenv(k)
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "42",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
    }
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert world_size_from_env() == 4
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"]) == ("3", "1", "gpu07")


def test_plain_process_is_world_1(monkeypatch):
    from train.parallel.parallelize import world_size_from_env

    for k in ("WORLD_SIZE", "SUBMITIT_EXECUTOR", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert world_size_from_env() == 1
