"""Building the transformer for training: on the meta device, sharded per layer when asked.

The paper trained its 12B transformer on 1024 GPUs with its parameters sharded across
the GPUs of a machine (section 2.5, figure 5). dalle1 shards them with PyTorch's FSDP2
(``fully_shard``) through Lightning's ``ModelParallelStrategy`` — ``train.strategy: fsdp``:

* **Cheap construction.** :func:`build_dalle` makes the model on the meta device (shapes,
  no memory) and materialises it one unit at a time — an embedding, a layer, a head —
  with ``to_empty`` and the constructors' own initialisation
  (:func:`dalle1.transformer.init_weights`), in the order the constructor would have
  drawn it, from a generator seeded with ``train.seed``. Each layer is sharded right
  after it is materialised, so a rank never holds more than one full layer (plus the
  embeddings and heads until the root is sharded): the 12B model is never whole on a
  rank. The same order makes a sharded model's weights equal to a single-process one's.
* **One FSDP unit per layer**, the root unit holding the embeddings, the final norm and
  the heads. ``bf16-mixed`` gathers the parameters in bfloat16 and reduces the
  gradients in float32; the sharded parameters, their gradients and AdamW's moments
  stay float32 (the master weights).
* **Activation checkpointing per layer** (``train.activation_checkpointing``), with
  torch's composable ``checkpoint``, which keeps the parameter names (checkpoints and
  model folders look the same with it on or off).
* **Sharded checkpoints**: Lightning writes each checkpoint as a torch.distributed.checkpoint
  folder (one file per rank; ``last.ckpt`` links to the newest); ``--resume`` reads it
  back, re-sharded if the number of GPUs changed. :func:`gathered_model` collects the
  full weights for the model folder.

Why ``ModelParallelStrategy`` and not Lightning's ``FSDPStrategy``: ``FSDPStrategy``
wraps PyTorch's first FSDP (flat parameters), which PyTorch has superseded by FSDP2
(per-parameter DTensor shards, the path torchtitan keeps); its meta-device
materialisation calls ``reset_parameters`` module by module on a CUDA device, which
x-transformers' LayerNorm lacks; and it refuses CPU accelerators, so it could not even be
tested here. ``ModelParallelStrategy`` hands the model to ``configure_model`` to be
parallelised there, and saves and loads DCP checkpoints itself.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..config import DALLEConfig
from ..planning import low_precision
from ..transformer import DALLE, StreamShape, init_weights


class ShardedDataParallel(ModelParallelStrategy):
    """``train.strategy: fsdp``: FSDP2 over every device of every node (no tensor
    parallelism), sharded DCP checkpoints. The model is sharded in ``configure_model``."""

    def __init__(self, **kwargs):
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=True, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank one shard
        super().setup_environment()


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """16-bit Lightning precisions gather bfloat16 parameters and reduce float32 gradients."""
    if low_precision(precision):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def build_dalle(
    cfg: DALLEConfig,
    shape: StreamShape,
    device: torch.device,
    seed: int,
    mesh=None,
    precision: str = "32-true",
    activation_checkpointing: bool = False,
) -> DALLE:
    """The transformer, built on the meta device and materialised on ``device`` unit by unit.

    With a device ``mesh`` every layer becomes one FSDP2 unit (and the rest the root
    unit); without one the model is whole on ``device``. The weights are a function of
    ``seed`` alone (the global RNG is left as it was), equal with and without a mesh.
    """
    with torch.device("meta"):
        model = DALLE(cfg, shape)
    policy = mixed_precision(precision)
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        for name, child in model.named_children():  # the constructor's order
            for unit in child if name == "layers" else [child]:
                unit.to_empty(device=device)
                init_weights(unit)
                if name != "layers":
                    continue
                if activation_checkpointing:
                    checkpoint(unit)
                if mesh is not None:
                    fully_shard(unit, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device, recurse=False)
    model.reset_parameters()  # the root's own state: the mask buffers
    if mesh is not None:
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def reshard(model: torch.nn.Module | None) -> None:
    """Free the gathered parameters of every FSDP2 unit of ``model`` (no-op unsharded).

    The root unit keeps its parameters gathered after a forward, expecting a backward; a
    validation pass has none, so without this the next checkpoint and the end of training
    would see whole parameters instead of shards."""
    for unit in model.modules() if model is not None else ():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def gathered_model(model: DALLE, rank: int) -> DALLE | None:
    """The full model as a plain CPU :class:`DALLE`: on rank 0 for a sharded model (every
    rank must call this: the weights are gathered collectively), None on other ranks; an
    unsharded model is returned as it is."""
    if not is_sharded(model):
        return model
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)  # rank 0 holds it, the others {}
    if rank != 0:
        return None
    for name in list(state):  # own storage each: the gathered tensors can be views of one
        state[name] = state[name].clone()
    with torch.device("meta"):
        plain = DALLE(model.cfg, model.shape, model.kinds)
    plain.load_state_dict(state, assign=True)  # the mask buffers were made on the CPU
    return plain
