"""Evaluation stage: attack and certify a trained network, one record per test example.

    python -m dsrna_dist.evaluate --config configs/eval/<name>.yaml --checkpoint runs/x/checkpoints/best.pt
    torchrun --standalone --nproc_per_node 2 -m dsrna_dist.evaluate --config ...   (or accelerate launch)

The test set (data.test_subset honoured) is sharded over ranks with strided indices and no
padding; each chunk's records are gathered exactly and appended by rank 0 (flush + fsync) to
<run>/attacks.jsonl (index, label, clean_pred, attack, eps, norm, adv_pred, correct) and, for
the first certify.num_examples correctly classified examples, <run>/certify.jsonl (index,
label, method, norm, radius, radius_target, target). An interrupted evaluation restarted with
the same command skips every example already on disk; <run>/summary.json (clean and robust
accuracy in %, mean certified radii, checkpoint, genotype, params, throughput) is rewritten
atomically at the end. A missing or corrupt checkpoint fails before anything is written.

Gradient-masking checks (``masking:``, attacks/masking.py) add a few attacks labelled ``mask/...``
on the first masking.num_examples examples (FGSM, PGD-k, PGD-K, PGD-K x restarts, Square, PGD at
l_inf eps 1); summary.json["masking"] holds every check with its numbers and the warnings of
the flagged ones (also logged). The eps sweep in the summary starts at the clean point (eps 0).

Test hook: ``DSRNA_EVAL_STOP_AFTER_CHUNKS=N`` kills the process (os._exit(137)) after N chunks.
"""
from __future__ import annotations

from .entry import help_before_imports

DOC = ("Attack (FGSM, PGD, C&W, AutoAttack, Square) and certify a trained network, with gradient-masking "
       "checks; per-example JSONL + summary.json.")
help_before_imports(__name__, "evaluate", DOC)  # before torch: `--help` < 1 s

import hashlib  # noqa: E402  (the heavy imports below come after the --help fast path)
import json
import logging
import math
import os
import statistics
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .attacks import Attack, AttackError, attack_label, build_attack
from .config import AttackConfig, ConfigError, EvalConfig, parse_cli, to_dict
from .engine.logs import LOGGER_NAME

PROG = "python -m dsrna_dist.evaluate"
STOP_ENV = "DSRNA_EVAL_STOP_AFTER_CHUNKS"
ATTACKS_FILE, CERTIFY_FILE, SUMMARY_FILE, STATE_FILE = "attacks.jsonl", "certify.jsonl", "summary.json", "eval_state.json"


# --------------------------------------------------------------------------- plan (no writes)
@dataclass
class Plan:
    cfg: EvalConfig
    model: nn.Module
    train_cfg: Any
    genotype: Any
    attacks: List[Tuple[str, Optional[Attack], Dict[str, Any]]]  # (label, attack or None=clean, meta)
    sweep_label: str
    fingerprint: Dict[str, Any]
    data: Any = None  # the TestSet, opened by preflight (a missing dataset fails before any write)


_log = logging.getLogger(LOGGER_NAME)   # the runtime's logger: INFO on rank 0 only


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _attack_seed(run_seed: int, label: str) -> int:
    """Per-attack seed from the run seed and the attack's label (adding attacks changes nothing else)."""
    return (int(run_seed) * 1000003 + zlib.crc32(label.encode())) & 0x7FFFFFFF


def _meta(a: AttackConfig, atk: Attack, **extra: Any) -> Dict[str, Any]:
    """What the summary, the masking checks and the report's table headers need to know of an attack."""
    return {"name": a.name, "eps": float(a.eps), "norm": atk.norm, "sweep": False, "steps": int(a.steps),
            "restarts": int(a.restarts), "step_size": float(a.step_size), "c": float(a.c),
            "blackbox": bool(getattr(atk, "blackbox", False)),
            "per_example_seeded": bool(getattr(atk, "per_example_seeded", True)), **extra}


