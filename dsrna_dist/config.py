"""Plain frozen-dataclass configs for every stage, loaded from YAML with dotted overrides.

Why this shape: one YAML per experiment, a few ``--section.key=value`` overrides on the command
line, and every typo, wrong type or out-of-range value rejected *before* any work starts, with
an error naming the key and the file. A YAML file may start from another one with
``_base_: relative/path.yaml`` (deep-merged, the including file wins).

Field constraints live in ``field(metadata=...)`` through :func:`fld`; help text too, so
``--help`` is generated from the same place as validation.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Literal, Mapping, Optional, Tuple, Type, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names it."""


def fld(default: Any = dataclasses.MISSING, *, help: str = "", ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None,
        choices: tuple | None = None, default_factory: Any = dataclasses.MISSING,
        check: Any = None) -> Any:
    """A dataclass field with help text and range/choice constraints checked at load time.

    ``check``: optional ``value -> problem or None`` for constraints a range cannot express."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "check": check}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections
DARTS_PRIMITIVES: Tuple[str, ...] = (
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
    "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
)


def run_name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be a run name, or None: a run dir must stay inside ``run.out_dir``.

    Why: ``--run.name=../../etc/x`` used to write a whole run outside ``out_dir``, and an
    absolute name silently ignored ``out_dir``. A plain name or a relative path whose every
    component is a real name (no ``..``, ``.``, empty part) is accepted.
    """
    if not isinstance(name, str) or not name.strip():
        return "must be a non-empty name"
    if "\0" in name or "\\" in name:
        return f"{name!r} contains a NUL or backslash"
    if os.path.isabs(name) or name.startswith("~"):
        return f"{name!r} is an absolute path; give a name (outputs go to <run.out_dir>/<name>/)"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return (f"{name!r} must be a plain name or a relative path that stays under run.out_dir "
                "(no '..', '.' or empty components)")
    return None


@dataclass(frozen=True)
class RunConfig:
    name: str = fld("run", check=run_name_problem,
                    help="run name (a plain name or a relative path under out_dir); outputs go to <out_dir>/<name>/")
    out_dir: str = fld("runs", help="parent directory of run directories")
    seed: int = fld(0, ge=0, help="global seed (each rank derives its own stream from it)")
    deterministic: bool = fld(False, help="torch deterministic algorithms (slower)")
    resume: bool = fld(True, help="continue from <run>/checkpoints/last.pt when it exists")
    log_every: int = fld(20, ge=1, help="steps between logged scalars")
    progress: bool = fld(True, help="show a progress bar on rank 0")
    tensorboard: bool = fld(True, help="write TensorBoard events to <run_dir>/tb (rank 0 only)")


@dataclass(frozen=True)
class DistConfig:
    timeout_s: int = fld(1800, ge=1, help="process-group timeout: a stuck peer fails after this")
    backend: str = fld("auto", choices=("auto", "gloo", "nccl"), help="auto: nccl on CUDA, gloo on CPU")
    mixed_precision: str = fld("no", choices=("no", "bf16", "fp16"), help="GPU only; ignored on CPU; "
                               "search and train (bf16), not evaluate (attacks and bounds run in float32)")
    channels_last: bool = fld(True, help="channels_last memory format for search, train and attacks, CPU "
                              "included (fast for depthwise convs; DeepSpeed keeps contiguous parameters)")
    compile: bool = fld(False, help="torch.compile the retrained network (train stage, accelerate engine, "
                        "GPU only; search and evaluate run eager)")
    own_process_group: bool = fld(True, help="create the process group on a store prefixed by the "
                                  "torchelastic restart count (restart-safe); false = Accelerate's env://")
    find_unused_parameters: bool = fld(False, help="DDP find_unused_parameters (needed when some "
                                       "parameters get no gradient in a step)")


