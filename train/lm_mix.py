"""The pretraining-LM term of post-training (InstructGPT's PPO-ptx, Ouyang et al. 2022, section 3.5): every optimizer
step of SFT and GRPO also takes the pretraining loss on a batch of the data stage's packed `train` shards,

    loss = post-training loss + lm_mix * pretraining loss(batch of `lm_batch_size` packed windows)

so the model keeps what pretraining taught it (code, prose) while it learns the reasoning format. Without it, SFT on
reasoning traces alone overwrites the code model (`bench/code_retention.py` measures held-out code bits per byte
before and after post-training). DeepSeek-V3's post-training reaches the same end by mixing domains in its SFT data;
the PPO-ptx term needs no new data and one knob.

    lm = LMMix.build(paths["lm_shards"], s.lm_mix, s.lm_batch_size, model, seed) if s.lm_mix > 0 else None
    ...post-training backward...
    lm_ce, load_LE = lm.backward(model, step, precision)   # adds lm_mix * grad of the LM loss; its CE, loads

The pretraining loss is the model's own objective (next-token CE + MTP + balance, as in pretraining; plain logits,
no rollout temperature); `lm_loss` in the metrics is its next-token CE. The batch of step s is the loader's global
stream at position s * lm_batch_size (`data.loader.ShardLoader`, seeded by the run seed): a pure function of the
step, so a resumed run reads the same batches without saving loader state. Windows are the packed sequence length,
capped by the model's context.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from data.loader import PackedDataset, ShardLoader
from train.runtime import autocast


class LMMix:
    """Batches of pretraining windows and the weighted backward of their loss (see the module docstring)."""

    def __init__(self, loader: ShardLoader, weight: float) -> None:
        self.loader, self.weight = loader, weight

    @classmethod
    def build(cls, shard_dir: Path, weight: float, batch_size: int, model: nn.Module, seed: int) -> LMMix:
        packed = PackedDataset(shard_dir)
        seq_len = min(packed.seq_len, int(model.config.max_position_embeddings))
        return cls(ShardLoader(PackedDataset(shard_dir, seq_len), batch_size, seed=seed), weight)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """(inputs_BT, targets_BT) of optimizer step `step` (host tensors)."""
        self.loader.state.consumed = step * self.loader.batch_size
        return next(self.loader)

    def backward(self, model: nn.Module, step: int, precision: str) -> tuple[Tensor, Tensor]:
        """Backward of `weight` x the pretraining loss on step `step`'s batch, accumulated into the gradients.
        Returns its next-token CE (detached, 0-dim, on the device) and the per-layer expert loads [L_moe, E]."""
        device = next(model.parameters()).device
        x_BT, y_BT = self.batch(step)
        with autocast(precision, device):
            out = model(x_BT.to(device), y_BT.to(device))
        (self.weight * out.loss).backward()
        return out.ce_loss.detach(), out.expert_load_LE.detach().float()