def build_attacks(cfg: EvalConfig) -> Tuple[List[Tuple[str, Optional[Attack], Dict[str, Any]]], str]:
    """clean + cfg.attacks + the eps sweep + the gradient-masking check attacks, with unique
    labels; config errors name the key.

    eps_sweep entries of 0 are the clean point (no attack runs; the summary's sweep always starts
    there). Check attacks carry ``role`` and, with masking.num_examples, ``max_index``: they run
    on the first N test examples only; so does an attack with ``num_examples`` (its n is in the
    summary's ``robust_acc_n``, its accuracy is over those N). The effort-check attacks share one seed, so the restarted
    PGD's first restart is the plain PGD of the same length.
    """
    from .attacks.masking import check_specs

    out: List[Tuple[str, Optional[Attack], Dict[str, Any]]] = [
        ("clean", None, {"name": "clean", "eps": 0.0, "norm": "inf", "sweep": False})]
    specs: List[Tuple[str, AttackConfig, Dict[str, Any], int]] = []
    for i, a in enumerate(cfg.attacks):
        if a.name == "clean":
            continue
        extra = {"max_index": int(a.num_examples)} if a.num_examples else {}
        specs.append((f"attacks[{i}]", a, extra, _attack_seed(cfg.run.seed, attack_label(a))))
    sweep_label = attack_label(cfg.sweep_attack)
    for j, e in enumerate(cfg.eps_sweep):
        if e < 0 or not math.isfinite(e):
            raise ConfigError(f"key 'eps_sweep[{j}]': eps must be >= 0 (0 = the clean point), got {e}")
        if e == 0:
            continue
        step = cfg.sweep_attack.step_size or float(e) / 4  # 0 = scale the step with eps
        a = replace(cfg.sweep_attack, eps=float(e), step_size=step, label=f"{sweep_label}@{e:.6g}")
        specs.append((f"eps_sweep[{j}]", a, {"sweep": True}, _attack_seed(cfg.run.seed, attack_label(a))))
    mask_n = cfg.masking.num_examples or None
    for key, a, role in check_specs(cfg):
        seed = _attack_seed(cfg.run.seed, "masking" if role == "effort" else attack_label(a))
        specs.append((key, a, {"role": role, "max_index": mask_n}, seed))
    seen = {"clean"}
    for key, a, extra, seed in specs:
        try:
            atk = build_attack(a, seed)
        except (AttackError, KeyError) as e:
            raise ConfigError(f"key '{key}': {str(e).strip(chr(39))}") from None
        if atk.label in seen:
            raise ConfigError(f"key '{key}': duplicate attack label {atk.label!r}; set a distinct 'label'")
        seen.add(atk.label)
        out.append((atk.label, atk, _meta(a, atk, **extra)))
    return out, sweep_label


def runs_on(meta: Dict[str, Any], index: int) -> bool:
    """Whether an attack runs on test example ``index`` (check attacks: the first N only)."""
    m = meta.get("max_index")
    return m is None or int(index) < int(m)


def preflight(cfg: EvalConfig) -> Plan:
    """Everything that can fail on bad input, before a run directory is touched."""
    from .engine import CheckpointError
    from .space.network import load_trained

    if not cfg.checkpoint:
        raise ConfigError("key 'checkpoint': no checkpoint given (--checkpoint runs/<train run>/checkpoints/best.pt)")
    if not os.path.isfile(cfg.checkpoint):
        raise CheckpointError(f"checkpoint {cfg.checkpoint}: no such file")
    try:
        model, train_cfg, genotype = load_trained(cfg.checkpoint, "cpu")
    except CheckpointError as e:  # torch's unpickling messages span lines: keep one
        msg = " ".join(str(e).split())
        raise CheckpointError(msg if len(msg) < 400 else msg[:397] + "...") from None
    if train_cfg.data.name != cfg.data.name:
        raise ConfigError(f"key 'data.name': checkpoint {cfg.checkpoint} was trained on "
                          f"{train_cfg.data.name!r}, the eval config says {cfg.data.name!r}")
    if cfg.data.name == "synthetic":
        for k in ("synthetic_shape", "synthetic_classes", "synthetic_seed"):
            if getattr(cfg.data, k) != getattr(train_cfg.data, k):
                raise ConfigError(f"key 'data.{k}': checkpoint {cfg.checkpoint} was trained with "
                                  f"{getattr(train_cfg.data, k)!r}, the eval config says {getattr(cfg.data, k)!r}")
    attacks, sweep_label = build_attacks(cfg)
    if cfg.certify.enabled:
        bad = [m for m in cfg.certify.methods if m not in ("ibp", "crown-ibp", "crown")]
        if bad:
            raise ConfigError(f"key 'certify.methods': unknown bound method {bad[0]!r}; valid: ibp, crown-ibp, crown")
        badn = [n for n in cfg.certify.norms if n not in ("inf", "2")]
        if badn:
            raise ConfigError(f"key 'certify.norms': unknown norm {badn[0]!r}; valid: inf, 2")
    fp = {"checkpoint_sha256": _sha256(cfg.checkpoint), "data": to_dict(cfg.data),
          "attacks": [{"label": lab, **meta, **({"config": to_dict(a.cfg)} if a is not None else {})}
                      for lab, a, meta in attacks],
          "certify": to_dict(cfg.certify), "seed": cfg.run.seed,
          # the attacks' layout changes their float rounding: a resume must not mix layouts
          "attack_layout": "channels_last" if cfg.dist.channels_last else "contiguous"}
    fp = comparable(fp)
    check_eval_dir(cfg, fp)
    data = TestSet(cfg.data)
    return Plan(cfg, model, train_cfg, genotype, attacks, sweep_label, fp, data)