@dataclass(frozen=True)
class DataConfig:
    name: str = fld("fashion_mnist", help="dataset: fashion_mnist, mnist, cifar10, imagenet, synthetic")
    root: str = fld("", help="dataset root; empty = the dataset's default location")
    download: bool = fld(False, help="allow torchvision-style download when files are missing")
    loader: str = fld("memory", choices=("memory", "ffcv", "torchvision"), help="data loading backend")
    ffcv_dir: str = fld("", help="directory of .beton files (loader=ffcv)")
    batch_size: int = fld(64, ge=1, help="batch size per process")
    eval_batch_size: int = fld(256, ge=1, help="evaluation batch size per process")
    num_workers: int = fld(2, ge=0, help="loader workers (ffcv/torchvision loaders)")
    train_portion: float = fld(0.5, gt=0.0, lt=1.0, help="search: fraction of train set for weights")
    train_subset: int = fld(0, ge=0, help="use only the first N training images (0 = all)")
    test_subset: int = fld(0, ge=0, help="use only the first N test images (0 = all)")
    crop_padding: int = fld(4, ge=0, help="random-crop padding in pixels (0 disables)")
    flip: Optional[bool] = fld(None, help="random horizontal flip; unset = the dataset's default "
                               "(off for mnist/fashion_mnist/synthetic, on for cifar10/imagenet)")
    cutout: int = fld(0, ge=0, help="cutout square size in pixels (0 disables)")
    image_size: int = fld(224, ge=8, help="ImageNet crop size")
    synthetic_size: int = fld(512, ge=1, help="synthetic: number of train images")
    synthetic_test_size: int = fld(256, ge=1, help="synthetic: number of test images")
    synthetic_shape: Tuple[int, int, int] = fld((3, 32, 32), help="synthetic: image shape C,H,W")
    synthetic_classes: int = fld(10, ge=2, help="synthetic: number of classes")
    synthetic_seed: int = fld(0, ge=0, help="synthetic: seed of the class patterns and noise")
    eval_crop_ratio: float = fld(0.875, gt=0.0, le=1.0,
                                 help="ImageNet eval: resize to image_size / ratio, then center-crop image_size")
    min_scale: float = fld(0.08, gt=0.0, le=1.0, help="ImageNet train: RandomResizedCrop smallest area fraction")
    res_start: int = fld(0, ge=0, help="progressive resolution (ffcv): first training resolution (0 = off: image_size)")
    res_start_epoch: int = fld(0, ge=0, help="progressive resolution: epoch where the ramp starts")
    res_end_epoch: int = fld(0, ge=0, help="progressive resolution: epoch where image_size is reached")
    ffcv_max_resolution: int = fld(256, ge=8, help="ffcv_write: longest side of stored JPEGs (ImageNet)")
    ffcv_jpeg_quality: int = fld(90, ge=1, le=100, help="ffcv_write: JPEG quality (ImageNet)")
    ffcv_os_cache: bool = fld(True, help="ffcv: use the OS page cache (false: FFCV's own process cache)")
    val_size: int = fld(0, ge=0, help="train: images held out of the training set to select best.pt "
                        "(0 = no selection: best.pt is the final model); the test set is never used for it")
    val_seed: int = fld(0, ge=0, help="train: seed of the held-out split (identical on every rank, checked on resume)")


@dataclass(frozen=True)
class SupernetConfig:
    init_channels: int = fld(16, ge=1, help="C of the first cell")
    layers: int = fld(8, ge=1, help="number of cells (reduction cells at 1/3 and 2/3 depth)")
    nodes: int = fld(4, ge=1, help="intermediate nodes per cell (DARTS 4, DSRNA paper 3)")
    stem_multiplier: int = fld(3, ge=1, help="stem output channels = stem_multiplier * C")
    primitives: Tuple[str, ...] = fld(DARTS_PRIMITIVES, help="candidate ops, by registered name")
    partial_channels: int = fld(1, ge=1, help="PC-DARTS K: 1/K of channels go through the ops (1 = off)")
    edge_normalization: bool = fld(False, help="PC-DARTS edge betas (softmax over a node's inputs)")


@dataclass(frozen=True)
class StrategyConfig:
    name: str = fld("darts", help="search strategy: darts, pcdarts, sdarts_rs, sdarts_adv, pcdarts_adv, "
                                         "pdarts, robnet")
    order: int = fld(1, choices=(1, 2), help="DARTS 1st or 2nd order (unrolled) architecture gradient")
    arch_start_epoch: int = fld(0, ge=0, help="first epoch with architecture updates (PC-DARTS: 15)")
    fd_r: float = fld(0.01, gt=0.0, help="2nd order: finite-difference step r / ||v||")
    max_skip: int = fld(-1, ge=-1, help="derive(): at most this many skip_connect per normal cell (-1 = no cap)")


@dataclass(frozen=True)
class SDARTSConfig:
    """``sdarts``: the perturbation of softmax(alpha) in sdarts_rs, sdarts_adv and pcdarts_adv
    (Chen & Hsieh 2020); these keys were in ``strategy:`` before."""
    perturb_eps: float = fld(0.03, ge=0.0, help="perturbation radius on softmax(alpha) at start")
    perturb_eps_max: float = fld(0.3, ge=0.0, help="radius at the last epoch (linear ramp)")
    adv_steps: int = fld(7, ge=1, help="sdarts_adv/pcdarts_adv: PGD steps on alpha")
    adv_bn: str = fld("eval", choices=("eval", "train"),
                      help="sdarts_adv/pcdarts_adv: mode of the PGD-on-alpha forwards: eval = as the reference (BN running "
                           "stats, not updated by the attack); train = batch stats, running stats updated")


@dataclass(frozen=True)
class OptimConfig:
    name: str = fld("sgd", choices=("sgd", "adamw"), help="weight optimizer (adamw: momentum/nesterov unused, "
                    "weight_decay is decoupled and scaled by lr, so SGD-tuned values mean far less decay)")
    lr: float = fld(0.025, gt=0.0, help="learning rate (for the per-process batch; see README scaling rule)")
    lr_min: float = fld(0.001, ge=0.0, help="cosine schedule floor")
    schedule: str = fld("cosine", choices=("cosine", "step", "constant"), help="lr schedule")
    step_size: int = fld(1, ge=1, help="step schedule: epochs per decay")
    step_gamma: float = fld(0.97, gt=0.0, help="step schedule: decay factor")
    warmup_epochs: int = fld(0, ge=0, help="linear lr warm-up over this many epochs, per step (search and train); "
                            "then the per-epoch schedule")
    momentum: float = fld(0.9, ge=0.0, lt=1.0)
    nesterov: bool = fld(False)
    weight_decay: float = fld(3e-4, ge=0.0)
    grad_clip: float = fld(5.0, ge=0.0, help="gradient-norm clip (0 = off)")
    label_smoothing: float = fld(0.0, ge=0.0, lt=1.0)


