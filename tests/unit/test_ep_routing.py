"""Node-limited routing mapped onto EP ranks (train/parallel/expert_parallel.py), without processes: with the real
router (model.router.MoEGate), group-limited top-k bounds the number of distinct EP ranks a token is sent to.
The all-to-all path itself is tested on 4 gloo ranks in tests/dist/test_expert_parallel.py."""

import pytest
import torch

from model.config import ModelConfig
from model.router import MoEGate
from train.parallel.expert_parallel import max_ranks_per_token, ranks_per_token


def gate(n_group: int, topk_group: int, topk_method: str = "noaux_tc") -> MoEGate:
    cfg = ModelConfig(
        hidden_size=64,
        n_routed_experts=32,
        num_experts_per_tok=8,
        n_group=n_group,
        topk_group=topk_group,
        topk_method=topk_method,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return MoEGate(cfg)


@pytest.mark.parametrize("ep,bound", [(8, 2), (4, 2), (16, 4), (32, 8)])
def test_group_limited_routing_bounds_ranks_per_token(ep: int, bound: int) -> None:
    # 32 experts in 8 groups of 4; a token takes its top-8 from at most 2 groups. ep=8: one group per rank -> at
    # most 2 ranks; ep=4: two groups per rank -> still 2; ep=16: a group spans 2 ranks -> 4; ep=32: one expert per
    # rank -> 2 groups x 4 experts = 8 ranks (the same as K: no saving).
    x_ND = torch.randn(4096, 64, generator=torch.Generator().manual_seed(1))
    topk_idx_NK, _, _ = gate(8, 2)(x_ND)
    n_ranks_N = ranks_per_token(topk_idx_NK, 32, ep)
    limit = max_ranks_per_token(32, 8, 2, 8, ep)
    assert limit == bound
    assert int(n_ranks_N.max()) <= limit, f"a token visited {int(n_ranks_N.max())} ranks, bound {limit}"
    assert int(n_ranks_N.max()) == limit, "the bound should be reached by some token (it is tight)"


def test_without_group_limit_tokens_visit_more_ranks() -> None:
    x_ND = torch.randn(4096, 64, generator=torch.Generator().manual_seed(1))
    limited = ranks_per_token(gate(8, 2)(x_ND)[0], 32, 8)
    free = ranks_per_token(gate(8, 2, topk_method="greedy")(x_ND)[0], 32, 8)
    assert max_ranks_per_token(32, 8, 8, 8, 8) == 8
    assert limited.max() <= 2 < free.max(), (limited.max(), free.max())
    assert free.float().mean() > limited.float().mean(), (free.float().mean(), limited.float().mean())


def test_ranks_per_token_by_hand() -> None:
    topk_idx_NK = torch.tensor([[0, 1, 2, 3], [0, 4, 8, 12], [15, 14, 3, 0]])  # 16 experts on 4 ranks of 4
    assert ranks_per_token(topk_idx_NK, 16, 4).tolist() == [1, 4, 2]
    with pytest.raises(ValueError, match="must both divide"):
        max_ranks_per_token(16, 3, 1, 4, 4)
