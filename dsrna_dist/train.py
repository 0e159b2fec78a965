"""Retrain a derived network from a genotype (the DARTS evaluation protocol), distributed.

    torchrun --standalone --nproc_per_node N -m dsrna_dist.train --config configs/train/cifar10.yaml \
        --model.genotype=runs/search/genotype.json
    accelerate launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m dsrna_dist.train --config ...
    python -m dsrna_dist.train --config configs/train/fmnist_tiny.yaml --model.genotype=DARTS_V2

Engines: ``engine=accelerate`` (DDP, default) or ``engine=deepspeed`` (ZeRO-0/1/2, driven
directly with a torch optimizer). Every epoch: evaluation on a held-out validation split of the
training set (``data.val_size`` images, seeded by ``data.val_seed``, identical on every rank,
recorded in the checkpoint), ``checkpoints/last.pt`` (+ ``best.pt`` by validation top-1; the
final model when ``data.val_size=0``), one line in ``metrics.jsonl``, TensorBoard scalars. The
test set is evaluated once, after the final epoch, for its log line only: it never selects
anything. A relaunch of the same command resumes bit-exactly on CPU (weights, optimizer incl.
ZeRO partitions, every rank's RNG, best score). ``precise_bn_batches=N`` re-estimates the BN
running statistics over N unaugmented training batches before every evaluation (precise BN,
:mod:`dsrna_dist.training.precise_bn`) and checkpoints them; training goes on from its own EMA
(kept in the checkpoint as ``bn_ema``), so the weights trained are unchanged in every regime.

Training regimes (``regime.name``): ``natural``, ``pgd_at`` (Madry), ``trades``, certified
``ibp`` / ``crown_ibp`` (see :mod:`dsrna_dist.training`). A NaN/inf loss, gradient or weight stops every rank together
before anything is applied or saved (exit 1, the last good checkpoint untouched).

Learning-rate scaling for N processes: ``optim.lr`` is the rate for the global batch
``base_batch_size``; with ``scale_lr=true`` it becomes ``lr * N * data.batch_size /
base_batch_size`` (Goyal et al. 2017 linear rule); use ``optim.warmup_epochs`` (~5) when the
factor is large.
"""
from __future__ import annotations

from .entry import help_before_imports

help_before_imports(__name__, "train", __doc__.split("\n\n")[0])  # before torch: `--help` < 1 s

import contextlib  # noqa: E402  (the heavy imports below come after the --help fast path)
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import genotype as G
from .config import ConfigError, TrainConfig, parse_cli
from .engine import (CheckpointError, Runtime, broadcast_parameters, capture_rng, load_checkpoint,
                     memory_format, restore_rng, run_checked, seed_everything, seed_rank_streams,
                     training_state)
from .engine.checkpoint import load_optimizer_state
from .engine.io import atomic_write_text, read_jsonl
from .engine.schedule import lr_at
from .space.network import (Network, build_network, count_parameters, drop_prob_at, info_dict,
                            resolve_genotype)
from .training import (NonFiniteError, Regime, SplitRecord, all_finite, any_rank_nonfinite, build_regime,
                       holdout_split)
from .training.precise_bn import bn_stats, load_bn_stats, precise_bn, precise_bn_indices
from .training.split import check_resume

CRASH_ENV = "DSRNA_TEST_CRASH"  # "<rank>:<global step>": that rank os._exit(3)s after that step
NAN_GRAD_ENV = "DSRNA_TEST_NAN_GRAD"  # "<rank>:<global step>": a NaN gradient (finite loss) there
DUMP_ENV = "DSRNA_TEST_DUMP_DIR"  # every rank saves its final weights there (tests compare ranks)


# --------------------------------------------------------------------------- schedule
def effective_lr(cfg: TrainConfig, world_size: int) -> float:
    """``optim.lr``, linearly scaled to the global batch when ``scale_lr`` (Goyal et al. 2017)."""
    if not cfg.scale_lr:
        return cfg.optim.lr
    return cfg.optim.lr * world_size * cfg.data.batch_size / cfg.base_batch_size