@dataclass(frozen=True)
class ArchOptimConfig:
    lr: float = fld(3e-4, gt=0.0, help="Adam lr for alpha (and beta)")
    beta1: float = fld(0.5, ge=0.0, lt=1.0)
    beta2: float = fld(0.999, ge=0.0, lt=1.0)
    weight_decay: float = fld(1e-3, ge=0.0)
    schedule: str = fld("constant", choices=("constant", "cosine", "cosine2"),
                        help="arch lr schedule: constant (reference), cosine from lr to lr_min over the "
                             "arch-active steps (short CPU-budget searches: late steps settle the genotype), "
                             "or cosine2, its square (3/4 of the step sum, far less of it at the end)")
    lr_min: float = fld(0.0, ge=0.0, help="cosine / cosine2 schedule: arch lr at the end of the search")
    reset_state_at: Tuple[int, ...] = fld((), help="clear Adam's state (both moments, step count) at the start "
                                                   "of each of these epochs: a first arch epoch whose metric "
                                                   "gradient is ~1e5x the loss's leaves a second moment that "
                                                   "freezes alpha for the rest of the search (DSRNA-CB at "
                                                   "gamma 0.01: RESULTS.md, searches)")


@dataclass(frozen=True)
class JacobianMetricConfig:
    """``robustness.jacobian``: DSRNA-Jacobian (paper 3.1.2), R = -delta * mean Jacobian norm."""
    delta: float = fld(0.03, gt=0.0, help="radius delta of the l_p threat model in formula (15), pixel scale "
                                          "(R = -delta * mean norm; was robustness.eps)")
    projections: int = fld(1, ge=1, help="frobenius_sq(_fd): random projections per step (Hoffman et al. 2019)")
    estimator: str = fld("paper", choices=("paper", "frobenius_sq", "frobenius_sq_fd"),
                         help="paper = formula (15), exact row norms ||J_k||_q (K VJPs); "
                              "frobenius_sq = unbiased random-projection estimate of ||J||_F^2 / K (VJPs, norm 2 only); "
                              "frobenius_sq_fd = the same from finite differences along Gaussian input directions "
                              "(no double backward; bias O(fd_step))")
    fd_step: float = fld(0.01, gt=0.0, help="frobenius_sq_fd: finite-difference step h (pixel units)")
    fd_fused: bool = fld(True, help="frobenius_sq_fd: evaluate the perturbed copies in the objective's own "
                                    "forward (one forward of the joint batch; its BN statistics include them)")
    vjp: str = fld("auto", choices=("auto", "loop", "batched"),
                   help="paper estimator: K VJPs in a loop or vmapped (is_grads_batched); auto = batched on CUDA")


@dataclass(frozen=True)
class CertifiedMetricConfig:
    """``robustness.certified``: DSRNA-CB (paper 3.1.1), certified margin bounds at an adaptive eps."""
    eps: float = fld(0.03, gt=0.0, help="initial eps of the bounds, pixel scale (then moved by eps_rule; "
                                        "was robustness.eps)")
    method: str = fld("crown-ibp", choices=("ibp", "crown-ibp", "crown"), help="bound method")
    reduction: str = fld("min", choices=("min", "mean", "mean_margin"),
                         help="per-example margin bound = min (the certificate) or mean over j != y of the "
                              "K-1 margin bounds, or mean_margin: one bound of the mean margin (1 spec row, "
                              "never looser than mean)")
    eps_rule: str = fld("sign", choices=("sign", "proportional", "log", "fixed"),
                        help="eps after each call: sign: eps += eps_step * sign(target_gap - gap); "
                             "proportional: eps += eps_step * clip((target_gap - gap) / target_gap, -1, 1); "
                             "log: ln eps += clip(eps_gain * ln(target_gap / gap) / slope, +-eps_log_step), slope = "
                             "d ln gap / d ln eps estimated online (a Newton step in log-log space); fixed: never")
    eps_step: float = fld(0.001, ge=0.0, help="eps change per arch step (see eps_rule)")
    eps_target_gap: float = fld(1.0, gt=0.0, help="target global mean (upper - lower) margin bound gap")
    eps_every: int = fld(1, ge=1, help="apply the eps rule on every n-th metric call only; the upper "
                                         "bounds it needs are computed on those calls only")
    eps_min: float = fld(1e-4, gt=0.0, help="eps never goes below this")
    eps_max: float = fld(0.3, gt=0.0, help="eps never goes above this")
    eps_gain: float = fld(0.8, gt=0.0, le=1.0, help="eps_rule log: fraction of the Newton step taken")
    eps_log_step: float = fld(2.3, gt=0.0, help="eps_rule log: largest |change of ln eps| per update "
                                                  "(2.3 = a factor 10)")
    max_pool: str = fld("best", choices=("best", "cheap", "cnn-cert"),
                        help="max-pool relaxation of the bounds: best = the tighter of the two per spec row (two "
                             "CROWN backward passes on a supernet with max-pool ops), cheap or cnn-cert = one pass")


