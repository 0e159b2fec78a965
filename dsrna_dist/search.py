"""Architecture search stage: ``python -m dsrna_dist.search --config configs/search/X.yaml``.

Also runs unchanged under ``accelerate launch --multi_gpu --num_processes N ... -m
dsrna_dist.search`` or ``torchrun``. The train split is halved (``data.train_portion``):
weight batches come from one half, architecture batches from the other, each sharded by
rank. Every epoch leaves ``genotypes/epoch_XXX.json``, a line in ``alphas.jsonl`` and a
checkpoint; the final cell goes to ``genotype.json``. A killed run restarted with the same
command continues from the last checkpoint, bit-exactly on CPU.

Test hook: ``DSRNA_STOP_AFTER_STEPS=N`` makes the process die (``os._exit(137)``, no cleanup)
right after global step N, to simulate a kill.
"""
from __future__ import annotations

from .entry import help_before_imports

help_before_imports(__name__, "search", __doc__.split("\n\n")[0])  # before torch: `--help` < 1 s

import os  # noqa: E402  (the heavy imports below come after the --help fast path)
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .config import ConfigError, SearchConfig, parse_cli
from .engine import (Runtime, all_reduce_mean_, assert_identical_across_ranks, broadcast_parameters,
                     capture_rng, memory_format, restore_training_state, run_checked, training_state)
from .engine.schedule import arch_lr_at, lr_at
from .search_artifacts import (alpha_record, genotype_markdown, heatmap_figure, read_alpha_history,
                               save_genotypes, write_alpha_history)
from .space.supernet import Supernet
from .strategies import NonFiniteLossError, SearchContext, build_strategy
from .strategies.convergence import GenotypeTracker, convergence

PROG = "python -m dsrna_dist.search"
DOC = __doc__.split("\n\n")[0]
STOP_ENV = "DSRNA_STOP_AFTER_STEPS"


# --------------------------------------------------------------------------- building blocks
def build_metric(cfg: SearchConfig):
    """The robustness metric R, or None for ``robustness.name: none``."""
    if cfg.robustness.name == "none":
        return None
    from .robustness import build_metric as _build

    return _build(cfg.robustness)


def build_optimizers(cfg: SearchConfig, model: Supernet) -> Tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    o = cfg.optim
    if o.name == "sgd":
        w_opt: torch.optim.Optimizer = torch.optim.SGD(
            model.weight_parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
            weight_decay=o.weight_decay)
    else:
        w_opt = torch.optim.AdamW(model.weight_parameters(), lr=o.lr, weight_decay=o.weight_decay)
    a = cfg.arch_optim
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=a.lr, betas=(a.beta1, a.beta2),
                             weight_decay=a.weight_decay)
    return w_opt, a_opt


def wrap_ddp(model: Supernet, world_size: int, prepare: Optional[Callable[[nn.Module], nn.Module]] = None) -> nn.Module:
    """DDP over the weights only: alpha/beta are on DDP's ignore list (the strategies reduce
    their gradients explicitly). ``prepare``: e.g. ``accelerator.prepare_model``; default DDP."""
    if world_size == 1:
        return model
    ddp = nn.parallel.DistributedDataParallel
    ddp._set_params_and_buffers_to_ignore_for_model(
        model, model.arch_parameter_names() + model.arch_buffer_names())
    return prepare(model) if prepare is not None else ddp(model)


def build_loaders(cfg: SearchConfig, rt: Runtime, arrays: Any = None):
    """Weight and arch loaders over the two halves of the train split, sharded by rank."""
    from .data import MemoryLoader, dataset_info, load_arrays, search_split
    from .engine import derive_seed

    info = dataset_info(cfg.data)
    if arrays is None:
        arrays = load_arrays(cfg.data, "train")
    n = int(arrays.labels.shape[0])
    tr_idx, va_idx = search_split(n, cfg.data.train_portion, cfg.run.seed)
    augment = search_augment(cfg, info)

    def loader(idx: Any, stream: int):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return MemoryLoader(arrays.images[idx], arrays.labels[idx], cfg.data.batch_size,
                            shuffle=True, seed=derive_seed(cfg.run.seed, stream) % 2**31, rank=rt.rank,
                            world_size=rt.world_size, drop_last=True, augment=augment,
                            device=rt.device)

    train, val = loader(tr_idx, 1), loader(va_idx, 2)
    steps = min(len(train), len(val))
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)
    if steps == 0:
        raise ConfigError(f"key 'data.batch_size': {cfg.data.batch_size} per process x "
                          f"{rt.world_size} processes is larger than a search half "
                          f"({min(len(tr_idx), len(va_idx))} images); no full batch")
    return info, train, val, steps


