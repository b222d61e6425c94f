"""What a sharded item table is, before TorchRec is imported: the choices each backend can run,
the memory a table costs per process, and the sharding plan as the registry stores it.

Kept free of TorchRec so that config checks, the memory estimate and reading a sharded version
work without the `recloop[sharded]` extra.
"""

from __future__ import annotations

from recloop.config import TrainConfig
from recloop.errors import ConfigError
from recloop.registry.shards import ShardingPlan, TableShard

__all__ = ["ShardingPlan", "TableShard"]

# The name of the table inside the EmbeddingCollection, and of its one feature. ("items"
# would collide with ModuleDict.items.)
TABLE_NAME = "item_table"
FEATURE_NAME = "item"

# TorchRec's fused optimizers that fbgemm's CPU kernels implement; the CUDA kernels add Adam.
# (fbgemm-gpu-cpu 1.8.0 raises "Optimizer adam is not supported in CPU mode".)
OPTIMIZERS_BY_DEVICE = {"cpu": ("rowwise_adagrad",), "cuda": ("rowwise_adagrad", "adam")}

# The full softmax scores every item at every step, so a sharded run looks the whole table up
# through the all-to-all each step, and its cost grows with the catalogue: bench/scale.py
# --loss full_softmax measured 23,284 tokens/s at 10k items, 4,307 at 50k and 829 at 200k
# (2 processes; 85,409 for the sampled softmax at 200k: bench/results/scale-full-softmax.json,
# scale-sampled-small.json). Above this it is refused: use train.loss = "sampled_softmax".
FULL_SOFTMAX_MAX_ITEMS = 200_000

FP32 = 4


def check_sharding(cfg: TrainConfig, num_items: int, device_type: str) -> None:
    """One clear ConfigError, before anything is built, for a sharded run this backend or
    catalogue cannot take."""
    if cfg.sharding == "none":
        return
    optimizers = OPTIMIZERS_BY_DEVICE.get(device_type, ())
    if cfg.sparse_optimizer not in optimizers:
        raise ConfigError(
            f"train.sparse_optimizer = {cfg.sparse_optimizer!r} does not run on {device_type} "
            f"(fbgemm's {device_type} kernels support {', '.join(optimizers) or 'none'})"
        )
    if cfg.loss == "full_softmax" and num_items > FULL_SOFTMAX_MAX_ITEMS:
        raise ConfigError(
            f"train.loss = 'full_softmax' with a sharded table of {num_items:,} items: every "
            f"step would gather the whole table (refused above {FULL_SOFTMAX_MAX_ITEMS:,} "
            "items); use train.loss = 'sampled_softmax'"
        )


def bytes_per_row(dim: int, *, sharded: bool, sparse_optimizer: str = "rowwise_adagrad") -> int:
    """Training memory of one item row, in bytes.

    Replicated (nn.Embedding trained by AdamW): the weight, its dense gradient (autograd
    materialises [rows, dim] every step) and AdamW's two moments: 4 x dim fp32.
    Sharded (TorchRec's fused table): the weight and the optimizer's state only, since the
    update happens inside the backward kernel and no gradient table exists. Row-wise Adagrad
    keeps one fp32 per row; Adam keeps two moments of dim each.
    """
    if not sharded:
        return 4 * dim * FP32
    state = 2 * dim * FP32 if sparse_optimizer == "adam" else FP32
    return dim * FP32 + state