@dataclass(frozen=True)
class RobustnessConfig:
    """The metric R of the architecture objective: shared keys here, each metric's own in its section."""
    name: str = fld("none", help="robustness metric R: none, jacobian, certified")
    gamma: float = fld(0.01, ge=0.0, help="architecture objective = val_loss - gamma * R")
    norm: str = fld("inf", choices=("inf", "2"), help="threat model of the metric")
    batch_fraction: float = fld(1.0, gt=0.0, le=1.0, help="fraction of the val batch the metric is computed on")
    bn_stats: str = fld("objective", choices=("objective", "own"),
                        help="BN in train mode (certified; jacobian paper/frobenius_sq): objective = the batch statistics "
                             "of the arch objective's val forward (certified: no clean pass in the bound engine); "
                             "own = those of the metric's examples")
    trade_off: str = fld("gamma", choices=("gamma", "share"),
                         help="arch gradient = dL/dalpha - gamma_eff * dR/dalpha with gamma_eff = gamma (paper), or "
                              "share: gamma_eff = share * ||dL/dalpha|| / ||dR/dalpha|| (all-reduced norms, every step)")
    share: float = fld(0.5, gt=0.0, help="trade_off share: ||gamma_eff dR/dalpha|| / ||dL/dalpha||")
    jacobian: JacobianMetricConfig = fld(default_factory=JacobianMetricConfig)
    certified: CertifiedMetricConfig = fld(default_factory=CertifiedMetricConfig)


@dataclass(frozen=True)
class PDARTSConfig:
    """P-DARTS (Chen et al. 2019); defaults are the published CIFAR-10 settings."""
    stage_layers: Tuple[int, ...] = fld((5, 11, 17), help="pdarts: cells of the supernet in each stage")
    stage_epochs: Tuple[int, ...] = fld((25, 25, 25), help="pdarts: epochs of each stage (sum = epochs)")
    keep_ops: Tuple[int, ...] = fld((5, 3), help="pdarts: ops kept per edge after each stage but the last "
                                                 "(8 -> 5 -> 3; the last stage ends in the derived genotype)")
    skip_dropout: Tuple[float, ...] = fld((0.1, 0.4, 0.7), help="pdarts: initial dropout rate on skip-connect "
                                                                "branches, per stage")
    dropout_decay: float = fld(0.2, ge=0.0, help="pdarts: rate = p0 * exp(-decay * (epoch - arch_start_epoch)) "
                                                 "once arch updates run (reference scale_factor)")
    arch_start_epoch: int = fld(10, ge=0, help="pdarts: epochs of each stage before arch updates start")
    max_skip: int = fld(2, ge=-1, help="pdarts: at most this many skip_connect in the final normal cell "
                                       "(-1 = no cap)")


@dataclass(frozen=True)
class StoppingConfig:
    """Early stopping of the search, usable with any strategy (DARTS+, Liang et al. 2019)."""
    name: str = fld("none", choices=("none", "dartsplus"), help="stopping rule: none or dartsplus")
    max_skip: int = fld(2, ge=1, help="dartsplus: stop when the derived normal cell has >= this many skip_connect")
    patience: int = fld(10, ge=1, help="dartsplus: stop when the per-edge ranking of alpha is unchanged for "
                                       "this many consecutive epochs")
    rank_ops: str = fld("learnable", choices=("learnable", "all"),
                        help="dartsplus: ops whose alpha ranking must be stable (learnable = ops with weights)")
    min_epochs: int = fld(0, ge=0, help="dartsplus: never stop before this many epochs")


@dataclass(frozen=True)
class RobNetConfig:
    """RobNet baseline (Guo et al. 2020): one-shot PGD-AT supernet, then rank sampled cells."""
    eps: float = fld(8 / 255, gt=0.0, help="robnet: l_inf PGD radius (pixel scale), training and ranking")
    step_size: float = fld(2 / 255, gt=0.0, help="robnet: PGD step")
    train_steps: int = fld(7, ge=1, help="robnet: PGD steps in adversarial training of the supernet")
    eval_steps: int = fld(10, ge=1, help="robnet: PGD steps when ranking sampled architectures")
    samples: int = fld(1000, ge=1, help="robnet: architectures sampled and ranked after training")
    finetune_steps: int = fld(10, ge=0, help="robnet: PGD-AT steps on each sampled architecture before ranking")
    eval_batches: int = fld(4, ge=1, help="robnet: held-out (search val) batches per rank for the ranking")


@dataclass(frozen=True)
class SearchConfig:
    run: RunConfig = fld(default_factory=RunConfig)
    dist: DistConfig = fld(default_factory=DistConfig)
    data: DataConfig = fld(default_factory=DataConfig)
    model: SupernetConfig = fld(default_factory=SupernetConfig)
    strategy: StrategyConfig = fld(default_factory=StrategyConfig)
    optim: OptimConfig = fld(default_factory=OptimConfig)
    arch_optim: ArchOptimConfig = fld(default_factory=ArchOptimConfig)
    robustness: RobustnessConfig = fld(default_factory=RobustnessConfig)
    pdarts: PDARTSConfig = fld(default_factory=PDARTSConfig)
    sdarts: SDARTSConfig = fld(default_factory=SDARTSConfig)
    stopping: StoppingConfig = fld(default_factory=StoppingConfig)
    robnet: RobNetConfig = fld(default_factory=RobNetConfig)
    epochs: int = fld(50, ge=1, help="search epochs")
    steps_per_epoch: int = fld(0, ge=0, help="cap on steps per epoch (0 = full epoch); for smoke runs")


