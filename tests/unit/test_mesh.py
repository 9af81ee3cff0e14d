"""The parallel layout: ParallelConfig as a structured config, the conf/parallel presets, validate_layout's errors
(no processes), and build_mesh on a one-rank gloo group. Multi-rank meshes are checked in tests/dist."""

from pathlib import Path

import pytest
import torch.distributed as dist
from omegaconf import OmegaConf

from train.parallel.config import ParallelConfig
from train.parallel.mesh import ParallelMeshes, build_mesh, validate_layout

PRESETS = sorted((Path(__file__).parents[2] / "conf" / "parallel").glob("*.yaml"))


def test_presets_exist_and_compose() -> None:
    names = {p.stem for p in PRESETS}
    assert {"single", "ddp", "fsdp", "hsdp", "ep", "hsdp_ep"} <= names, names
    for path in PRESETS:
        merged = OmegaConf.merge(OmegaConf.structured(ParallelConfig), OmegaConf.load(path))  # typos fail here
        cfg = OmegaConf.to_object(merged)
        assert isinstance(cfg, ParallelConfig)
        world = 1 if path.stem == "single" else 8
        res = validate_layout(cfg, world, n_routed_experts=16)
        assert res.pp * res.dp_replicate * res.dp_shard == world


@pytest.mark.parametrize(
    "cfg,world,expected",
    [
        (ParallelConfig(dp_shard=-1), 8, (1, 8, 1, 1)),
        (ParallelConfig(dp_replicate=2, dp_shard=-1, ep=2), 8, (2, 4, 2, 1)),
        (ParallelConfig(dp_replicate=-1, dp_shard=2, ep=2), 8, (4, 2, 2, 1)),
        (ParallelConfig(dp_shard=-1, pp=2, ep=4), 8, (1, 4, 4, 2)),
        (ParallelConfig(dp_replicate=1, dp_shard=1), 1, (1, 1, 1, 1)),
    ],
)
def test_validate_resolves_fill(cfg: ParallelConfig, world: int, expected: tuple) -> None:
    res = validate_layout(cfg, world, n_routed_experts=64)
    assert (res.dp_replicate, res.dp_shard, res.ep, res.pp) == expected
    assert cfg.dp_shard == -1 or cfg.dp_replicate == -1 or world == 1, "the input config must not be mutated"


@pytest.mark.parametrize(
    "cfg,world,experts,match",
    [
        (ParallelConfig(dp_shard=3), 4, 16, "does not equal world_size=4"),
        (ParallelConfig(dp_replicate=2, dp_shard=4), 4, 16, "does not equal world_size=4"),
        (ParallelConfig(dp_shard=-1, pp=3), 4, 16, "cannot fill world_size=4"),
        (ParallelConfig(dp_replicate=-1, dp_shard=-1), 4, 16, "at most one"),
        (ParallelConfig(dp_shard=4, ep=3), 4, 16, "ep=3 must divide parallel.dp_shard=4"),
        (ParallelConfig(dp_replicate=2, dp_shard=2, ep=4), 4, 16, "must divide parallel.dp_shard=2"),
        (ParallelConfig(dp_shard=4, ep=4), 4, 6, "must divide n_routed_experts=6"),
        (ParallelConfig(dp_shard=4, ep=0), 4, 16, "parallel.ep must be >= 1"),
        (ParallelConfig(dp_shard=1, fp8_dispatch=True), 1, 16, "fp8_dispatch=true needs parallel.ep > 1"),
        (ParallelConfig(dp_shard=1, bf16_combine=True), 1, 16, "bf16_combine=true needs"),
    ],
)
def test_validate_rejects(cfg: ParallelConfig, world: int, experts: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_layout(cfg, world, n_routed_experts=experts)


def test_dense_model_skips_expert_check() -> None:
    assert validate_layout(ParallelConfig(dp_shard=4, ep=4), 4, n_routed_experts=None).ep == 4


def test_build_mesh_one_rank(tmp_path: Path) -> None:
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = build_mesh(ParallelConfig(dp_shard=-1), 1, "cpu")
        assert mesh.mesh_dim_names == ("pp", "dp_replicate", "dp_shard") and mesh.mesh.numel() == 1
        m = ParallelMeshes.from_mesh(mesh, ep=1)
        assert m.ep.size() == 1 and m.dp.size() == 1 and m.sparse.mesh_dim_names[-1] == "ep"
        with pytest.raises(ValueError, match="world_size=2 but the process group has 1"):
            build_mesh(ParallelConfig(dp_shard=2), 2, "cpu")
        with pytest.raises(ValueError, match="device_type"):
            build_mesh(ParallelConfig(), 1, "tpu")
    finally:
        dist.destroy_process_group()