def comparable(fingerprint: Dict[str, Any]) -> Dict[str, Any]:
    """The fingerprint without the keys that change no result (batching, loading), so a resume
    may change them: a certify batch of 1 saves every example of a CROWN run that takes minutes
    per example (each example's radius search is its own; the resume test checks the records)."""
    fp = json.loads(json.dumps(fingerprint))
    for k in ("batch_size", "eval_batch_size", "num_workers", "loader", "ffcv_dir", "root", "download"):
        fp.get("data", {}).pop(k, None)
    cert = fp.get("certify", {})
    cert.pop("batch_size", None)
    if not cert.get("crown_extra_passes"):  # no extra passes: the search before they existed
        cert.pop("crown_extra_passes", None)
        cert.pop("crown_extra_margin", None)
    return fp


def fingerprint_diff(old: Dict[str, Any], new: Dict[str, Any]) -> Optional[str]:
    """The first section in which two evaluations' fingerprints differ in a result-changing key
    (None: the same evaluation, so a resume may continue it)."""
    a, b = comparable(old), comparable(new)
    return None if a == b else next((k for k in b if b[k] != a.get(k)), "?")


def check_eval_dir(cfg: EvalConfig, fingerprint: Dict[str, Any]) -> None:
    """Refuse (before any write) a run dir holding results of a different evaluation."""
    state_path = Path(cfg.run.out_dir) / cfg.run.name / STATE_FILE
    if not (cfg.run.resume and state_path.is_file()):
        return
    try:
        old = json.loads(state_path.read_text()).get("fingerprint")
    except (ValueError, AttributeError, OSError):
        return  # unreadable bookkeeping: run_eval starts over from the result files it can read
    diff = fingerprint_diff(old, fingerprint) if isinstance(old, dict) else None
    if diff is not None:
        raise ConfigError(f"run dir {state_path.parent} holds results of a different evaluation ('{diff}' "
                          "differs); choose another run.name or pass --run.resume=false to start over")


# --------------------------------------------------------------------------- result files
def read_records(path: Path) -> List[Dict[str, Any]]:
    """Per-example result records; a torn last line from a killed writer is dropped."""
    from .engine.io import read_jsonl

    return [r for r in read_jsonl(path) if "index" in r]


def append_records(path: Path, records: Sequence[Dict[str, Any]]) -> None:
    """Append + flush + fsync: after this returns the records survive a crash."""
    if not records:
        return
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def complete(records: Sequence[Dict[str, Any]], key: str, wanted: Any) -> Dict[int, List[Dict[str, Any]]]:
    """index -> its records, only for indices that have one record per wanted key value
    (``wanted``: a list, or a function index -> list when attacks run on a prefix only)."""
    by: Dict[int, Dict[Any, Dict[str, Any]]] = {}
    for r in records:
        k = (r.get(key), r.get("norm")) if key == "method" else r.get(key)
        by.setdefault(int(r["index"]), {})[k] = r
    want_of = wanted if callable(wanted) else (lambda i: wanted)
    out: Dict[int, List[Dict[str, Any]]] = {}
    for i, d in by.items():
        w = list(want_of(i))
        if set(d) >= set(w):
            out[i] = [d[k] for k in w]
    return out