@dataclass(frozen=True)
class NetworkConfig:
    genotype: str = fld("", help="genotype JSON path or a published genotype name (e.g. DARTS_V2)")
    style: str = fld("auto", choices=("auto", "cifar", "imagenet"), help="auto: imagenet for imagenet data")
    init_channels: int = fld(36, ge=1)
    layers: int = fld(20, ge=1)
    auxiliary: bool = fld(True, help="auxiliary head at 2/3 depth")
    auxiliary_weight: float = fld(0.4, ge=0.0)
    drop_path: float = fld(0.3, ge=0.0, lt=1.0, help="final drop-path prob (ramped linearly by epoch)")
    nodes: int = fld(0, ge=0, help="intermediate nodes the genotype must have (0 = whatever it has)")
    stem_multiplier: int = fld(3, ge=1, help="CIFAR-style stem output channels = stem_multiplier * C")


@dataclass(frozen=True)
class RegimeConfig:
    name: str = fld("natural", help="training regime: natural, pgd_at (Madry), trades (Zhang et al. 2019)")
    eps: float = fld(0.0, ge=0.0, help="adversarial radius in [0,1] pixel units (reached after warmup_epochs)")
    norm: str = fld("inf", choices=("inf", "2"), help="threat model of the training attack")
    steps: int = fld(7, ge=1, help="PGD steps of the training attack")
    step_size: float = fld(0.0, ge=0.0, help="PGD step at full eps (0 = 2.5 * eps / steps, Madry et al.)")
    random_start: bool = fld(True, help="start the training attack uniformly in the eps ball")
    beta: float = fld(6.0, ge=0.0, help="trades: weight of the KL robustness term")
    warmup_epochs: float = fld(0.0, ge=0.0, help="eps ramps linearly from 0 to eps over this many epochs (per step)")
    attack_bn: str = fld("eval", choices=("eval", "train"),
                         help="BatchNorm during attack generation: eval = running statistics (TRADES reference); "
                              "train = batch statistics, running statistics restored afterwards")
    ramp_start: float = fld(0.0, ge=0.0, help="epochs of eps = 0 (natural training) before the eps ramp starts")
    kappa_end: float = fld(0.0, ge=0.0, le=1.0, help="ibp/crown_ibp: final weight of the clean loss (kappa ramps "
                           "1 -> kappa_end with eps; Zhang et al. 2020: 0, Gowal et al. 2018: 0.5)")
    ibp_init: bool = fld(True, help="ibp/crown_ibp: IBP-aware initialisation of conv/linear weights, "
                         "N(0, 2*pi/fan_in^2) (Shi et al. 2021), on a fresh run only")
    bound_reg: float = fld(0.0, ge=0.0, help="ibp/crown_ibp: weight lambda of the bound-balance regulariser "
                           "during the eps ramp (Shi et al. 2021: 0.5; 0 = off)")
    bound_reg_tol: float = fld(0.5, gt=0.0, le=1.0, help="ibp/crown_ibp: tolerance alpha of the bound-balance "
                               "terms (Shi et al. 2021: 0.5)")
    bound_reg_terms: Tuple[str, ...] = fld(("tightness", "relu"), help="ibp/crown_ibp: bound-balance terms, "
                                           "any of tightness (interval growth), relu (active/inactive balance)")
    bound_reg_decay: bool = fld(True, help="ibp/crown_ibp: bound-balance weight lambda * (1 - eps / eps_max) "
                                "(Shi et al.), else lambda throughout the ramp")


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig = fld(default_factory=RunConfig)
    dist: DistConfig = fld(default_factory=DistConfig)
    data: DataConfig = fld(default_factory=DataConfig)
    model: NetworkConfig = fld(default_factory=NetworkConfig)
    optim: OptimConfig = fld(default_factory=OptimConfig)
    epochs: int = fld(600, ge=1)
    steps_per_epoch: int = fld(0, ge=0, help="cap on steps per epoch (0 = full epoch)")
    engine: str = fld("accelerate", choices=("accelerate", "deepspeed"), help="DDP via Accelerate or DeepSpeed ZeRO")
    zero_stage: int = fld(2, choices=(0, 1, 2), help="DeepSpeed ZeRO stage")
    ema: float = fld(0.0, ge=0.0, lt=1.0, help="weight EMA decay (0 = off)")
    scale_lr: bool = fld(False, help="linear scaling: lr *= world_size * batch_size / base_batch_size")
    base_batch_size: int = fld(128, ge=1, help="global batch the configured optim.lr was tuned for (scale_lr)")
    eval_every: int = fld(1, ge=1, help="epochs between validation evaluations (data.val_size; the last epoch "
                          "always evaluates, and is the only one that touches the test set)")
    precise_bn_batches: int = fld(0, ge=0, help="precise BN: before every evaluation, re-estimate the BN running "
                                  "statistics as the plain average over this many batches of data.batch_size "
                                  "unaugmented training images (in total over ranks, rounded down to whole batches "
                                  "per rank; never the held-out split); 0 = off: the training EMA as is")
    regime: RegimeConfig = fld(default_factory=RegimeConfig)


