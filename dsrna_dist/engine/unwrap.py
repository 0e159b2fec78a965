"""The one way to reach the plain module inside the wrappers a run puts around it.

Why one helper: checkpoints must hold plain ``state_dict`` keys (no ``module.`` / ``_orig_mod.``
prefix), and the bound engine and the robustness metrics must trace or call the module itself
(DDP's forward would register a gradient reduction that never comes).

Wrappers, outermost first, in any nesting (train.py compiles *before* ``accelerator.prepare``,
so it builds DDP(compiled(net)); accelerate's helper strips a compile wrapper only when it is
outermost, hence the loop):

- torch's own: DistributedDataParallel / DataParallel (``.module``) and torch.compile's
  OptimizedModule (``._orig_mod``), stripped here directly;
- DeepSpeed's engine and FSDP: accelerate's ``extract_model_from_parallel``. Why not it for all:
  it imports ``deepspeed`` whenever that is installed, which costs 1.9 s of CPU and prints an
  accelerator warning in every CPU process on its first DDP unwrap (measured, torch 2.14.1,
  accelerate 1.15.0); a DeepSpeed or FSDP wrapper exists only where that import already happened.

channels_last needs nothing here: it is a memory format of the tensors, not a wrapper module.

Gradients of anything computed on the unwrapped module (bounds, metrics) do not go through
DDP's forward, so DDP does not all-reduce them: reduce them explicitly
(see notes/distributed-on-cpu.md).
"""
from __future__ import annotations

from torch import nn

_ACCELERATE_WRAPPERS = ("DeepSpeedEngine", "FullyShardedDataParallel")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside any nesting of DDP / DataParallel / torch.compile / DeepSpeed / FSDP."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif type(model).__name__ in _ACCELERATE_WRAPPERS:
            from accelerate.utils import extract_model_from_parallel

            inner = extract_model_from_parallel(model, keep_torch_compile=False)
            if inner is model:
                return model
            model = inner
        else:
            return model