# --------------------------------------------------------------------------- work
class TestSet:
    """Random access to the test split by example index, whatever its storage.

    Why: evaluation shards *indices* over ranks (no padding, exact gather), so it needs
    ``x(idx)``/``y(idx)`` rather than a loader. Small sets are one in-memory uint8 tensor;
    ImageNet-style folders are decoded per index (Resize + CenterCrop, as the eval loader does).
    """

    def __init__(self, cfg: Any) -> None:
        from .data import DataError, get_dataset, load_arrays

        try:
            data = load_arrays(cfg, "test")
            self.images, self.labels, self.folder = data.images, data.labels, None
        except DataError:
            ds_cls = get_dataset(cfg.name)
            if getattr(ds_cls, "in_memory", True):
                raise
            from .data.torchvision_loader import imagenet_transform

            tf = imagenet_transform(False, cfg.image_size, cfg.eval_crop_ratio, cfg.min_scale, False)
            self.folder = ds_cls.image_folder(cfg, "test", transform=tf)
            n = len(self.folder) if not cfg.test_subset else min(cfg.test_subset, len(self.folder))
            self.images = None
            self.labels = torch.as_tensor(self.folder.targets[:n], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def x(self, idx: Sequence[int], device: torch.device) -> torch.Tensor:
        if self.folder is not None:
            batch = torch.stack([self.folder[i][0] for i in idx]) if idx else torch.zeros(0)
        else:
            batch = self.images[torch.as_tensor(list(idx), dtype=torch.long)]
        return batch.to(device).float().div_(255.0)

    def y(self, idx: Sequence[int], device: torch.device) -> torch.Tensor:
        return self.labels[torch.as_tensor(list(idx), dtype=torch.long)].to(device)


def attack_records(model: nn.Module, attacks, x: torch.Tensor, y: torch.Tensor, idx: Sequence[int],
                   batch: int, cost: Optional[Dict[str, List[float]]] = None) -> List[Dict[str, Any]]:
    """One record per example per attack; ``cost`` (label -> [process CPU s, wall s]) accumulates
    what each attack cost, so the summary can say which attack the evaluation time went to (the
    wall clock stops once the predictions are read back, so a GPU's work counts; CPU seconds
    alone miss it). Each attack on each batch is logged: a stage that stalls on one device says
    on which attack."""
    recs: List[Dict[str, Any]] = []
    for s in range(0, len(idx), batch):
        xb, yb, ib = x[s:s + batch], y[s:s + batch], list(idx[s:s + batch])
        with torch.no_grad():
            clean = model(xb).argmax(1).tolist()   # host lists: one device read per batch, not per example
        truth = yb.tolist()
        for label, atk, meta in attacks:
            sel = [k for k, i in enumerate(ib) if runs_on(meta, i)]
            if len(sel) == len(ib):
                recs += _attack_batch(model, label, atk, meta, xb, yb, ib, clean, truth, cost)
            elif sel:  # a check attack on the first N examples only; their clean pass is reused
                recs += _attack_batch(model, label, atk, meta, xb[sel], yb[sel], [ib[k] for k in sel],
                                      [clean[k] for k in sel], [truth[k] for k in sel], cost)
    return recs


def _attack_batch(model: nn.Module, label: str, atk, meta: Dict[str, Any], xb: torch.Tensor, yb: torch.Tensor,
                  ib: List[int], clean: List[int], truth: List[int],
                  cost: Optional[Dict[str, List[float]]]) -> List[Dict[str, Any]]:
    """One attack on one batch whose clean predictions are known: its records, its cost added."""
    if atk is None:
        adv = clean
    else:
        t0, w0 = time.process_time(), time.perf_counter()
        xa = atk(model, xb, yb, ib)
        with torch.no_grad():
            adv = model(xa).argmax(1).tolist()   # reading the predictions waits for the device
        dt, dw = time.process_time() - t0, time.perf_counter() - w0
        if cost is not None:
            acc = cost.setdefault(label, [0.0, 0.0])
            acc[0] += dt
            acc[1] += dw
        _log.info("attack %s on %d examples: %.2f s wall, %.2f s CPU", label, len(ib), dw, dt)
    return [{"index": int(i), "label": t, "clean_pred": c, "attack": label, "eps": meta["eps"],
             "norm": meta["norm"], "adv_pred": a, "correct": c == t and a == t}
            for i, c, a, t in zip(ib, clean, adv, truth)]


def _chunks(todo: Sequence[int], rank: int, world: int, size: int) -> Tuple[List[List[int]], int]:
    """This rank's strided shard of ``todo`` in chunks; every rank gets the same chunk count."""
    from .engine import shard_indices

    mine = [todo[j] for j in shard_indices(len(todo), rank, world)]
    n_chunks = math.ceil(math.ceil(len(todo) / world) / size) if todo else 0
    return [mine[c * size:(c + 1) * size] for c in range(n_chunks)], n_chunks


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def certified_accuracy(cert_recs: Sequence[Dict[str, Any]], attack_recs: Sequence[Dict[str, Any]],
                       eps: Sequence[float], n: int) -> Tuple[Dict[str, Dict[str, Dict[str, float]]], int]:
    """Certified accuracy (%) at fixed eps per method/norm, and the test prefix it is exact on.

    Certification runs on the first N correctly classified examples, so on the prefix of the
    test set that ends before the first *uncertified* correct example every correct example is
    certified: there, certified accuracy = #(radius >= eps) / prefix length, exactly (an example
    misclassified clean counts as not certified).
    """
    certified = {int(r["index"]) for r in cert_recs}
    uncert = [int(r["index"]) for r in attack_recs
              if r["attack"] == "clean" and r["correct"] and int(r["index"]) not in certified]
    prefix = min(uncert) if uncert else n
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    if not prefix:
        return out, 0
    for r in cert_recs:
        if int(r["index"]) >= prefix:
            continue
        d = out.setdefault(r["method"], {}).setdefault(r["norm"], {f"{e:g}": 0.0 for e in eps})
        for e in eps:
            if r["radius"] >= e:
                d[f"{e:g}"] += 100.0 / prefix
    return out, prefix


def _resolution(rs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """How finely the searches resolved the bound's radii: the median over certified examples of
    ``failed_at / radius`` (the bound's radius lies in that bracket), and how many certified
    examples have no failure above them (a lower end: records written before ``failed_at``
    existed count here too) and, for those, the median margin left at the last certified full
    CROWN pass (near 0: close to the bound's radius; near 1: possibly far below it)."""
    ratios = [r["failed_at"] / r["radius"] for r in rs if r["radius"] > 0 and r.get("failed_at")]
    unb = [r for r in rs if r["radius"] > 0 and not r.get("failed_at")]
    left = [r["margin_left"] for r in unb if r.get("margin_left") is not None]
    return {"median_bracket": statistics.median(ratios) if ratios else None,
            "n_unbracketed": len(unb),
            "median_margin_left_unbracketed": statistics.median(left) if left else None}


def summarize_certified(cert_recs: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Per bound method and norm: mean radius (untargeted, targeted), how many certified, the
    search's resolution, and CPU seconds per example. Reads certify.jsonl records alone, so a
    run still in progress can be summarised (``bench/certify_progress.py``)."""
    cert: Dict[str, Dict[str, Dict[str, Any]]] = {}
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in cert_recs:
        groups.setdefault((r["method"], r["norm"]), []).append(r)
    for (meth, norm), rs in sorted(groups.items()):
        tg = [r["radius_target"] for r in rs if r.get("radius_target") is not None]
        cs = [r["cpu_s"] for r in rs if r.get("cpu_s") is not None]  # records before 2026-12-01 have none
        cert.setdefault(meth, {})[norm] = {
            "cpu_s_per_example": sum(cs) / len(cs) if cs else None, "cpu_s_n": len(cs),
            "n": len(rs), "mean_radius": sum(r["radius"] for r in rs) / len(rs),
            "mean_radius_target": sum(tg) / len(tg) if tg else None,
            "n_certified": sum(1 for r in rs if r["radius"] > 0), **_resolution(rs)}
    return cert


def summarize(attack_recs: Sequence[Dict[str, Any]], cert_recs: Sequence[Dict[str, Any]],
              attacks: Sequence[Tuple[str, Any, Dict[str, Any]]], sweep_label: str,
              masking: Optional[Any] = None, cert_eps: Optional[Dict[str, Sequence[float]]] = None) -> Dict[str, Any]:
    """Accuracies (%) per attack, the eps sweep (from the clean point at eps 0), mean certified
    radii and certified accuracy per bound method and norm, and the gradient-masking checks."""
    from .attacks.masking import run_checks

    by: Dict[str, List[bool]] = {}
    for r in attack_recs:
        by.setdefault(r["attack"], []).append(bool(r["correct"]))
    acc = {lab: 100.0 * sum(v) / len(v) for lab, v in by.items() if v}
    robust = {lab: acc[lab] for lab, _, m in attacks
              if lab != "clean" and not m["sweep"] and not m.get("role") and lab in acc}
    checks = {lab: acc[lab] for lab, _, m in attacks if m.get("role") and lab in acc}
    sweep = [{"attack": sweep_label, "eps": m["eps"], "norm": m["norm"], "robust_acc": acc[lab]}
             for lab, _, m in attacks if m["sweep"] and lab in acc]
    if sweep and "clean" in acc and not any(p["eps"] == 0 for p in sweep):
        sweep.insert(0, {"attack": sweep_label, "eps": 0.0, "norm": sweep[0]["norm"], "robust_acc": acc["clean"]})
    cert = summarize_certified(cert_recs)
    n = len({r["index"] for r in attack_recs})
    if cert_recs:
        default = {nm: sorted({m["eps"] for lab, _, m in attacks if lab in robust and m["eps"] > 0
                               and m["norm"] == nm and m["name"] != "cw"}) for nm in ("inf", "2")}
        cert_eps = {**default, **{k: list(v) for k, v in (cert_eps or {}).items() if v}}
        for nm in ("inf", "2"):
            ca, prefix = certified_accuracy([r for r in cert_recs if r["norm"] == nm], attack_recs,
                                            list(cert_eps.get(nm, ())), n)
            for meth, per in ca.items():
                if nm in per and nm in cert.get(meth, {}):
                    cert[meth][nm].update(certified_acc=per[nm], certified_acc_n=prefix)
    mask = run_checks(attack_recs, attacks, getattr(masking, "tolerance", 1.0),
                      getattr(masking, "tolerance_examples", 1)) if attack_recs else None
    not_seeded = [lab for lab, _, m in attacks if m.get("per_example_seeded") is False]
    partial = {lab: len(by[lab]) for lab in robust if len(by[lab]) != len(by.get("clean", ()))}
    return {"n": n, "clean_acc": acc.get("clean"), "robust_acc": robust, "robust_acc_n": partial,
            "eps_sweep": sweep, "certified": cert,
            "masking": mask, "masking_attacks_acc": checks,
            "rank_dependent_attacks": not_seeded}


def run_eval(rt: Any, plan: Plan) -> int:
    from .engine import gather_objects, memory_format
    from .engine.io import atomic_write_json, atomic_write_text
    from .space.network import count_parameters

    cfg = plan.cfg
    # no cudnn autotuning here: PGD steps only the examples it has not broken, so the batch size
    # changes almost every step and each new shape would be tuned anew (train's first epoch spent
    # ~20 s tuning on the H200; the GPU check's evaluate stalled, BENCHMARKS "GPU check")
    torch.backends.cudnn.benchmark = False
    # the model's layout for the attacks is the configured one (channels_last: ~2x cheaper on
    # CPU, BENCHMARKS "CPU layout"); certification runs contiguous, the layout of the radii before
    model = plan.model.to(rt.device, memory_format=memory_format(cfg.dist)).eval()
    data = plan.data if plan.data is not None else TestSet(cfg.data)
    n = len(data)
    run_dir: Path = rt.run_dir
    att_path, cert_path = run_dir / ATTACKS_FILE, run_dir / CERTIFY_FILE
    state_path, summary_path = run_dir / STATE_FILE, run_dir / SUMMARY_FILE

    # ---- resume bookkeeping: every rank derives the same done-sets from the same files
    old = None
    if state_path.is_file():
        try:
            old = json.loads(state_path.read_text()).get("fingerprint")
        except ValueError:
            old = None
    resume = cfg.run.resume and old is not None
    diff = fingerprint_diff(old, plan.fingerprint) if resume else None
    if diff is not None:
        raise ConfigError(f"run dir {run_dir} holds results of a different evaluation ('{diff}' differs); "
                          "choose another run.name or pass --run.resume=false to start over")
    labels_wanted = [lab for lab, _, _ in plan.attacks]

    def wanted_at(i: int) -> List[str]:
        return [lab for lab, _, m in plan.attacks if runs_on(m, i)]
    cert_wanted = [(m, nm) for m in cfg.certify.methods for nm in cfg.certify.norms] if cfg.certify.enabled else []
    done_att = complete(read_records(att_path), "attack", wanted_at) if resume else {}
    done_cert = complete(read_records(cert_path), "method", cert_wanted) if resume and cert_wanted else {}
    rt.barrier()
    if rt.is_main:  # drop torn lines and half-written examples, then append from a clean state
        atomic_write_text(str(att_path), "".join(json.dumps(r) + "\n" for i in sorted(done_att) for r in done_att[i]))
        atomic_write_text(str(cert_path), "".join(json.dumps(r) + "\n" for i in sorted(done_cert) for r in done_cert[i]))
        atomic_write_json(str(state_path), {"fingerprint": plan.fingerprint})
        if summary_path.exists() and not resume:
            summary_path.unlink()
    rt.barrier()
    if done_att:
        rt.print(f"resuming: {len(done_att)}/{n} examples already attacked, {len(done_cert)} certified")

    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    chunks_done = 0

    def tick() -> None:
        nonlocal chunks_done
        chunks_done += 1
        if stop_after and chunks_done >= stop_after:
            sys.stdout.flush()
            os._exit(137)

    # ---- phase 1: attacks
    size = cfg.chunk_size or cfg.data.eval_batch_size
    todo = [i for i in range(n) if i not in done_att]
    chunks, n_chunks = _chunks(todo, rt.rank, rt.world_size, size)
    all_att = [r for i in sorted(done_att) for r in done_att[i]]
    cost: Dict[str, List[float]] = {}
    order = {lab: k for k, lab in enumerate(labels_wanted)}
    t0 = time.perf_counter()
    for c in rt.progress(range(n_chunks), total=n_chunks, desc="attacks"):
        idx = chunks[c]
        x, y = data.x(idx, rt.device), data.y(idx, rt.device)
        recs = attack_records(model, plan.attacks, x, y, idx, cfg.data.eval_batch_size, cost) if idx else []
        recs = gather_objects(recs, key=None)
        recs.sort(key=lambda r: (r["index"], order[r["attack"]]))
        if rt.is_main:
            append_records(att_path, recs)
        all_att += recs
        tick()
    t_att = time.perf_counter() - t0
    per_rank = gather_objects([cost], key=None)   # COLLECTIVE: every rank
    att_cpu, att_wall = ({lab: sum(d[lab][k] for d in per_rank if lab in d) for lab in labels_wanted
                          if any(lab in d for d in per_rank)} for k in (0, 1))

    # ---- phase 2: certification of the first N correctly classified examples
    cert_recs: List[Dict[str, Any]] = [r for i in sorted(done_cert) for r in done_cert[i]]
    t_cert, n_cert_new = 0.0, 0
    if cert_wanted:
        correct = sorted(r["index"] for r in all_att if r["attack"] == "clean" and r["correct"])
        targets = correct[:cfg.certify.num_examples]
        todo_c = [i for i in targets if i not in done_cert]
        if not targets:
            rt.print("certify: no correctly classified example to certify")
        chunks, n_chunks = _chunks(todo_c, rt.rank, rt.world_size, cfg.certify.batch_size)
        from .bounds import BoundedModel
        from .bounds.evaluation import certify_batch

        model = model.to(memory_format=torch.contiguous_format)
        bm = BoundedModel(model, crown_forward=cfg.certify.crown_forward)
        num_classes = _num_classes(model, data, rt.device) if n else 2
        t0 = time.perf_counter()
        for c in rt.progress(range(n_chunks), total=n_chunks, desc="certify"):
            idx = chunks[c]
            recs: List[Dict[str, Any]] = []
            if idx:
                x, y = data.x(idx, rt.device), data.y(idx, rt.device)
                recs = certify_batch(bm, x, y, idx, methods=cfg.certify.methods, norms=cfg.certify.norms,
                                     steps=cfg.certify.bisection_steps, eps_init=cfg.certify.eps_init,
                                     random_target=cfg.certify.random_target, seed=cfg.run.seed,
                                     num_classes=num_classes, rel_tol=cfg.certify.rel_tol,
                                     crown_passes=cfg.certify.crown_passes,
                                     crown_extra_passes=cfg.certify.crown_extra_passes,
                                     crown_extra_margin=cfg.certify.crown_extra_margin)
            recs = gather_objects(recs, key=None)
            recs.sort(key=lambda r: (r["index"], r["method"], r["norm"]))
            if rt.is_main:
                append_records(cert_path, recs)
            cert_recs += recs
            n_cert_new += len({r["index"] for r in recs})
            tick()
        t_cert = time.perf_counter() - t0

    # ---- summary (rank 0)
    if rt.is_main:
        cert_eps = {"inf": cfg.certified_acc_eps, "2": cfg.certified_acc_eps_l2}
        s = summarize(all_att, cert_recs, plan.attacks, plan.sweep_label, cfg.masking, cert_eps)
        ck = Path(cfg.checkpoint).resolve()
        s.update({
            "kind": "eval", "dataset": cfg.data.name, "n_test": n,
            "checkpoint": cfg.checkpoint, "checkpoint_abs": str(ck),
            "train_run_dir": str(ck.parent.parent if ck.parent.name == "checkpoints" else ck.parent),
            "train_seed": plan.train_cfg.run.seed, "genotype": plan.genotype.to_dict(),
            "genotype_source": plan.train_cfg.model.genotype,
            "params": count_parameters(model, include_aux=False), "params_with_aux": count_parameters(model),
            "attacks": [{"label": lab, **meta} for lab, _, meta in plan.attacks],
            "certify": to_dict(cfg.certify), "world_size": rt.world_size, "device": str(rt.device),
            "timing": {"attack_s": t_att, "attack_examples_per_s": len(todo) / t_att if t_att > 0 and todo else None,
                       "certify_s": t_cert, "certify_examples_per_s": n_cert_new / t_cert if t_cert > 0 else None,
                       "peak_memory_mb": peak_memory_mb(rt.device),
                       # process CPU / wall seconds per attack, summed over ranks, this session
                       "attack_cpu_s": att_cpu, "attack_wall_s": att_wall},
        })
        if not todo and not n_cert_new and summary_path.is_file():  # nothing new: keep the measured timing
            try:
                s["timing"] = json.loads(summary_path.read_text()).get("timing", s["timing"])
            except ValueError:
                pass
        atomic_write_json(str(summary_path), s)
        tb = rt.tb
        if s["clean_acc"] is not None:
            tb.scalar("eval/clean_acc", s["clean_acc"], 0)
        for lab, v in s["robust_acc"].items():
            tb.scalar(f"eval/robust_acc/{lab}", v, 0)
        # eps sweep on a readable axis: step = point index (0 = clean), the eps as a second
        # series on the same steps and in the text table (eps x 1e4 as a step was unreadable)
        for k, pt in enumerate(s["eps_sweep"]):
            tb.scalar(f"eval/eps_sweep/{pt['attack']}/robust_acc", pt["robust_acc"], k)
            tb.scalar(f"eval/eps_sweep/{pt['attack']}/eps", pt["eps"], k)
        if s["eps_sweep"]:
            tb.text("eval/eps_sweep", "| step | eps | robust acc (%) |\n|---|---|---|\n" + "\n".join(
                f"| {k} | {pt['eps']:g} | {pt['robust_acc']:.2f} |" for k, pt in enumerate(s["eps_sweep"])), 0)
        if s["masking"]:
            for c in s["masking"]["checks"]:
                tb.scalar(f"eval/masking/{c['check']}_flagged", float(c["status"] == "flagged"), 0)
            if s["masking"]["warnings"]:
                tb.text("eval/masking_warnings", "\n\n".join(s["masking"]["warnings"]), 0)
        for meth, per in s["certified"].items():
            for norm, v in per.items():
                tb.scalar(f"eval/certified/{meth}/l{norm}", v["mean_radius"], 0)
                if v["mean_radius_target"] is not None:
                    tb.scalar(f"eval/certified_target/{meth}/l{norm}", v["mean_radius_target"], 0)
        tb.flush()
        accs = ", ".join(f"{k} {v:.2f}%" for k, v in s["robust_acc"].items())
        rt.print(f"clean {s['clean_acc']:.2f}% on {s['n']} examples; {accs}")
        for meth, per in s["certified"].items():
            rt.print(f"certified ({meth}): " + ", ".join(
                f"l_{nm} {v['mean_radius']:.5f}" + (f" / target {v['mean_radius_target']:.5f}"
                                                     if v["mean_radius_target"] is not None else "")
                + (f" (bracket x{v['median_bracket']:.3f} median; " if v.get("median_bracket") else " (")
                + f"{v.get('n_unbracketed', 0)} of {v['n']} never failed above"
                + (f"; {v['cpu_s_per_example']:.3g} CPU-s per example)" if v.get("cpu_s_per_example") else ")")
                for nm, v in per.items()))
        for w in (s["masking"] or {}).get("warnings", []):
            rt.print(f"WARNING (gradient masking check): {w}")
        if s["rank_dependent_attacks"]:
            rt.print("note: " + ", ".join(s["rank_dependent_attacks"]) + " draw randomness per call, not per "
                     "example: their records can depend on batching and the number of ranks")
        rt.print(f"results -> {summary_path}")
    rt.barrier()
    return 0


def _num_classes(model: nn.Module, data: TestSet, device: torch.device) -> int:
    with torch.no_grad():
        return int(model(data.x([0], device)).shape[1])


# --------------------------------------------------------------------------- CLI
def evaluate(cfg: EvalConfig) -> int:
    """Preflight (errors before anything is written), then the run under the engine's policy."""
    from .engine import run_checked

    return run_checked(cfg, "evaluate", preflight, run_eval)


def from_args(config: str = "", **overrides: Any) -> None:
    """fire target: ``--config PATH`` plus dotted ``--section.key=value`` overrides."""
    cfg = parse_cli(EvalConfig, PROG, DOC, config, overrides)
    evaluate(cfg)


def main(argv: Optional[list] = None) -> None:
    """Run the stage on ``argv`` (default ``sys.argv[1:]``): ``["--config", "x.yaml", "--checkpoint=..."]``."""
    from .entry import run_main

    run_main("evaluate", DOC, from_args, argv)


def cli() -> None:
    """Console entry (``dsrna-evaluate``, ``python -m dsrna_dist.evaluate``)."""
    main()


if __name__ == "__main__":
    cli()