def search_augment(cfg: SearchConfig, info: Any):
    """As DARTS, both search halves get the training augmentation (``data.crop_padding``,
    ``data.flip``, ``data.cutout``; the flip default depends on the dataset)."""
    from .data import build_augment

    return build_augment(cfg.data, info)


# --------------------------------------------------------------------------- the stage
def check_config(cfg: SearchConfig) -> None:
    """Cross-key checks (ConfigError naming the key) that field constraints cannot express."""
    from .registry import RegistryError
    from .strategies import STRATEGIES

    try:
        strategy = STRATEGIES.get(cfg.strategy.name, key="strategy.name")
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    strategy.check_config(cfg)
    if cfg.dist.mixed_precision == "fp16":
        raise ConfigError("key 'dist.mixed_precision': search supports 'no' or 'bf16' (fp16 needs "
                          "a loss scaler the bi-level step does not have)")
    if cfg.model.partial_channels > 1 and cfg.model.init_channels % cfg.model.partial_channels:
        raise ConfigError(f"key 'model.partial_channels': init_channels={cfg.model.init_channels} "
                          f"is not divisible by K={cfg.model.partial_channels}")
    bad = [e for e in cfg.arch_optim.reset_state_at if not 1 <= e < cfg.epochs]
    if bad:
        raise ConfigError(f"key 'arch_optim.reset_state_at': epoch(s) {bad} outside 1..{cfg.epochs - 1} "
                          "(epoch 0 has no state to clear; the search has epochs 0..epochs-1)")


def setup_supernet(rt: Runtime, cfg: SearchConfig, info: Any, metric: Any,
                   model_cfg: Any = None, op_mask: Any = None, *, loaders: Tuple[Any, Any, int] = (None, None, 0),
                   broadcast: bool = True) -> SearchContext:
    """THE one place a supernet, its two optimizers and its DDP wrapper are built: at the
    start, on resume, and whenever a strategy says the supernet changes (P-DARTS stages).
    ``broadcast``: make rank 0's fresh init everyone's (skipped when a checkpoint is loaded next)."""
    model = Supernet(model_cfg if model_cfg is not None else cfg.model, info, op_mask)
    model = model.to(rt.device, memory_format=memory_format(cfg.dist))
    w_optim, a_optim = build_optimizers(cfg, model)
    if broadcast:
        broadcast_parameters(model.parameters())  # one architecture and one init everywhere
    net = wrap_ddp(model, rt.world_size, rt.accelerator.prepare_model)
    return SearchContext(cfg=cfg, model=model, net=net, w_optim=w_optim, a_optim=a_optim, metric=metric,
                         seed=cfg.run.seed, train_loader=loaders[0], val_loader=loaders[1], steps=loaders[2])


def same_supernet(model: Supernet, model_cfg: Any, op_mask: Any) -> bool:
    """Whether ``model`` already is the supernet (config, per-edge op lists) a strategy wants."""
    have = model.op_mask()
    if (have is None) != (op_mask is None):
        return False
    if have is not None and not all(torch.equal(have[k], torch.as_tensor(op_mask[k]).cpu()) for k in have):
        return False
    return model.cfg == model_cfg


def rebuild_for(rt: Runtime, cfg: SearchConfig, info: Any, metric: Any, strategy: Any, ctx: SearchContext,
                broadcast: bool = True) -> SearchContext:
    """Rebuild through :func:`setup_supernet` when the strategy wants another supernet."""
    want_cfg, want_mask = strategy.supernet_config(), strategy.supernet_mask()
    if same_supernet(ctx.model, want_cfg, want_mask):
        return ctx
    free = getattr(rt.accelerator, "free_memory", None)
    if free is not None:  # accelerate keeps every prepared model: drop the old supernet's reference
        free()
    new = setup_supernet(rt, cfg, info, metric, want_cfg, want_mask,
                         loaders=(ctx.train_loader, ctx.val_loader, ctx.steps), broadcast=broadcast)
    strategy.bind(new)
    return new