@dataclass(frozen=True)
class AttackConfig:
    name: str = fld("pgd", help="attack: clean, fgsm, pgd, cw, autoattack, square")
    eps: float = fld(8 / 255, ge=0.0, help="radius in [0,1] pixel units (cw: 0 = unbounded, paper style)")
    norm: str = fld("inf", choices=("inf", "2"), help="threat model (cw is always l2)")
    steps: int = fld(10, ge=0, help="pgd: iterations; cw: Adam iterations per c; square: queries")
    step_size: float = fld(2 / 255, ge=0.0, help="pgd: step (l_inf: per pixel; l_2: step length)")
    restarts: int = fld(1, ge=1, help="pgd: random restarts (an example counts as broken if any breaks it)")
    random_start: bool = fld(True, help="pgd: start uniformly in the eps ball (seeded per example)")
    loss: str = fld("ce", choices=("ce", "margin"), help="fgsm/pgd: cross-entropy or logit-margin loss")
    c: float = fld(1.0, gt=0.0, help="C&W: constant c (initial value when binary searching)")
    kappa: float = fld(0.0, ge=0.0, help="C&W: confidence")
    lr: float = fld(0.01, gt=0.0, help="C&W: Adam lr (in tanh space)")
    binary_search_steps: int = fld(1, ge=1, help="C&W: binary-search rounds over c (1 = fixed c)")
    label: str = fld("", help="column name in reports (default derived from name/steps, e.g. PGD-20)")
    num_examples: int = fld(0, ge=0, help="run on the first N test examples only (0: all); for attacks too "
                            "costly for the whole set, e.g. AutoAttack on CPU; the summary gives each attack's n")


@dataclass(frozen=True)
class CertifyConfig:
    enabled: bool = fld(True, help="compute certified radii (needs dsrna_dist.bounds)")
    methods: Tuple[str, ...] = fld(("crown-ibp",), help="bound methods: ibp, crown-ibp, crown")
    norms: Tuple[str, ...] = fld(("inf", "2"), help="norms to certify: inf, 2")
    num_examples: int = fld(100, ge=1, help="first N correctly classified test examples")
    bisection_steps: int = fld(15, ge=1, help="bisection steps on eps per example (CNN-Cert: 15); "
                               "with rel_tol > 0 the most probes per example")
    rel_tol: float = fld(0.0, ge=0.0, help="bisect each radius to this relative resolution (hi/lo <= 1 + rel_tol); "
                         "0 = exactly bisection_steps probes")
    eps_init: float = fld(0.05, gt=0.0, help="first eps tried by the bisection (pixel units)")
    random_target: bool = fld(True, help="also report the CNN-Cert style random-target radius")
    batch_size: int = fld(32, ge=1, help="examples per bound computation")
    crown_passes: int = fld(3, ge=0, help="full CROWN: at most this many full passes per example, each followed by "
                            "one-backward probes below it (0 = every probe a full pass: exact, ~10x dearer)")
    crown_extra_passes: int = fld(0, ge=0, help="full CROWN: up to this many more passes for examples with no failed "
                                  "pass whose last certified pass kept > crown_extra_margin of the clean margin "
                                  "(a flat margin: the radius may lie far above)")
    crown_extra_margin: float = fld(0.25, ge=0.0, le=1.0, help="full CROWN: the margin fraction above which an "
                                    "unbracketed example gets the extra passes")
    crown_forward: bool = fld(True, help="full CROWN: forward-mode linear bounds first (IBP ∩ forward boxes), "
                              "backward passes only on neurons still loose (never looser on the tests; fewer backward rows)")


@dataclass(frozen=True)
class MaskingConfig:
    """Gradient-masking checks (Carlini et al. 2019) run by evaluate; a failed check is a warning."""
    enabled: bool = fld(True, help="run the gradient-masking checks (extra attacks on the first num_examples)")
    num_examples: int = fld(500, ge=0, help="extra check attacks run on the first N test examples (0 = all)")
    eps: float = fld(0.0, ge=0.0, help="eps of the effort and black-box checks (0 = eps of the first pgd attack)")
    norm: str = fld("", choices=("", "inf", "2"), help="their norm ('' = that attack's norm)")
    steps: Tuple[int, ...] = fld((10, 50), help="PGD step counts compared (step size 2.5 eps / steps)")
    restarts: int = fld(5, ge=1, help="restarts of the longest PGD of the effort check")
    huge_eps: float = fld(1.0, gt=0.0, help="l_inf eps at which PGD must reach 0% (1.0 = the whole box)")
    huge_steps: int = fld(20, ge=1, help="PGD steps at huge_eps (step huge_eps / 4)")
    blackbox_queries: int = fld(1000, ge=0, help="Square (l_inf) queries of the black-box check (0 = skip it)")
    tolerance: float = fld(1.0, ge=0.0, help="percentage points a comparison may go the wrong way unflagged")
    tolerance_examples: int = fld(1, ge=0, help="... or this many examples, whichever is larger (small test sets)")


