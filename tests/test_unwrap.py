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


DS_PROBE = r'''
import os, tempfile
import torch, torch.distributed as dist
from torch import nn
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
from dsrna_dist.engine.deepspeed_engine import ds_config, initialize
from dsrna_dist.engine.unwrap import unwrap_model
net = nn.Linear(3, 2)
eng = initialize(net, torch.optim.SGD(net.parameters(), lr=0.1),
                 ds_config(micro_batch=1, world_size=1, zero_stage=0, grad_clip=0))
assert type(eng).__name__ == "DeepSpeedEngine"
assert unwrap_model(eng) is net and unwrap_model(torch.compile(eng)) is net
dist.destroy_process_group()
print("UNWRAPPED")
'''


def test_real_deepspeed_engine(tmp_path):
    """A real DeepSpeedEngine (ZeRO-0, CPU accelerator, its own process: DeepSpeed sets process
    state), also under torch.compile, unwraps to the module."""
    import os
    import subprocess

    pytest.importorskip("deepspeed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", DS_PROBE], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0 and "UNWRAPPED" in r.stdout, r.stderr[-3000:]