def resolve_precise_bn(cfg: TrainConfig, train_idx: Optional[Any], n_split: int, world: int) -> Any:
    """The seeded training positions precise BN reads (``precise_bn_batches``), never held-out ones."""
    import numpy as np

    if train_idx is None:
        if n_split < 0:  # an FFCV file: the loader counts it
            from .data.ffcv_loader import beton_path, require_ffcv

            require_ffcv()
            from ffcv.reader import Reader

            n_split = Reader(beton_path(cfg.data, "train")).num_samples
        if cfg.data.train_subset:  # the loaders keep the first train_subset positions only
            n_split = min(n_split, cfg.data.train_subset)
        train_idx = np.arange(n_split)
    return precise_bn_indices(train_idx, cfg.precise_bn_batches, cfg.data.batch_size, world, cfg.run.seed)


# --------------------------------------------------------------------------- preflight
@dataclass
class Plan:
    """Everything resolved before any process group or file exists: bad input fails here."""
    cfg: TrainConfig
    genotype: G.Genotype
    info: Any
    model: Network
    resume: Optional[Dict[str, Any]]
    resume_path: Optional[Path]
    regime: Regime
    train_idx: Optional[Any]  # positions in the training split (None = all of it)
    val_idx: Optional[Any]
    split: SplitRecord
    bn_idx: Optional[Any] = None  # training positions whose statistics precise BN averages (None = off)


def resolve_split(cfg: TrainConfig) -> Tuple[Optional[Any], Optional[Any], SplitRecord]:
    """The held-out validation split (``data.val_size``); reads the training labels to size it."""
    if cfg.data.val_size == 0:
        return None, None, SplitRecord(0, cfg.data.val_seed, 0, "")
    from .data import get_dataset, load_arrays

    if not get_dataset(cfg.data.name).in_memory:
        raise ConfigError(f"key 'data.val_size': a held-out split is implemented for in-memory datasets only, "
                          f"not {cfg.data.name!r}; set data.val_size=0 (best.pt is then the final model)")
    n = len(load_arrays(cfg.data, "train"))
    train_idx, val_idx, rec = holdout_split(n, cfg.data.val_size, cfg.data.val_seed)
    return train_idx, val_idx, rec


def preflight(cfg: TrainConfig) -> Plan:
    """Validate genotype, dataset, network and any checkpoint to resume; writes nothing."""
    from .data import dataset_info

    if cfg.dist.mixed_precision == "fp16":
        raise ConfigError("key 'dist.mixed_precision': train supports 'no' or 'bf16' (fp16 needs loss "
                          "scaling; bf16 does not)")
    if cfg.ema:
        raise ConfigError("key 'ema': weight EMA is not implemented in train yet; set ema=0")
    if cfg.dist.compile and cfg.engine == "deepspeed":
        raise ConfigError("key 'dist.compile': torch.compile is applied on the accelerate engine only; "
                          "with engine=deepspeed set dist.compile=false")
    g = resolve_genotype(cfg.model)
    regime = build_regime(cfg)
    info = dataset_info(cfg.data)  # the config form: ImageNet crop size, synthetic shape
    from .engine.preflight import check_data

    n = check_data(cfg.data, ("train", "test"))  # a missing dataset fails before any write
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    train_idx, val_idx, split = resolve_split(cfg)
    n_train = len(train_idx) if train_idx is not None else n["train"]
    bn_idx = resolve_precise_bn(cfg, train_idx, n["train"], world) if cfg.precise_bn_batches else None
    if 0 <= n_train < cfg.data.batch_size * world:
        raise ConfigError(f"key 'data.batch_size': {cfg.data.batch_size} x {world} ranks is larger "
                          f"than the training set ({n_train} images after the held-out split; no full batch per epoch)")
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    model = build_network(cfg.model, g, info)
    state, path = None, None
    last = Path(cfg.run.out_dir) / cfg.run.name / "checkpoints" / "last.pt"
    if cfg.run.resume and last.exists():
        state = load_checkpoint(last, cfg)
        saved = state.get("genotype")
        if saved is None or G.from_dict(saved, f"checkpoint {last} genotype") != g:
            raise CheckpointError(f"checkpoint {last} was trained with a different genotype than "
                                  f"model.genotype={cfg.model.genotype!r}; use a new run.name")
        problem = check_resume(state.get("val_split"), split, last)
        if problem:
            raise CheckpointError(problem)
        path = last
    if state is None:
        regime.init_weights(model)  # e.g. IBP-aware init; same RNG state on every rank
    return Plan(cfg, g, info, model, state, path, regime, train_idx, val_idx, split, bn_idx)