@dataclass(frozen=True)
class EvalConfig:
    run: RunConfig = fld(default_factory=RunConfig)
    dist: DistConfig = fld(default_factory=DistConfig)
    data: DataConfig = fld(default_factory=DataConfig)
    checkpoint: str = fld("", help="checkpoint to evaluate (a train run's .pt)")
    attacks: Tuple[AttackConfig, ...] = fld(
        (AttackConfig(name="fgsm", eps=2 / 255, steps=1, random_start=False),
         AttackConfig(name="pgd", steps=10), AttackConfig(name="pgd", steps=20),
         AttackConfig(name="cw", eps=0.0, steps=60)), help="attacks to run, in order (clean always runs)")
    eps_sweep: Tuple[float, ...] = fld((), help="also run sweep_attack at each of these eps (robust-accuracy-vs-eps plot)")
    sweep_attack: AttackConfig = fld(default_factory=lambda: AttackConfig(name="pgd", steps=20),
                                     help="attack template for eps_sweep (its eps is replaced; step_size 0 = eps/4)")
    certify: CertifyConfig = fld(default_factory=CertifyConfig)
    chunk_size: int = fld(0, ge=0, help="examples per rank between result writes (0 = data.eval_batch_size)")
    masking: MaskingConfig = fld(default_factory=MaskingConfig)
    certified_acc_eps: Tuple[float, ...] = fld((), help="l_inf eps for certified accuracy next to the mean radius "
                                               "(empty = the eps of the l_inf attacks)")
    certified_acc_eps_l2: Tuple[float, ...] = fld((), help="l_2 eps for certified accuracy (empty = the eps of the l_2 attacks)")


@dataclass(frozen=True)
class ReportConfig:
    runs: str = fld("runs", help="directory holding run directories (searched recursively)")
    out: str = fld("report.md", help="markdown report path; plots go next to it")
    plots_dir: str = fld("", help="where PNGs go (default: <out stem>_plots/ next to the report)")
    plots: bool = fld(True, help="draw PNG plots (alpha heatmaps, cells, eps sweep, radius histograms)")
    std_ddof: int = fld(1, choices=(0, 1), help="std over seeds: 1 = sample std (n-1), 0 = population")
    decimals: int = fld(2, ge=0, le=6, help="decimals for accuracies (%)")


