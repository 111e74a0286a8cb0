"""Context parallelism: one attention over a sequence sharded across the ranks of a torch.distributed group.

``shard`` / ``unshard`` cut the sequence axis into this rank's piece and gather it back;
``ring_attention`` passes K/V blocks around the ring (P2P, overlapped with the blocks' attention,
merged by LSE, dK/dV passed around in the backward); ``ulysses_attention`` swaps the sequence split
for a head split with two all-to-alls and attends the whole sequence locally;
``tiled_allreduce_attention_output`` is FastAttention's tiling all-reduce for tensor-parallel attention
(the output projection's all-reduce issued tile by tile); ``attention_host_kv`` streams K/V kept in pinned host
memory to one GPU in double-buffered chunks, merged by LSE (no process group). gloo on CPUs, NCCL on GPUs;
docs/distributed.md says what each costs and when each wins. Importing this package imports torch
(``import portattn`` does not).
"""

from .merge import merge
from .offload import attention_host_kv
from .ring import ring_attention
from .sharding import SHARDINGS, shard, unshard
from .tensor_parallel import tiled_allreduce_attention_output
from .ulysses import ulysses_attention

__all__ = ["SHARDINGS", "attention_host_kv", "merge", "ring_attention", "shard", "tiled_allreduce_attention_output", "ulysses_attention",
           "unshard"]
