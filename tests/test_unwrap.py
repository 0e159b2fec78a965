"""``dsrna_dist.engine.unwrap.unwrap_model``: the one unwrap helper (checkpoints, metrics, bounds)."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dsrna_dist.engine import training_state, unwrap_model
from dsrna_dist.engine.unwrap import unwrap_model as unwrap_direct

torch.set_num_threads(1)


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A 1-process gloo group: DDP needs one to be constructed."""
    if dist.is_initialized():
        yield
        return
    f = tmp_path_factory.mktemp("pg") / "init"
    dist.init_process_group("gloo", init_method=f"file://{f}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_every_caller_uses_the_one_helper():
    from dsrna_dist.bounds import graph
    from dsrna_dist.engine import checkpoint
    from dsrna_dist.robustness import certified, jacobian

    assert unwrap_model is unwrap_direct
    for mod, name in ((graph, "unwrap"), (checkpoint, "unwrap_model"), (jacobian, "unwrap_model"),
                      (certified, "unwrap_model")):
        assert getattr(mod, name) is unwrap_direct, mod.__name__


def test_plain_module_is_returned_as_is_without_importing_deepspeed():
    m = net()
    assert unwrap_model(m) is m
    before = set(sys.modules)
    unwrap_model(nn.DataParallel(m))
    assert "deepspeed" not in set(sys.modules) - before


def test_nested_wrappers(group):
    m = net()
    ddp = nn.parallel.DistributedDataParallel(m)
    compiled = torch.compile(m)  # wraps only; nothing is compiled until it is called
    for wrapped in (ddp, nn.DataParallel(m), compiled, nn.parallel.DistributedDataParallel(compiled),
                    torch.compile(ddp), nn.DataParallel(nn.DataParallel(compiled))):
        assert unwrap_model(wrapped) is m, type(wrapped).__name__


def test_checkpoint_keys_are_plain_whatever_the_wrapper(group):
    m = net()
    plain = training_state(models={"model": m})["model"]
    for wrapped in (nn.parallel.DistributedDataParallel(torch.compile(m)), nn.DataParallel(m)):
        st = training_state(models={"model": wrapped})["model"]
        assert list(st) == list(plain) and all(torch.equal(st[k], plain[k]) for k in plain)


def test_deepspeed_engine_goes_through_accelerate(monkeypatch):
    """A DeepSpeedEngine is unwrapped by accelerate's ``extract_model_from_parallel``."""
    import accelerate.utils

    calls = []

    class DeepSpeedEngine(nn.Module):  # stand-in: accelerate checks the real class, so stub the call
        def __init__(self, module):
            super().__init__()
            self.module = module

    def fake_extract(model, keep_torch_compile=True, **kw):
        calls.append(keep_torch_compile)
        return model.module

    monkeypatch.setattr(accelerate.utils, "extract_model_from_parallel", fake_extract)
    m = net()
    assert unwrap_model(DeepSpeedEngine(torch.compile(m))) is m
    assert calls == [False]