def run_search(rt: Runtime, arrays: Any = None) -> int:
    """The search loop; ``arrays``: the train set if already loaded (see :func:`main`)."""
    cfg: SearchConfig = rt.cfg
    check_config(cfg)
    info, train_loader, val_loader, steps = build_loaders(cfg, rt, arrays)
    fmt = memory_format(cfg.dist)
    loaders = (train_loader, val_loader, steps)
    # same order of random draws as before the lifecycle hooks: supernet init, then the metric
    ctx = setup_supernet(rt, cfg, info, None, loaders=loaders, broadcast=False)
    metric = ctx.metric = build_metric(cfg)

    start_epoch, global_step, search_time, search_cpu = 0, 0, 0.0, 0.0
    state = rt.maybe_resume(cfg)
    if state is None:
        broadcast_parameters(ctx.model.parameters())  # one architecture and one init everywhere
    strategy = build_strategy(ctx)
    genotype = None
    if state is not None:
        # the strategy's state says which supernet the checkpoint holds (P-DARTS: stage, op lists)
        strategy.load_state_dict(state.get("strategy", {}))
    # the supernet the strategy searches now (P-DARTS stage 0: pdarts.stage_layers[0] cells);
    # a no-op for strategies that search cfg.model with every op
    ctx = rebuild_for(rt, cfg, info, metric, strategy, ctx, broadcast=state is None)
    if state is not None:
        global_step, start_epoch = restore_training_state(
            state, models={"model": ctx.model}, optimizers={"weights": ctx.w_optim, "arch": ctx.a_optim},
            source=str(rt.ckpt.last_path))
        if metric is not None and state.get("metric"):
            metric.load_state_dict(state["metric"])
        search_time = float(state.get("search_time_s", 0.0))
        search_cpu = float(state.get("search_cpu_s", 0.0))
        if state.get("genotype"):
            from .genotype import from_dict

            genotype = from_dict(state["genotype"], "checkpoint genotype")
    strategy.on_search_start()

    hist_path = rt.run_dir / "alphas.jsonl"
    history = read_alpha_history(hist_path, start_epoch) if rt.is_main else []
    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    rt.print(f"search: {cfg.strategy.name} (order {cfg.strategy.order}) on {info.name}, "
             f"{steps} steps/epoch x {cfg.data.batch_size} x {rt.world_size} ranks, "
             f"epochs {start_epoch}..{cfg.epochs - 1}, metric {cfg.robustness.name}, "
             f"supernet of {ctx.model.cfg.layers} cells"
             + (f", stopping {cfg.stopping.name}" if cfg.stopping.name != "none" else ""))
    if genotype is None:
        genotype = strategy.genotype()
    means: Dict[str, float] = {}  # the last epoch's step-log means (summary: grad_share, eps, ...)
    stopped = strategy.should_stop()
    epochs_run = start_epoch
    tracker = GenotypeTracker()  # genotype changes per arch step (convergence diagnostics)
    if state is not None:
        tracker.load_state_dict(state.get("convergence", {}))
    tracker.start(genotype)
    for epoch in range(start_epoch, cfg.epochs):
        if stopped:
            break
        model, w_optim, a_optim = ctx.model, ctx.w_optim, ctx.a_optim
        changes_before = tracker.changes
        lr_epoch, lr_epochs = strategy.lr_position(epoch)  # P-DARTS: restarted every stage
        a_epoch, a_start, a_epochs = strategy.arch_lr_position(epoch)  # P-DARTS: the same
        lr = lr_at(cfg.optim, lr_epoch, 0, steps, lr_epochs)
        strategy.on_epoch_start(epoch)
        if epoch in cfg.arch_optim.reset_state_at:  # also on resume at this epoch: the checkpoint predates it
            a_optim.state.clear()
            rt.print(f"epoch {epoch}: arch optimizer state cleared (arch_optim.reset_state_at)")
        train_loader.set_epoch(epoch)
        val_loader.set_epoch(epoch)
        sums: Dict[str, torch.Tensor] = {}
        counts: Dict[str, int] = {}
        t0, c0 = time.perf_counter(), time.process_time()
        batches = zip(range(steps), train_loader, val_loader)
        for i, (xt, yt), (xv, yv) in rt.progress(batches, total=steps, desc=f"epoch {epoch}"):
            lr = lr_at(cfg.optim, lr_epoch, i, steps, lr_epochs)  # per step: the warm-up ramps per step
            for g in w_optim.param_groups:
                g["lr"] = lr
            for g in a_optim.param_groups:  # constant (reference) or a decay (cosine, cosine2) per step
                g["lr"] = arch_lr_at(cfg.arch_optim, a_epoch + i / steps, a_start, a_epochs)
            xt = xt.contiguous(memory_format=fmt)
            xv = xv.contiguous(memory_format=fmt)
            try:  # autocast: bf16 on GPU when configured (the arch step bypasses DDP's wrapper)
                with rt.accelerator.autocast():
                    logs = strategy.step(xt, yt, xv, yv, epoch=epoch, step=global_step, lr=lr)
            except NonFiniteLossError as e:
                last = rt.ckpt.latest()
                rt.print(f"stopping: {e}; the last good checkpoint is "
                         f"{last if last is not None else '(none yet)'} and was left untouched")
                return 1
            global_step += 1
            if strategy.arch_active(epoch):
                tracker.observe(strategy.genotype())  # P-DARTS caps skips with its own key
            for k, v in logs.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + v
                counts[k] = counts.get(k, 0) + 1
            if global_step % cfg.run.log_every == 0:
                rt.tb.scalars({f"step/{k}": v for k, v in logs.items()}, global_step)
            if stop_after and global_step >= stop_after:
                sys.stdout.flush()
                os._exit(137)  # test hook: die like a killed process, no cleanup at all
        elapsed = time.perf_counter() - t0
        search_time += elapsed
        search_cpu += time.process_time() - c0  # this process's CPU time (all its threads)
        means = epoch_means(sums, counts, rt.device)
        throughput = steps * cfg.data.batch_size * rt.world_size / max(elapsed, 1e-9)
        if rt.world_size > 1 and not assert_identical_across_ranks(model.arch_parameters()):
            raise RuntimeError(f"architecture parameters differ across ranks after epoch {epoch} "
                               "(a strategy skipped the arch-gradient all-reduce)")
        genotype = strategy.genotype()
        conv: Dict[str, Any] = {}
        if rt.is_main:
            history.append(alpha_record(model, epoch, genotype, tracker, changes_before))
            conv = convergence(history)
            # the epoch's means too (grad_share, R, eps...): the last epoch's alone can hide an
            # early epoch where the metric's gradient swamped the loss's
            history[-1].update(moved=conv["moved"], stable=conv["stable"], converged=conv["converged"],
                               means=dict(means))
            log_epoch(rt, model, genotype, means, lr, throughput, epoch, conv, history[-1])
            save_genotypes(rt.run_dir, genotype, epoch)
            write_alpha_history(hist_path, history)
        if strategy.on_epoch_end(epoch, genotype, means):  # "the supernet changes here"
            ctx = rebuild_for(rt, cfg, info, metric, strategy, ctx)
            mask = ctx.model.op_mask()
            kept = "all" if mask is None else f"{int(mask['normal'].sum(1).max())}"
            rt.print(f"epoch {epoch}: supernet rebuilt: {ctx.model.cfg.layers} cells, "
                     f"at most {kept} candidate ops per edge")
        epochs_run = epoch + 1
        ckpt = training_state(
            models={"model": ctx.model}, optimizers={"weights": ctx.w_optim, "arch": ctx.a_optim},
            step=global_step, epoch=epoch + 1, config=cfg, rng=capture_rng(),
            strategy=strategy.state_dict(), metric=metric.state_dict() if metric is not None else {},
            genotype=genotype.to_dict(), search_time_s=search_time, search_cpu_s=search_cpu, convergence=tracker.state_dict())
        rt.ckpt.save(ckpt)
        rt.print(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in means.items())
                 + f", lr={lr:.4g}, {throughput:.1f} img/s"
                 + (f", alpha identical on {rt.world_size} ranks" if rt.world_size > 1 else "")
                 + (f"\n  alphas: entropy {conv['entropy']:.4f} (uniform {conv['uniform_entropy']:.4f}), "
                    f"mean max softmax {conv['max_softmax']:.4f}, genotype changes "
                    f"{conv['genotype_changes']} in {conv['arch_steps']} arch steps (last at "
                    f"{conv['last_change_arch_step']}), converged {conv['converged']}" if conv else "")
                 + f"\n  genotype: {genotype}")
        stopped = strategy.should_stop()
    if stopped:
        rt.print(f"search stopped early: {stopped}")
    final = strategy.on_search_end()
    if final is not None:
        genotype = final
    if rt.is_main:
        from .genotype import save

        from .engine.io import atomic_write_json

        save(genotype, str(rt.run_dir / "genotype.json"))
        # Search cost for the report: wall seconds of the epochs (summed over resumes) x ranks;
        # search_cpu_s: CPU seconds of the epochs on rank 0 (summed over resumes).
        # convergence: entropy / mean max of softmax(alpha), genotype changes, the criterion
        atomic_write_json(str(rt.run_dir / "summary.json"), {
            "kind": "search", "search_time_s": round(search_time, 3),
            "search_cpu_s": round(search_cpu, 3), "world_size": rt.world_size,
            "device": rt.device.type, "epochs": cfg.epochs, "epochs_run": epochs_run,
            "stopped": stopped, "strategy": cfg.strategy.name, "genotype": genotype.to_dict(),
            "convergence": convergence(history), "last_epoch_means": means})
        rt.print(f"final genotype -> {rt.run_dir / 'genotype.json'}")
    return 0


