"""FSDP2 on CPU processes: the toolkit shards with torch's `fully_shard` where accelerate will not.

`accelerate launch --config_file recipes/accelerate/fsdp.yaml` with `ACCELERATE_USE_CPU=true` starts the processes
and joins them in one gloo group, and exports the recipe's FSDP settings (ACCELERATE_USE_FSDP, FSDP_VERSION, ...),
but accelerate (1.10 to 1.16) turns FSDP on only for accelerator processes: on CPUs its state stays MULTI_CPU and
`prepare` would wrap the model in DDP. Rather than patch accelerate's internals, the loop wraps its Accelerator in
`CpuFsdp2`, which does what accelerate's FSDP2 path does on GPUs, with torch's public API:

- every module named by `_no_split_modules` (the decoder and encoder layers; accelerate's TRANSFORMER_BASED_WRAP)
  is a shard unit, then the whole model; parameters are resharded after the forward as the launch config says;
- the optimizer is switched to the sharded parameters; gradient clipping takes the norm over all shards;
- checkpoints hold the sharded model and optimizer state (torch.distributed.checkpoint, one file per process)
  beside accelerate's per-process RNG states; the final state dict is gathered in full on the main process.

Everything else (process group, reductions, barriers, RNG states, trackers) stays the accelerator's.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from torch import nn

from .errors import UptrainError

SHARDED_STATE = "sharded_state"  # the checkpoint's subfolder of torch.distributed.checkpoint files


def launched_with_fsdp() -> bool:
    """True in a process started by `accelerate launch` with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def broadcast_from_main(module: nn.Module) -> nn.Module:
    """Give every process the main process's weights. Under an FSDP launch with fsdp_cpu_ram_efficient_loading
    (the shipped config), transformers reads the weights on each node's first process only and fills the others with
    zeros, for FSDP's prepare to broadcast; a model that is not prepared (the distillation teacher), or one the
    toolkit shards itself, needs this broadcast."""
    efficient = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true"
    if launched_with_fsdp() and efficient and torch.distributed.is_initialized():
        for tensor in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)
    return module


def for_this_launch(accelerator):
    """The accelerator itself, or `CpuFsdp2` around it when FSDP was asked for but accelerate runs the processes
    as plain multi-CPU ones."""
    if not (launched_with_fsdp() and accelerator.distributed_type == DistributedType.MULTI_CPU):
        return accelerator
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UptrainError(f"the accelerate config asks for FSDP version {version}; on CPU processes the toolkit "
                           "shards with FSDP2 only: set fsdp_version: 2 (as recipes/accelerate/fsdp.yaml does)")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        raise UptrainError(f"the accelerate config's fsdp_auto_wrap_policy is {policy}; on CPU processes the toolkit "
                           "shards layer by layer only: set TRANSFORMER_BASED_WRAP (as recipes/accelerate/fsdp.yaml "
                           "does)")
    return CpuFsdp2(accelerator)


def check_optimizer(accelerator, optimizer: str) -> None:
    """Refuse an optimizer that cannot step FSDP2's sharded parameters, before anything is written."""
    if optimizer == "adafactor" and getattr(accelerator, "is_fsdp2", False):
        raise UptrainError("train.optimizer: adafactor cannot step FSDP2's sharded parameters (transformers' "
                           "Adafactor mixes plain tensors into DTensor updates); use train.optimizer=adamw with "
                           "FSDP, or launch with DDP (recipes/accelerate/ddp.yaml)")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one: the classes FSDP_TRANSFORMER_CLS_TO_WRAP names, else the model's
    `_no_split_modules` (its layers), as accelerate's TRANSFORMER_BASED_WRAP picks them."""
    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    classes = {c.strip() for c in named.split(",")} if named else set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in classes]
    if not units:
        raise UptrainError(f"FSDP finds no layer to shard in this {model.config.model_type} model (looked for "
                           f"{sorted(classes) or 'its _no_split_modules'}); name its layer class in the accelerate "
                           "config's fsdp_transformer_layer_cls_to_wrap")
    return units


class CpuFsdp2:
    """The accelerator, with the calls that FSDP2 changes done by torch's `fully_shard` (see the module's doc)."""

    is_fsdp2 = True

    def __init__(self, accelerator):
        self._accelerator = accelerator

    def __getattr__(self, name):
        return getattr(self._accelerator, name)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("true", "full_shard")
        precision = MixedPrecisionPolicy()
        if self._accelerator.mixed_precision == "bf16":
            precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        broadcast_from_main(model)
        names = {id(p): n for n, p in model.named_parameters()}
        for unit in shard_units(model):
            fully_shard(unit, reshard_after_forward=reshard, mp_policy=precision)
        fully_shard(model, reshard_after_forward=reshard, mp_policy=precision)
        # fully_shard replaced every parameter by a sharded one: the optimizer now steps those
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        self._model, self._optimizer = model, optimizer  # what checkpoints hold
        print(self.holding(model), file=sys.stderr)
        return model, optimizer

    def holding(self, model: nn.Module) -> str:
        """One line saying what this process holds: its shard of every parameter, read from the DTensors."""
        from torch.distributed.tensor import DTensor

        params = list(model.parameters())
        sharded = [p for p in params if isinstance(p, DTensor)]
        local = sum(p.to_local().numel() for p in sharded)
        total = sum(p.numel() for p in params)
        return (f"FSDP2 on CPU process {self._accelerator.process_index} of {self._accelerator.num_processes}: "
                f"{len(sharded)} of {len(params)} parameters are sharded DTensors; this process holds {local:,} of "
                f"their {total:,} values")

    def no_sync(self, model):
        """Gradients reduce-scatter only on the last micro-step of a step (accelerate's FSDP2 does the same)."""

        @contextlib.contextmanager
        def unsynced():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return unsynced()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole (sharded) gradient; returns that norm, the same on every process."""
        from torch.distributed.tensor import DTensor

        parameters = [p for p in parameters if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        if isinstance(total, DTensor):
            total = total.full_tensor()  # the norms of the local shards combined over the processes
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        return total

    def save_state(self, path: str) -> None:
        """accelerate's RNG states of every process, then the sharded model and optimizer."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self._accelerator.save_state(path)
        model_state, optimizer_state = get_state_dict(self._model, self._optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=Path(path) / SHARDED_STATE)

    def load_state(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (Path(path) / SHARDED_STATE).is_dir():
            raise FileNotFoundError(f"no {SHARDED_STATE} folder (a checkpoint of a run that was not sharded)")
        self._accelerator.load_state(path)
        model_state, optimizer_state = get_state_dict(self._model, self._optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=Path(path) / SHARDED_STATE)
        set_state_dict(self._model, self._optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def get_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full state dict on the main process (gathered from the shards, on the CPU); empty on the others."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # gathering copies tied weights apart; tie them again so that save_pretrained writes each once
        first: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            original = first.setdefault(id(param), name)
            if original != name and original in state and name in state:
                state[name] = state[original]
        return state

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model  # fully_shard changes the model in place