# --------------------------------------------------------------------------- helpers
def _sum_across(rt: Runtime, t: torch.Tensor) -> list:
    """Sum a small float64 stats vector over ranks (one collective per epoch, not per step)."""
    if rt.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _batch_stats(loss_sum: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[loss sum, top-1 hits, top-5 hits, n] as a device tensor: no host sync per step."""
    kmax = min(5, logits.shape[1])
    hit = logits.topk(kmax, dim=1).indices.eq(y[:, None])
    n = torch.tensor(float(y.shape[0]), dtype=torch.float64, device=y.device)
    return torch.stack([loss_sum.detach().double(), hit[:, :1].any(1).sum().double(),
                        hit.any(1).sum().double(), n])


def _memory_mb(device: torch.device) -> Tuple[str, float]:
    if device.type == "cuda":
        return "max_cuda_alloc_mb", torch.cuda.max_memory_allocated(device) / 2 ** 20
    return "max_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _crash_step(rank: int, env: str = CRASH_ENV) -> int:
    spec = os.environ.get(env, "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return -1
    r, s = spec.split(":")
    return int(s) if int(r) == rank else -1


def _grad_norm(params: Any) -> torch.Tensor:
    """The 2-norm of the gradients that exist (NaN/inf propagate: the guard reads it)."""
    grads = [q.grad.detach().norm() for q in params if q.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads))


class Trainer:
    """Engine-neutral step/eval/state around either an Accelerate-DDP or a DeepSpeed model."""

    def __init__(self, rt: Runtime, plan: Plan) -> None:
        self.rt, self.plan, self.cfg = rt, plan, plan.cfg
        cfg, dev = plan.cfg, rt.device
        self.cuda = dev.type == "cuda"
        self.bf16 = self.cuda and cfg.dist.mixed_precision == "bf16"
        # DeepSpeed broadcasts parameters viewed as bytes, which needs the contiguous layout
        self.channels_last = memory_format(cfg.dist) == torch.channels_last and cfg.engine != "deepspeed"
        net = plan.model
        if plan.resume is not None:  # weights first: DDP and ZeRO build their buffers from them
            try:
                net.load_state_dict(plan.resume["model"])
            except (KeyError, RuntimeError) as e:
                raise CheckpointError(f"checkpoint {plan.resume_path}: weights do not fit the network: "
                                      f"{str(e).strip().splitlines()[0]}") from None
            if plan.resume.get("bn_ema"):  # precise BN saved its statistics: training continues from its EMA
                try:
                    load_bn_stats(net, plan.resume["bn_ema"])
                except (KeyError, AttributeError, RuntimeError) as e:
                    raise CheckpointError(f"checkpoint {plan.resume_path}: bn_ema does not fit the network: {e}") from None
        net = net.to(dev, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.net = net
        self.base_lr = effective_lr(cfg, rt.world_size)
        o = cfg.optim
        if o.name == "sgd":
            opt = torch.optim.SGD(net.parameters(), lr=self.base_lr, momentum=o.momentum,
                                  weight_decay=o.weight_decay, nesterov=o.nesterov)
        else:
            opt = torch.optim.AdamW(net.parameters(), lr=self.base_lr, weight_decay=o.weight_decay)
        self.deepspeed = cfg.engine == "deepspeed"
        if self.deepspeed:
            from .engine import deepspeed_engine as DS
            self.DS = DS
            self.model = DS.initialize(net, opt, DS.ds_config(
                micro_batch=cfg.data.batch_size, world_size=rt.world_size, zero_stage=cfg.zero_stage,
                grad_clip=o.grad_clip, autocast_bf16=self.bf16,  # fp32 weights, like DDP
                num_parameters=count_parameters(net)))
            self.opt = opt
            if plan.resume is not None:
                DS.load_optimizer_state(self.model, plan.resume.get("ds_optimizer", []), str(plan.resume_path))
        else:
            if plan.resume is not None:
                try:
                    load_optimizer_state(opt, plan.resume["optimizers"]["model"])
                except (KeyError, ValueError) as e:
                    raise CheckpointError(f"checkpoint {plan.resume_path}: optimizer state does not fit: {e}") from None
            if cfg.dist.compile and self.cuda:
                net = torch.compile(net)
            self.model, self.opt = rt.accelerator.prepare(net, opt)
        self.crash_at = _crash_step(rt.rank)
        self.nan_grad_at = _crash_step(rt.rank, NAN_GRAD_ENV)
        self.regime_keys: set = set()  # last-step values of these go into the epoch's metrics

    # -- one epoch of training
    def set_lr(self, lr: float) -> None:
        if self.deepspeed:
            self.DS.set_lr(self.model, lr)
        else:
            for g in self.opt.param_groups:
                g["lr"] = lr

    def autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_epoch(self, loader: Any, epoch: int, global_step: int, steps: int) -> Tuple[Dict[str, float], int]:
        cfg, rt = self.cfg, self.rt
        self.model.train()
        p = drop_prob_at(cfg.model.drop_path, epoch, cfg.epochs)
        crit = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss*n, top1, top5, n
        t0 = time.perf_counter()
        lr = self.base_lr
        logs: Dict[str, float] = {}
        for i, (x, y) in enumerate(rt.progress(loader, total=steps, desc=f"epoch {epoch}")):
            if i >= steps:
                break
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lr = lr_at(cfg.optim, epoch, i, steps, cfg.epochs, base_lr=self.base_lr)
            self.set_lr(lr)
            with self.autocast():
                r = self.plan.regime.loss(self.model, self.net, x, y, drop_prob=p, epoch=epoch, step=i,
                                          steps_per_epoch=steps, crit=crit)
            loss, loss_main, logits, logs = r.loss, r.loss_main, r.logits, r.logs
            if global_step == self.nan_grad_at:  # test hook: finite loss, non-finite gradient
                q = next(self.net.parameters()).sum()
                loss = loss + 0.0 * torch.sqrt(q - q.detach())
            self.regime_keys.update(logs)
            if self.deepspeed:
                # DeepSpeed applies the update inside step(). ZeRO-0: the all-reduced gradients
                # are whole after backward, so loss and norm are checked there, in one collective;
                # ZeRO-1/2 partition them: the loss first, a skipped step after
                if cfg.zero_stage > 0:
                    self._guard(epoch, i, global_step, loss)
                self.model.backward(loss)
                if cfg.zero_stage == 0:
                    self._guard(epoch, i, global_step, loss, _grad_norm(self.net.parameters()))
                self.model.step()  # clipping is in the DeepSpeed config
                if not self.model.was_step_applied():  # ZeRO-1/2 skip a non-finite step silently
                    raise NonFiniteError(
                        f"non-finite training gradient at epoch {epoch + 1} step {i + 1} (global step "
                        f"{global_step + 1}): DeepSpeed skipped the step (on every rank)")
            else:
                self.opt.zero_grad(set_to_none=True)
                rt.accelerator.backward(loss)  # DDP all-reduces: a NaN gradient reaches every rank
                params = [q for q in self.model.parameters() if q.grad is not None]
                if cfg.optim.grad_clip > 0:
                    norm = rt.accelerator.clip_grad_norm_(params, cfg.optim.grad_clip)
                else:
                    norm = _grad_norm(params)
                self._guard(epoch, i, global_step, loss, norm)
                self.opt.step()
            global_step += 1
            sums += _batch_stats(loss_main.detach() * y.shape[0], logits.detach().float(), r.labels)
            if global_step % cfg.run.log_every == 0:
                rt.tb.scalar("train/loss_step", loss_main.item(), global_step)
            if global_step == self.crash_at:
                print(f"[{CRASH_ENV}] rank {rt.rank} exiting at step {global_step}", flush=True)
                os._exit(3)
        if self.cuda:
            torch.cuda.synchronize(rt.device)  # kernels are async: time the work, not the launches
        elapsed = time.perf_counter() - t0
        loss_sum, c1, c5, n = _sum_across(rt, sums)
        n = max(n, 1.0)
        # the weights themselves (BN statistics included) before anything is saved
        if any_rank_nonfinite(0.0 if all_finite(self.net.state_dict().values()) else math.nan, device=rt.device):
            raise NonFiniteError(f"non-finite weights after epoch {epoch + 1} (step {global_step})")
        return {"train_loss": loss_sum / n, "train_top1": 100 * c1 / n, "train_top5": 100 * c5 / n,
                "lr": lr, "drop_prob": p, "img_per_s": n / max(elapsed, 1e-9),
                "train_time_s": elapsed, **logs}, global_step

    def _guard(self, epoch: int, i: int, global_step: int, loss: torch.Tensor,
               norm: Optional[torch.Tensor] = None) -> None:
        """Every rank stops together, before the step is applied, if any rank saw NaN/inf."""
        values = (loss,) if norm is None else (loss, norm)
        if any_rank_nonfinite(*values, device=self.rt.device):
            what = f"loss={float(loss.detach()):.4g}" + ("" if norm is None else f", grad norm={float(norm.detach()):.4g}")
            raise NonFiniteError(f"non-finite training loss/gradient at epoch {epoch + 1} step {i + 1} "
                                 f"(global step {global_step + 1}; {what} on rank {self.rt.rank})")

    @torch.no_grad()
    def evaluate(self, loader: Any, prefix: str = "test") -> Dict[str, float]:
        net = self.net  # the plain module: no DDP buffer broadcast, no ZeRO hooks needed
        net.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.rt.device)
        for x, y in loader:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                logits = net(x).float()
            sums += _batch_stats(F.cross_entropy(logits, y, reduction="sum"), logits, y)
        loss_sum, c1, c5, n = _sum_across(self.rt, sums)
        n = max(n, 1.0)
        return {f"{prefix}_loss": loss_sum / n, f"{prefix}_top1": 100 * c1 / n, f"{prefix}_top5": 100 * c5 / n,
                f"{prefix}_n": int(n)}

    def precise_bn(self, loader: Any) -> float:
        """Re-estimate BN statistics over ``loader`` (every rank, one all-reduce); seconds taken."""
        t0 = time.perf_counter()

        def batches():
            for x, _ in loader:
                yield x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

        with self.autocast():
            precise_bn(self.net, batches())
        if self.cuda:
            torch.cuda.synchronize(self.rt.device)
        return time.perf_counter() - t0

    def sync_buffers(self) -> None:
        """Rank 0's BN running statistics everywhere: evaluation and resume see one model."""
        broadcast_parameters(list(self.net.buffers()))

    def state(self, epoch: int, global_step: int, best: float, metrics: Dict[str, Any],
              bn_ema: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
        """Checkpoint dict (COLLECTIVE: RNG and ZeRO partitions are gathered from every rank).
        ``bn_ema``: training's own BN statistics when the weights carry precise-BN ones."""
        cfg, plan = self.cfg, self.plan
        extra: Dict[str, Any] = dict(bn_ema=bn_ema or {},
            genotype=plan.genotype.to_dict(), dataset=plan.info.name, dataset_info=info_dict(plan.info),
            world_size=self.rt.world_size, best_top1=best, best_metric="val_top1" if plan.split.size else "final",
            val_split=plan.split.to_dict(), regime=plan.regime.name, metrics=metrics,
            num_params=count_parameters(self.net), num_params_no_aux=count_parameters(self.net, False))
        if self.deepspeed:
            extra["ds_optimizer"] = self.DS.gather_optimizer_states(self.model)
            optimizers = None
        else:
            optimizers = {"model": self.opt}
        return training_state(models={"model": self.net}, optimizers=optimizers, step=global_step,
                              epoch=epoch, config=cfg, rng=capture_rng(), **extra)


# --------------------------------------------------------------------------- metrics file
def _metrics_path(rt: Runtime) -> Path:
    return rt.run_dir / "metrics.jsonl"


def _truncate_metrics(rt: Runtime, start_epoch: int) -> None:
    """On resume keep only epochs already checkpointed (a crash may have left a later line)."""
    path = _metrics_path(rt)
    if not rt.is_main or not path.exists():
        return
    keep = [r for r in read_jsonl(path) if r.get("epoch", 0) < start_epoch]
    atomic_write_text(str(path), "".join(json.dumps(r) + "\n" for r in keep))


def _write_summary(rt: Runtime, cfg: TrainConfig, best: float, params: int) -> None:
    """summary.json once the last epoch is done: the light record a results tree keeps (and
    that marks the run finished) when checkpoints are not kept. Times are summed over the
    epochs in metrics.jsonl, so a resumed run reports its whole training time."""
    if not rt.is_main:
        return
    from .engine.io import atomic_write_json, read_jsonl
    recs = read_jsonl(_metrics_path(rt))
    last = recs[-1] if recs else {}
    atomic_write_json(str(rt.run_dir / "summary.json"), {
        "kind": "train", "dataset": cfg.data.name, "regime": cfg.regime.name, "epochs": cfg.epochs,
        "seed": cfg.run.seed, "params": params, "best_metric": "val_top1" if cfg.data.val_size else "final",
        "best_top1": best, "final_val_top1": last.get("val_top1"), "test_top1": last.get("test_top1"),
        "test_n": last.get("test_n"), "train_time_s": round(sum(float(r.get("epoch_time_s", 0.0)) for r in recs), 1),
        "world_size": rt.world_size, "device": str(rt.device)})


def _append_metrics(rt: Runtime, record: Dict[str, Any]) -> None:
    if rt.is_main:
        with open(_metrics_path(rt), "a") as f:
            f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- main loop
def run(rt: Runtime, plan: Plan) -> int:
    from .data import build_eval_loader, build_train_loader

    cfg = plan.cfg
    n_all, n_noaux = count_parameters(plan.model), count_parameters(plan.model, include_aux=False)
    rt.print(f"network: {plan.genotype}")
    rt.print(f"parameters: {n_noaux / 1e6:.6f}M without aux head, {n_all / 1e6:.6f}M with "
             f"(style={plan.model.style}, C={cfg.model.init_channels}, layers={cfg.model.layers})")
    rt.tb.text("model/params", f"{n_noaux} without aux head, {n_all} total", 0)
    trainer = Trainer(rt, plan)
    train_loader = build_train_loader(cfg.data, rt.rank, rt.world_size, rt.device, cfg.run.seed,
                                      indices=plan.train_idx)
    val_loader = (build_eval_loader(cfg.data, rt.rank, rt.world_size, rt.device, cfg.run.seed,
                                    indices=plan.val_idx, split="train") if plan.split.size else None)
    eval_loader = build_eval_loader(cfg.data, rt.rank, rt.world_size, rt.device, cfg.run.seed)
    bn_loader = None
    if plan.bn_idx is not None:  # batches of data.batch_size, unaugmented, sharded over ranks
        bn_loader = build_eval_loader(replace(cfg.data, eval_batch_size=cfg.data.batch_size), rt.rank,
                                      rt.world_size, rt.device, cfg.run.seed, indices=plan.bn_idx, split="train")
        rt.print(f"precise BN: statistics re-estimated before every evaluation over {len(plan.bn_idx)} unaugmented "
                 f"training images ({len(plan.bn_idx) // cfg.data.batch_size} batches of {cfg.data.batch_size})")
    rt.print(f"regime: {plan.regime.describe()}; model selection: "
             + (f"validation split of {plan.split.size} training images (seed {plan.split.seed}, "
                f"digest {plan.split.digest})" if plan.split.size else "none (data.val_size=0: best.pt = final model)"))
    steps = len(train_loader) if not cfg.steps_per_epoch else min(cfg.steps_per_epoch, len(train_loader))
    if steps == 0:
        raise ConfigError(f"key 'data.batch_size': {cfg.data.batch_size} x {rt.world_size} ranks is larger "
                          "than the training set (no full batch per epoch)")
    rt.print(f"engine={cfg.engine}{f' zero_stage={cfg.zero_stage}' if cfg.engine == 'deepspeed' else ''} "
             f"lr={trainer.base_lr:g} (global batch {cfg.data.batch_size * rt.world_size}) "
             f"steps/epoch={steps}")
    start_epoch, global_step, best = 0, 0, -1.0
    if plan.resume is not None:
        start_epoch = int(plan.resume["epoch"])
        global_step = int(plan.resume["step"])
        best = float(plan.resume.get("best_top1", -1.0))
        restore_rng(plan.resume["rng"])
        rt.print(f"resumed from {plan.resume_path}: {start_epoch} epochs done, best top-1 {best:.2f}")
    else:
        seed_rank_streams(cfg.run.seed, rt.rank)  # per-rank streams (drop-path)
    _truncate_metrics(rt, start_epoch)
    if start_epoch >= cfg.epochs:
        rt.print(f"nothing to do: {start_epoch} of {cfg.epochs} epochs already done")
        if not (rt.run_dir / "summary.json").exists():
            _write_summary(rt, cfg, best, n_noaux)
        return 0
    mem_key = _memory_mb(rt.device)[0]
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        train_loader.set_epoch(epoch)
        try:
            m, global_step = trainer.train_epoch(train_loader, epoch, global_step, steps)
        except NonFiniteError as e:
            last_ckpt = rt.ckpt.latest()
            msg = (f"error: stopping: {e}; nothing of this epoch was applied or saved; the last good checkpoint "
                   f"{last_ckpt if last_ckpt is not None else '(none yet)'} was left untouched")
            if rt.is_main:
                print(msg, file=sys.stderr, flush=True)
            return 1
        trainer.sync_buffers()
        last = epoch == cfg.epochs - 1
        validates = val_loader is not None and (last or (epoch + 1) % cfg.eval_every == 0)
        bn_ema = None
        if bn_loader is not None and (validates or last):
            bn_ema = bn_stats(trainer.net)  # training goes on from these (a regime may attack in eval mode)
            if validates:  # the EMA statistics' score too: what precise BN changed, in every run's log
                before = trainer.evaluate(val_loader, "val")
                m.update(val_loss_ema=before["val_loss"], val_top1_ema=before["val_top1"])
            m["precise_bn_s"] = trainer.precise_bn(bn_loader)
            trainer.sync_buffers()
        if validates:
            m.update(trainer.evaluate(val_loader, "val"))
        if last:  # the only place the test set is touched: a log line, never a selection
            m.update(trainer.evaluate(eval_loader, "test"))
        epoch_time = time.perf_counter() - t0
        m.update(epoch=epoch, step=global_step, epoch_time_s=epoch_time, world_size=rt.world_size)
        m[mem_key] = _memory_mb(rt.device)[1]
        if val_loader is None:
            is_best = True  # nothing to select on: best.pt follows the final model
        else:
            is_best = "val_top1" in m and m["val_top1"] > best
            if is_best:
                best = m["val_top1"]
        m["best_top1"] = best
        state = trainer.state(epoch + 1, global_step, best, m, bn_ema=bn_ema)
        rt.ckpt.save(state, is_best=is_best)
        if bn_ema is not None:
            load_bn_stats(trainer.net, bn_ema)
        _append_metrics(rt, m)
        for k, v in m.items():
            if k not in ("epoch", "step", "world_size", "test_n", "val_n"):
                tag = k.replace("train_", "train/").replace("test_", "test/").replace("val_", "val/")
                tag = tag if "/" in tag else ("perf/" + tag if k not in ("lr", "drop_prob", "best_top1") else tag)
                if k in trainer.regime_keys:  # the regime's own scalars (eps, kappa, ...)
                    tag = "regime/" + k
                rt.tb.scalar(tag, v, epoch)
        rt.tb.flush()
        val = f" val {m['val_loss']:.4f} / {m['val_top1']:.2f}%" if "val_top1" in m else ""
        if "val_top1_ema" in m:
            val += f" (EMA BN {m['val_top1_ema']:.2f}%)"
        test = f" test {m['test_loss']:.4f} / {m['test_top1']:.2f}%" if "test_top1" in m else ""
        rt.print(f"epoch {epoch + 1}/{cfg.epochs}: train {m['train_loss']:.4f} / {m['train_top1']:.2f}%"
                 f"{val}{test} lr {m['lr']:.5f} {m['img_per_s']:.0f} img/s {epoch_time:.1f}s")
    sel = f"best validation top-1 {best:.2f}%" if val_loader is not None else "best.pt = final model"
    _write_summary(rt, cfg, best, n_noaux)
    rt.print(f"done: {sel}, checkpoints in {rt.ckpt.dir}")
    dump = os.environ.get(DUMP_ENV)
    if dump:  # test hook: each rank's own final weights, to compare ranks bit for bit
        os.makedirs(dump, exist_ok=True)
        torch.save({"rank": rt.rank, "world_size": rt.world_size, "model": trainer.net.state_dict()},
                   os.path.join(dump, f"rank{rt.rank}.pt"))
    return 0


def train(cfg: TrainConfig) -> int:
    """Preflight (errors before anything is written), then the run under the engine's policy."""
    return run_checked(cfg, "train", preflight, run)


def from_args(config: str = "", **overrides: Any) -> None:
    """fire target: ``--config PATH`` plus dotted ``--section.key=value`` overrides."""
    cfg = parse_cli(TrainConfig, "python -m dsrna_dist.train", __doc__.split("\n\n")[0], config, overrides)
    train(cfg)


def main(argv: Optional[list] = None) -> None:
    """Run the stage on ``argv`` (default ``sys.argv[1:]``): ``["--config", "x.yaml", "--epochs=2"]``."""
    from .entry import run_main

    run_main("train", __doc__.split("\n\n")[0], from_args, argv)


def cli() -> None:
    """Console entry (``dsrna-train``, ``python -m dsrna_dist.train``)."""
    main()


if __name__ == "__main__":
    cli()