def epoch_means(sums: Dict[str, torch.Tensor], counts: Dict[str, int],
                device: torch.device) -> Dict[str, float]:
    """Per-epoch means over steps and ranks (one small all-reduce; same keys on every rank)."""
    keys = sorted(sums)
    if not keys:
        return {}
    vec = torch.stack([sums[k] / counts[k] for k in keys]).to(device)  # NCCL needs CUDA tensors
    all_reduce_mean_([vec])
    return {k: float(v) for k, v in zip(keys, vec)}


def log_epoch(rt: Runtime, model: Supernet, genotype: Any, means: Dict[str, float], lr: float,
              throughput: float, epoch: int, conv: Optional[Dict[str, Any]] = None,
              record: Optional[Dict[str, Any]] = None) -> None:
    tb = rt.tb
    if not tb.active:
        return
    tb.scalars({f"epoch/{k}": v for k, v in means.items()}, epoch)
    if conv and record:  # convergence: alpha entropy / concentration, genotype changes, criterion
        tb.scalars({f"arch/{k}": record[k] for k in ("entropy", "entropy_normal", "entropy_reduce",
                                                     "max_softmax", "max_softmax_normal",
                                                     "max_softmax_reduce") if k in record}, epoch)
        tb.scalars({"arch/genotype_changes": record.get("genotype_changes", 0),
                    "arch/genotype_changes_total": conv["genotype_changes"],
                    "arch/converged": float(conv["converged"])}, epoch)
    tb.scalar("epoch/lr", lr, epoch)
    tb.scalar("epoch/throughput_img_per_s", throughput, epoch)
    tb.figure("arch/weights", heatmap_figure(model, epoch), epoch)
    tb.text("arch/genotype", genotype_markdown(genotype), epoch)
    tb.flush()