# --------------------------------------------------------------------------- machinery
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` against the annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"key {key!r}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"key {key!r}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"key {key!r}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, Tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            if isinstance(value, str) and args and args[-1] is Ellipsis and args[0] is str:
                value = [v for v in value.split(",") if v]  # --x=a,b convenience
            else:
                raise ConfigError(f"key {key!r}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"key {key!r}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"key {key!r}: expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"key {key!r}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads "1e-3" as a string
                except ValueError:
                    pass
            raise ConfigError(f"key {key!r}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)  # fire parses --norm=2 as an int
            raise ConfigError(f"key {key!r}: expected str, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"key {key!r}: unsupported field type {_type_name(tp)}")


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"key {key!r}: {value!r} is not one of {list(meta['choices'])}")
    problem = meta["check"](value) if meta.get("check") is not None else None
    if problem:
        raise ConfigError(f"key {key!r}: {problem}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for op, test, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                           ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        bound = meta.get(op)
        if bound is not None and not test(value, bound):
            raise ConfigError(f"key {key!r}: {value!r} must be {word} {bound}")


# --------------------------------------------------------------------------- moved keys
class ConfigDeprecationWarning(DeprecationWarning):
    """A config used a key that moved to its component's own section; it works for one release."""


# shown once per key even outside __main__ (Python hides DeprecationWarning by default)
warnings.filterwarnings("default", category=ConfigDeprecationWarning)

_JACOBIAN_KEYS = ("projections", "estimator", "fd_step", "fd_fused", "vjp")
_CERTIFIED_KEYS = ("method", "reduction", "eps_rule", "eps_step", "eps_target_gap", "eps_every", "eps_min",
                   "eps_max", "eps_gain", "eps_log_step")
_SDARTS_KEYS = ("perturb_eps", "perturb_eps_max", "adv_steps", "adv_bn")


def _robustness_moves(d: Mapping[str, Any]) -> Dict[str, Tuple[str, ...]]:
    """Old flat ``robustness.<key>`` -> new keys. ``eps`` meant the Jacobian metric's delta and the
    certified metric's initial eps: it goes to the selected metric's key (to both when none is)."""
    moves = {k: (f"jacobian.{k}",) for k in _JACOBIAN_KEYS}
    moves.update({k: (f"certified.{k}",) for k in _CERTIFIED_KEYS})
    moves["eps"] = {"jacobian": ("jacobian.delta",), "certified": ("certified.eps",)}.get(
        d.get("name"), ("jacobian.delta", "certified.eps"))
    return moves


def _search_moves(d: Mapping[str, Any]) -> Dict[str, Tuple[str, ...]]:
    return {f"strategy.{k}": (f"sdarts.{k}",) for k in _SDARTS_KEYS}


def _pop_dotted(d: Dict[str, Any], path: str) -> Any:
    """Pop dotted ``path`` from ``d``; the nested mappings on the way are copied (the caller's,
    e.g. a checkpoint's config, stay untouched). ``_NOT_GIVEN`` when absent."""
    *parents, last = path.split(".")
    cur: Any = d
    for p in parents:
        cur = cur.get(p) if isinstance(cur, Mapping) else None
    if not isinstance(cur, Mapping) or last not in cur:
        return _NOT_GIVEN
    cur = d
    for p in parents:
        cur[p] = dict(cur[p])
        cur = cur[p]
    return cur.pop(last)


_NOT_GIVEN = object()
# class -> (its mapping -> {old dotted key: new dotted keys}), relative to that class's section
_MOVED: Dict[type, Callable[[Mapping[str, Any]], Dict[str, Tuple[str, ...]]]] = {}


def _move_keys(cls: type, data: Mapping[str, Any], prefix: str, warn: bool) -> Dict[str, Any]:
    """Old keys of ``cls``'s section moved to their new place (the old key wins over a value
    already there: it is what the old config or override meant), warned as deprecated."""
    out = dict(data)
    moves = _MOVED.get(cls)
    if moves is None:
        return out
    for old, new in moves(out).items():
        value = _pop_dotted(out, old)
        if value is _NOT_GIVEN:
            continue
        for n in new:
            set_dotted(out, n, value)
        if warn:
            warnings.warn(f"config key {prefix + old!r} is deprecated and will be removed in the next release: "
                          f"use {' / '.join(repr(prefix + n) for n in new)}", ConfigDeprecationWarning, stacklevel=2)
    return out


def upgrade_dict(cls: type, data: Mapping[str, Any]) -> Dict[str, Any]:
    """``data`` (a config of ``cls`` in dict form, e.g. a checkpoint's) with moved keys at their
    new place, silently and without validation: to compare an old run's config with a new one."""
    out = _move_keys(cls, data, "", warn=False)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(out.get(f.name), Mapping):
            out[f.name] = upgrade_dict(hints[f.name], out[f.name])
    return out


def _build(cls: Type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    data = _move_keys(cls, data, prefix, warn=True)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key {prefix + unknown[0]!r}; valid keys here: "
                          f"{', '.join(prefix + n for n in fields)}")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        v = _coerce(value, hints[name], key)
        _check_range(v, fields[name].metadata, key)
        kwargs[name] = v
    return cls(**kwargs)


_MOVED[RobustnessConfig] = _robustness_moves
_MOVED[SearchConfig] = _search_moves


def _deep_merge(base: Dict[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def read_yaml(path: str, _seen: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Read a YAML mapping, following ``_base_`` includes (relative to the including file)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"config {path}: _base_ include cycle")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: invalid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config {path}: top level must be a mapping")
    base = data.pop("_base_", None)
    if base:
        base_path = os.path.join(os.path.dirname(path), base)
        data = _deep_merge(read_yaml(base_path, _seen + (os.path.abspath(path),)), data)
    return dict(data)


def set_dotted(d: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.replace("-", "_").split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = dict(nxt) if isinstance(nxt, Mapping) else {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def load_config(cls: Type[T], path: str | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    """Build ``cls`` from an optional YAML file plus dotted overrides; errors name key and file."""
    data: Dict[str, Any] = read_yaml(path) if path else {}
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v)
    try:
        with warnings.catch_warnings(record=True) as moved:
            warnings.simplefilter("always", ConfigDeprecationWarning)
            cfg = _build(cls, data)
        src = (f"config {path}" if path else "config") + (" + command-line overrides" if overrides else "")
        for w in moved:  # re-issued naming the file; stacklevel 3: the stage's load_config call
            warnings.warn(f"{src}: {w.message}", w.category, stacklevel=3)
        return cfg
    except ConfigError as e:
        src = f"config {path}" if path else "config"
        if overrides:
            src += " + command-line overrides"
        raise ConfigError(f"{src}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Plain dict/list form of a config (tuples become lists) for YAML/JSON/checkpoints."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(cls: Type[T], data: Mapping[str, Any]) -> T:
    """Inverse of :func:`to_dict` with full validation (used when reading checkpoints)."""
    return _build(cls, data)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: T, **dotted: Any) -> T:
    """Copy of a frozen config with dotted keys replaced, re-validated."""
    data = to_dict(cfg)
    for k, v in dotted.items():
        set_dotted(data, k, v)
    return _build(type(cfg), data)


def format_help(cls: Type[Any], prog: str, doc: str = "") -> str:
    """``--help`` text generated from the dataclass fields, their defaults and help strings."""
    lines = [f"usage: {prog} [--config PATH.yaml] [--section.key=value ...]", ""]
    if doc:
        lines += [doc.strip(), ""]
    lines += ["options:", "  --config PATH        YAML config (may use _base_: to include another)",
              "  --help               show this message", ""]

    def walk(c: Any, prefix: str) -> None:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"[{prefix}{f.name}]")
                walk(tp, prefix + f.name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            default = to_dict(default)
            meta = f.metadata
            extra = f" one of {list(meta['choices'])}" if meta.get("choices") else ""
            text = meta.get("help", "")
            lines.append(f"  --{prefix}{f.name}={default!r}  ({_type_name(tp)}{extra}) {text}".rstrip())

    walk(cls, "")
    return "\n".join(lines)


def fire_main(cls: Type[Any], prog: str, doc: str, target: Any, argv: Optional[list] = None) -> None:
    """Stage entry: generated ``--help`` first (fire would swallow it), then fire calls ``target``
    with ``config=`` and the dotted overrides."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("--help", "-h") for a in argv):
        print(format_help(cls, prog, doc))
        sys.exit(0)
    import fire

    fire.Fire(target, command=argv, name=prog)


def parse_cli(cls: Type[T], prog: str, doc: str, config: Optional[str], overrides: Mapping[str, Any]) -> T:
    """Shared entry for the stage CLIs: real ``--help``, then validated config or a one-line error."""
    if "help" in overrides or "h" in overrides or any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(format_help(cls, prog, doc))
        sys.exit(0)
    try:
        return load_config(cls, config or None, overrides)
    except ConfigError as e:
        if all(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            # under a launcher: the ranks agree and rank 0 alone prints the line (exits here)
            from .engine.runtime import agree_on_start

            agree_on_start(e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