# --------------------------------------------------------------------------- CLI
def from_args(config: str = "", **overrides: Any) -> None:
    """fire target: ``--config PATH`` plus dotted ``--section.key=value`` overrides."""
    cfg = parse_cli(SearchConfig, PROG, DOC, config, overrides)
    run_checked(cfg, "search", preflight, run_search)


def preflight(cfg: SearchConfig) -> Any:
    """Config mismatches, missing data and an unusable checkpoint to resume from: refused
    before any run dir is touched. Returns the train split (loaded once, used by the loop)."""
    from pathlib import Path

    from .data import load_arrays
    from .engine import load_checkpoint

    check_config(cfg)
    arrays = load_arrays(cfg.data, "train")
    from .data import search_split

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)  # as the launcher will set it
    tr_idx, va_idx = search_split(int(arrays.labels.shape[0]), cfg.data.train_portion, cfg.run.seed)
    half = min(len(tr_idx), len(va_idx))
    if half < cfg.data.batch_size * world:
        raise ConfigError(f"key 'data.batch_size': {cfg.data.batch_size} per process x {world} processes "
                          f"is larger than a search half ({half} images); no full batch")
    last = Path(cfg.run.out_dir) / cfg.run.name / "checkpoints" / "last.pt"
    if cfg.run.resume and last.is_file():
        load_checkpoint(last, cfg)  # truncated / corrupt / other config: CheckpointError now, not after writes
    return arrays


def main(argv: Optional[list] = None) -> None:
    """Run the stage on ``argv`` (default ``sys.argv[1:]``): ``["--config", "x.yaml", "--epochs=2"]``."""
    from .entry import run_main

    run_main("search", DOC, from_args, argv)


def cli() -> None:
    """Console entry (``dsrna-search``, ``python -m dsrna_dist.search``)."""
    main()


if __name__ == "__main__":
    cli()
