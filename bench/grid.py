"""The paper's comparison (issue #15) at the fmnist_small budget: methods x seeds, each searched,
its cell retrained twice (natural, PGD-AT) with held-out model selection, each network attacked
and certified; then the tables and tests (bench/grid_report.py).

Resumable, idempotent and runnable in parts, by several workers at once:

    OMP_NUM_THREADS=1 nohup python bench/grid.py > grid1.log 2>&1 &     # one worker per core
    OMP_NUM_THREADS=1 nohup python bench/grid.py > grid2.log 2>&1 &     # a second one (optional)
    python bench/grid.py --status                                       # done, running, left; worker-hours left
    python bench/grid.py --stages search --methods darts pcdarts        # a part of the grid

Every task (search of a method and seed; train / eval / certify of a network) is claimed with a
lock file holding its worker's pid (a dead worker's lock is taken over), is skipped when the file
that marks it done exists, and resumes from its own checkpoint when it was killed. Tasks run in
a fixed priority order: first the core comparison's seed 0 end to end (DARTS, PC-DARTS and the two
DSRNA variants: search, both retrainings, attacks, certification), then all other searches (they
are cheap and answer the convergence question), then, method group by method group, training,
attacks, certification (IBP, CROWN-IBP); full CROWN and AutoAttack last.

A network is identified by (recipe, genotype, seed): two searches that find the same cell with
the same seed share one retrained network (the retrain depends on nothing else), so a DSRNA run
that reproduces the PC-DARTS cell is not trained twice. Search seed s is retrained with seed s.
A search that fails the convergence criterion (mean max softmax(alpha) >= 0.25, genotype stable
over the last quarter) is still retrained, and flagged as not converged in every table.

Recipes: pbn (natural training with precise BN, configs/train/fmnist_small_pbn.yaml: BN statistics
re-estimated before every evaluation, which removes most of the EMA statistics' retraining noise;
RESULTS.md claim 2) and adv (PGD-AT) by default; nat (the same natural training, the same weights
as pbn's, EMA statistics: the recipe of the first sessions, kept for the record) with --recipes
nat; ibp (certified training with configs/train/fmnist_small_ibp_long.yaml, ~95 CPU-min per net,
then verified accuracy at l_inf 0.05 of last.pt) with --recipes ibp: claim (3) where this scale
can show it.

Results go to results/grid/: search/<method>_s<seed>/, net/<recipe>/<ghash>_s<seed>/{train,eval,
certify,crown,autoattack}/; light files are committed, and so is the one checkpoint a net's evaluations
read (best.pt; last.pt for ibp; ~0.2-0.3 MB), since a machine reset once lost them (tb/, attacks.jsonl
and the other checkpoints are git-ignored; a net whose checkpoint is missing is rebuilt: --rebuild);
grid_log.jsonl has one record per finished task: rc, wall seconds summed over the parts of a
resumed task (since session 25), CPU seconds of the task's processes (summed over the parts since
session 26; before, the last part's), code version.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dsrna_dist import genotype as G  # noqa: E402
from dsrna_dist import stats  # noqa: E402
from dsrna_dist.engine.io import atomic_write_json, read_jsonl  # noqa: E402
OUT = ROOT / "results" / "grid"

# method -> (search config, extra search args). Group A is the paper's core comparison.
METHODS: Dict[str, tuple] = {
    "darts": ("fmnist_small_darts.yaml", ()),
    "pcdarts": ("fmnist_small_pcdarts.yaml", ()),
    "dsrna_jacobian": ("fmnist_small_dsrna_jacobian.yaml", ()),
    "dsrna_cb": ("fmnist_small_dsrna_cb.yaml", ()),
    "sdarts_adv": ("fmnist_small_sdarts_adv.yaml", ()),
    "pcdarts_adv": ("fmnist_small_pcdarts_adv.yaml", ()),
    "dsrna_jacobian_gamma": ("fmnist_small_dsrna_jacobian.yaml", ("--robustness.trade_off=gamma",)),
    "dsrna_cb_gamma": ("fmnist_small_dsrna_cb.yaml", ("--robustness.trade_off=gamma",)),
    # the paper's gamma with its one fix at this scale: the arch Adam state cleared once after the
    # first, bound-dominated arch epoch (RESULTS.md, searches: 3 of 3 converge; 0 of 3 without)
    "dsrna_cb_gamma_reset": ("fmnist_small_dsrna_cb.yaml", ("--robustness.trade_off=gamma",
                                                            "--arch_optim.reset_state_at=[3]")),
    "pdarts": ("fmnist_small_pdarts.yaml", ()),
    "robnet": ("fmnist_small_robnet.yaml", ()),
    # recorded with min_epochs 0, before the config's 5 (its seed 1 stopped at epoch 0)
    "dartsplus": ("fmnist_small_dartsplus.yaml", ("--stopping.min_epochs=0",)),
    "darts_2nd": ("fmnist_small_darts_2nd.yaml", ()),
    "sdarts_rs": ("fmnist_small_sdarts_rs.yaml", ()),
}
#: The grid's searches keep the arch schedule they were recorded with (issue 11, fourteenth and
#: fifteenth sessions): `cosine` at each method's arch lr of that time, while the configs moved to
#: `cosine2` at 4/3 of it. Every search of one grid, finished or still to run, uses one schedule,
#: so methods stay comparable; tests/test_grid.py checks these against the recorded config.yaml.
SEARCH_ARCH_LR = {"darts": 0.075, "pcdarts": 0.15, "dsrna_jacobian": 0.075, "dsrna_cb": 0.15,
                  "sdarts_adv": 0.075, "pcdarts_adv": 0.15, "dsrna_jacobian_gamma": 0.075,
                  "dsrna_cb_gamma": 0.15, "dsrna_cb_gamma_reset": 0.15, "pdarts": 0.15, "robnet": 0.075,
                  "dartsplus": 0.075, "darts_2nd": 0.075, "sdarts_rs": 0.075}


def search_pin(method: str) -> tuple:
    """The grid's arch-schedule overrides for ``method``'s searches."""
    return ("--arch_optim.schedule=cosine", f"--arch_optim.lr={SEARCH_ARCH_LR[method]}")


GROUPS = (("darts", "pcdarts", "dsrna_jacobian", "dsrna_cb"),
          ("sdarts_adv", "pcdarts_adv", "dsrna_jacobian_gamma", "dsrna_cb_gamma"),
          ("pdarts", "robnet", "dsrna_cb_gamma_reset"),
          ("dartsplus", "darts_2nd", "sdarts_rs"))
# searched for the convergence record (issue #11: every method's config must converge), not retrained
SEARCH_ONLY = frozenset(("dartsplus", "darts_2nd", "sdarts_rs"))
RECIPES = {"nat": "configs/train/fmnist_small.yaml", "adv": "configs/train/fmnist_small_pgd_at.yaml",
           "ibp": "configs/train/fmnist_small_ibp_long.yaml", "pbn": "configs/train/fmnist_small_pbn.yaml"}
#: run unless --recipes says otherwise; "nat" (pbn's weights with EMA statistics: the first
#: sessions' natural recipe) and "ibp" (certified training, ~95 CPU-min per net: verified accuracy
#: at l_inf 0.05 of every found cell) are opt-in
DEFAULT_RECIPES = ("pbn", "adv")
#: a certifiably trained net is judged by its verified accuracy (IBP / CROWN-IBP at 0.05 on 1000
#: test images, PGD-20 as the sanity bound) on last.pt: best.pt, chosen on clean validation
#: accuracy, is the natural warm-up's epoch
IBP_EVAL_CFG = "configs/eval/fmnist_small_ibp.yaml"
EVAL_CFG = "configs/eval/fmnist_small_grid.yaml"
CERT_CFG = "configs/eval/fmnist_small_grid_certify.yaml"
CROWN_CFG = "configs/eval/fmnist_small_grid_crown.yaml"
AA_CFG = "configs/eval/fmnist_small_grid_aa.yaml"
#: naturally trained nets: PGD-20 at 0.1 already breaks every one, so AutoAttack runs at 0.02 on 200 images
AA_SMALL_CFG = "configs/eval/fmnist_small_grid_aa_small.yaml"
#: per recipe: the evaluation stages of its networks (stage, config) and the checkpoint they read
FULL_EVALS = (("eval", EVAL_CFG), ("certify", CERT_CFG), ("crown", CROWN_CFG), ("autoattack", AA_CFG))
NATURAL_EVALS = FULL_EVALS[:3] + (("autoattack", AA_SMALL_CFG),)
RECIPE_EVALS = {"nat": NATURAL_EVALS, "adv": FULL_EVALS, "ibp": (("eval", IBP_EVAL_CFG),), "pbn": NATURAL_EVALS}
RECIPE_CHECKPOINT = {"nat": "best.pt", "adv": "best.pt", "ibp": "last.pt", "pbn": "best.pt"}
STAGES = ("search", "train", "eval", "certify", "crown", "autoattack")
#: not a stage one selects: a network whose summary.json is committed but whose checkpoint is
#: missing (trained before checkpoints were committed, on a machine since reset) gets a `rebuild`
#: task before any pending evaluation (bench/rebuild_checkpoint.py). --rebuild exact: train again
#: with the logged code version, keep the weights only if every epoch's record is bit-identical
#: (else fail); adopt: train with the current code and, unless identical, make the new run the
#: network and delete its evaluation stages so they all run again on it (a new CPU does not
#: reproduce an old one's floats: measured, bench/rebuild_checkpoint.py)
REBUILD_MODES = ("exact", "adopt")
LATE = ("crown", "autoattack")  # hours per network on a CPU core: after everything else
#: opt-in (``--stages control``), not in STAGES: capacity controls, a found cell retrained narrower
#: with the recipe's config, seed and first evaluation, to tell "this cell" from "a net this small".
#: search run -> init channels, chosen by hand so the net has about the parameters of the DSRNA-CB
#: cell of the same seed (14.2k, 15.6k at C = 8): the DARTS seed-0 cell at C = 5 has 14.1k, the
#: seed-1 cell 13.6k (C = 6 would be 18.1k). DSRNA-CB seed 2's cell is in the baselines' accuracy
#: range and needs none. Results: control/<run>_c<C>[_<recipe>]/{train,eval} (nat: no suffix).
CONTROLS = {"darts_s0": 5, "darts_s1": 5}
CONTROL = "control"


@dataclass
class Task:
    key: str                 # unique name, also the lock name
    stage: str
    prio: tuple
    done: Path               # exists => task finished
    argv: List[str]
    info: Dict[str, object]


def genotype_hash(path: Path) -> str:
    """Short hash of the derived cell (ops, inputs, concat): what the retrain depends on."""
    g = json.loads(path.read_text())
    keep = {k: g[k] for k in G.FIELDS if k in g}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:10]


def train_code(key: str) -> Optional[str]:
    """The code version a training task ran with: its last successful record in grid_log.jsonl,
    else results/grid/train_code.json (versions inferred for tasks that left no record, each with
    its reason); "+dirty" stripped (the rebuild's bit-for-bit comparison says whether it mattered)."""
    code = None
    for rec in read_jsonl(OUT / "grid_log.jsonl"):
        if rec.get("task") == key and rec.get("rc") == 0:
            code = rec.get("code")
    if code is None and (OUT / "train_code.json").exists():
        code = json.loads((OUT / "train_code.json").read_text()).get(key, {}).get("code")
    return None if code in (None, "unknown") else str(code).split("+")[0]


def launcher(nproc: int) -> List[str]:
    if nproc > 1:
        return [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m"]
    return [sys.executable, "-m"]


def train_cmd(launch: List[str], recipe: str, genotype: Path, common: List[str], name: str = "train",
              extra: Sequence[str] = ()) -> List[str]:
    """The retraining command of a cell with ``recipe`` (``common``: out dir, seed, progress)."""
    return launch + ["dsrna_dist.train", f"--config={RECIPES[recipe]}", f"--run.name={name}",
                     f"--model.genotype={genotype}", *extra, *common]


def eval_cmd(launch: List[str], cfg: str, stage: str, checkpoint: Path, common: List[str]) -> List[str]:
    """The evaluation command of one stage on a trained checkpoint."""
    return launch + ["dsrna_dist.evaluate", f"--config={cfg}", f"--run.name={stage}",
                     f"--checkpoint={checkpoint}", *common]


def tasks(methods: Sequence[str], seeds: Sequence[int], stages: Sequence[str], nproc: int,
          recipes: Sequence[str] = DEFAULT_RECIPES, rebuild: str = "exact") -> List[Task]:
    """Every task whose inputs exist now, in priority order (later calls see more tasks).
    ``rebuild``: how a net whose checkpoint is missing comes back (see REBUILD_MODES)."""
    out: List[Task] = []
    launch = launcher(nproc)
    nets: Dict[tuple, Dict[str, object]] = {}
    for gi, group in enumerate(GROUPS):
        for method in group:
            if method not in methods:
                continue
            cfg, extra = METHODS[method]
            mi = list(METHODS).index(method)
            for seed in seeds:
                run = OUT / "search" / f"{method}_s{seed}"
                if "search" in stages:
                    out.append(Task(f"search-{method}-s{seed}", "search", (0, gi, seed, mi), run / "genotype.json",
                                    launch + ["dsrna_dist.search", f"--config=configs/search/{cfg}", *extra, *search_pin(method),
                                              f"--run.out_dir={run.parent}", f"--run.name={run.name}",
                                              f"--run.seed={seed}", "--run.progress=false"],
                                    {"method": method, "seed": seed}))
                gpath = run / "genotype.json"
                if not gpath.exists() or method in SEARCH_ONLY:
                    continue
                gh = genotype_hash(gpath)
                for recipe in (r for r in RECIPES if r in recipes):
                    nets.setdefault((recipe, gh, seed), {"prio": (gi, seed, mi), "genotype": gpath,
                                                        "methods": []})["methods"].append(method)
    for (recipe, gh, seed), n in sorted(nets.items(), key=lambda kv: (kv[1]["prio"], kv[0][0])):
        gi, _, mi = n["prio"]
        net = OUT / "net" / recipe / f"{gh}_s{seed}"
        common = [f"--run.out_dir={net}", f"--run.seed={seed}", "--run.progress=false"]
        info = {"recipe": recipe, "genotype_hash": gh, "seed": seed, "methods": n["methods"]}
        best = net / "train" / "checkpoints" / RECIPE_CHECKPOINT[recipe]
        rk = list(RECIPES).index(recipe)
        if "train" in stages:
            out.append(Task(f"train-{recipe}-{gh}-s{seed}", "train", (1 + gi, 0, seed, rk, mi),
                            net / "train" / "summary.json",
                            train_cmd(launch, recipe, n["genotype"], common), info))
        if not (net / "train" / "summary.json").exists():
            continue
        evals = []
        for stage, cfg in RECIPE_EVALS[recipe]:
            if stage in stages and (ROOT / cfg).exists():
                prio = (1 + gi, STAGES.index(stage), seed, rk, mi) if stage not in LATE else (
                    9 + LATE.index(stage), gi, seed, rk, mi)
                evals.append((stage, cfg, prio))
        pending = [e for e in evals if not (net / e[0] / "summary.json").exists()]
        if pending and not best.exists():
            # trained before checkpoints were committed, weights gone: train again (--rebuild)
            train_argv = train_cmd(launch, recipe, n["genotype"], common, name="rebuild")
            code = train_code(f"train-{recipe}-{gh}-s{seed}") if rebuild == "exact" else None
            how = ["--adopt", *(st for st, _ in RECIPE_EVALS[recipe])] if rebuild == "adopt" else []
            out.append(Task(f"rebuild-{recipe}-{gh}-s{seed}", "rebuild", pending[0][2], best,
                            [sys.executable, str(ROOT / "bench" / "rebuild_checkpoint.py"), str(net),
                             *(["--code", code] if code else []), *how, "--", *train_argv],
                            {**info, "for_stage": pending[0][0]}))
            continue
        for stage, cfg, prio in evals:
            out.append(Task(f"{stage}-{recipe}-{gh}-s{seed}", stage, prio,
                            net / stage / "summary.json",
                            eval_cmd(launch, cfg, stage, best, common), info))
    if CONTROL in stages:
        out += control_tasks(methods, seeds, recipes, launch)
    return sorted(out, key=lambda t: (tier(t), t.prio))


def control_dir(run: str, channels: int, recipe: str) -> Path:
    return OUT / "control" / (f"{run}_c{channels}" + ("" if recipe == "nat" else f"_{recipe}"))


def control_tasks(methods: Sequence[str], seeds: Sequence[int], recipes: Sequence[str],
                  launch: List[str]) -> List[Task]:
    """The CONTROLS' train and (once trained) eval tasks of the selected methods, seeds, recipes."""
    out: List[Task] = []
    for run, channels in CONTROLS.items():
        method, s = run.rsplit("_s", 1)
        seed = int(s)
        gpath = OUT / "search" / run / "genotype.json"
        if method not in methods or seed not in seeds or not gpath.exists():
            continue
        gi = next(i for i, g in enumerate(GROUPS) if method in g)
        for recipe in (r for r in RECIPES if r in recipes):
            d = control_dir(run, channels, recipe)
            name, rk = d.name, list(RECIPES).index(recipe)
            info = {"recipe": recipe, "seed": seed, "methods": [method], "control": name}
            common = [f"--run.out_dir={d}", f"--run.seed={seed}", "--run.progress=false"]
            out.append(Task(f"control-train-{name}", "train", (1 + gi, 0, seed, rk, 99), d / "train" / "summary.json",
                            train_cmd(launch, recipe, gpath, common, extra=[f"--model.init_channels={channels}"]),
                            info))
            if (d / "train" / "summary.json").exists():
                best = d / "train" / "checkpoints" / RECIPE_CHECKPOINT[recipe]
                out.append(Task(f"control-eval-{name}", "eval", (1 + gi, 2, seed, rk, 99), d / "eval" / "summary.json",
                                eval_cmd(launch, RECIPE_EVALS[recipe][0][1], "eval", best, common), info))
    return out


def tier(t: Task) -> int:
    """The core comparison's first seed runs end to end before anything else, so the whole
    pipeline (search -> both retrainings -> attacks -> certification) is exercised early;
    full CROWN and AutoAttack always last."""
    if t.info.get("for_stage", t.stage) in LATE:
        return 2
    methods = [t.info["method"]] if "method" in t.info else list(t.info.get("methods") or [])
    return 0 if t.info.get("seed") == 0 and any(m in GROUPS[0] for m in methods) else 1


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def claim(task: Task) -> Optional[Path]:
    """Create the task's lock (atomic O_EXCL); take over a lock whose worker is dead."""
    locks = OUT / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = locks / f"{task.key}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return lock
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid_alive(pid):
                return None
            lock.unlink(missing_ok=True)
    return None


def code_version() -> str:
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD", "--", "dsrna_dist", "configs"], cwd=ROOT)
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by a live process and all its descendants (Linux /proc; 0.0 where
    there is none): what a part costs before it ends, which getrusage reports only once reaped."""
    try:
        tick, names = os.sysconf("SC_CLK_TCK"), os.listdir("/proc")
    except (OSError, ValueError, AttributeError):
        return 0.0
    kids: Dict[int, List[int]] = {}
    cpu: Dict[int, float] = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on: the name may hold spaces
        kids.setdefault(int(fields[1]), []).append(int(name))
        cpu[int(name)] = sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += kids.get(p, [])
    return total


def run_task(task: Task, env: Dict[str, str], beat_s: float = 60.0) -> int:
    """Run one task and log it. Every ``beat_s`` the task's wall and CPU time so far go to
    .wall/<key>.json, so a run killed mid-task (a session's hard end) and resumed later logs the
    sums over its parts (``wall_s``, ``cpu_s``, ``parts``; a killed part counts to its last beat)
    instead of its last part only."""
    print(f"[run ] {task.key}: {' '.join(task.argv)}", flush=True)
    code = code_version()  # the code the task starts with (it imports everything at start)
    ledger = OUT / ".wall" / f"{task.key}.json"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    try:
        before = json.loads(ledger.read_text())
        prior, parts = float(before["wall_s"]), int(before["parts"])
        prior_cpu = float(before.get("cpu_s", 0.0))  # a session-25 ledger has no cpu_s
    except (OSError, ValueError, KeyError, TypeError):
        prior, parts, prior_cpu = 0.0, 0, 0.0
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)

    def so_far(cpu_s: float) -> Dict[str, float]:
        return {"wall_s": round(prior + time.time() - t0, 1), "parts": parts + 1,
                "cpu_s": round(prior_cpu + cpu_s, 1)}

    with subprocess.Popen(task.argv, env=env, cwd=ROOT) as proc:
        try:
            while True:
                try:
                    rc = proc.wait(timeout=beat_s)
                    break
                except subprocess.TimeoutExpired:
                    atomic_write_json(str(ledger), so_far(tree_cpu_s(proc.pid)))
        except BaseException:  # as subprocess.call: the task does not outlive its worker's error
            proc.kill()
            raise
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)  # the reaped part's, exact
    rec = {"task": task.key, "stage": task.stage, **task.info, "rc": rc, **so_far(cpu), "code": code,
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(OUT / "grid_log.jsonl", "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
    ledger.unlink(missing_ok=True)  # a retry of a failed task starts its clock afresh
    if rc != 0:
        (OUT / ".failed").mkdir(exist_ok=True)
        (OUT / ".failed" / task.key).write_text(json.dumps(rec) + "\n")
        print(f"[fail] {task.key} exited {rc} (marked in {OUT / '.failed'}; --retry-failed to run it again)",
              file=sys.stderr, flush=True)
    return rc


def task_state(t: Task) -> str:
    lock = OUT / ".locks" / f"{t.key}.lock"
    return ("done" if t.done.exists() else "FAILED" if (OUT / ".failed" / t.key).exists()
            else "running" if lock.exists() and pid_alive(int(lock.read_text() or 0)) else "todo")


def cost_key(stage: str, info: Dict[str, object]) -> str:
    """What a task's wall time depends on: the method for a search (4-30 min apart), else the
    recipe (a PGD-AT net's attacks cost more than a natural one's). ``info``: a task's, or a
    grid_log record (which names its search's method in ``methods``)."""
    if stage == "search":
        return f"search {info.get('method') or (info.get('methods') or ['?'])[0]}"
    return f"{stage} {info.get('recipe', '-')}"


def plan(ts: List[Task], states: List[str], log: List[Dict[str, object]]) -> List[str]:
    """Per (stage, method or recipe): tasks done / running / to do, and the worker-hours left at
    the mean wall time of that kind's finished tasks in grid_log.jsonl (one worker per core, as
    they ran). A kind never run yet takes (marked '*') a rebuild's training time, else the same
    stage's mean over the other recipes, else shows '?'. Running tasks count whole (a plan, not
    a clock). Records without ``parts`` (before session 25) hold a resumed task's last part only,
    so a kind with such runs reads low (the core PGD-AT evals: 28 min logged; group 2's: 52)."""
    by_kind: Dict[str, List[float]] = {}
    by_stage: Dict[str, List[float]] = {}  # the fallback: every recipe's runs of a stage (not searches)
    for rec in log:
        if rec.get("rc") == 0 and "wall_s" in rec:
            stage = str(rec.get("stage"))
            by_kind.setdefault(cost_key(stage, rec), []).append(float(rec["wall_s"]) / 60)
            if stage != "search":
                by_stage.setdefault(stage, []).append(float(rec["wall_s"]) / 60)

    def minutes(key: str) -> Tuple[Optional[float], str]:
        stage, what = key.split(" ", 1)
        if key in by_kind:
            return stats.mean(by_kind[key]), ""
        if stage == "rebuild" and f"train {what}" in by_kind:  # a rebuild is a retraining
            return stats.mean(by_kind[f"train {what}"]), "*"
        return (stats.mean(by_stage[stage]), "*") if stage in by_stage else (None, "")

    rows: Dict[str, Dict[str, int]] = {}
    for t, st in zip(ts, states):
        c = rows.setdefault(cost_key(t.stage, t.info), {"done": 0, "running": 0, "todo": 0, "FAILED": 0})
        c[st] += 1
    out = [f"{'kind':34s} {'done':>5s} {'running':>8s} {'to do':>6s} {'min/task':>9s} {'worker-h left':>14s}"]
    total, unknown = 0.0, 0
    for key in sorted(rows):
        c = rows[key]
        left = c["running"] + c["todo"] + c["FAILED"]
        per, mark = minutes(key)
        hours = left * per / 60 if per is not None else None
        total += hours or 0.0
        unknown += left if per is None else 0
        out.append(f"{key:34s} {c['done']:5d} {c['running']:8d} {left - c['running']:6d} "
                   f"{(f'{per:.1f}{mark}' if per is not None else '?'):>9s} "
                   f"{'-' if not left else '?' if hours is None else f'{hours:.1f}':>14s}")
    out.append(f"worker-hours left: {total:.1f}" + (f" + {unknown} task(s) of a kind not yet run" if unknown else "")
               + "  (*: from a rebuild's training or the stage's other recipes)")
    return out


def status(ts: List[Task]) -> None:
    states = [task_state(t) for t in ts]
    for t, st in zip(ts, states):
        print(f"{st:8s} {t.key}")
    print(f"{sum(st == 'done' for st in states)}/{len(ts)} visible tasks done (later tasks appear as their inputs land)")
    print("\n".join(plan(ts, states, read_jsonl(OUT / "grid_log.jsonl"))))


class Outcome(NamedTuple):
    ran: int      # tasks this worker ran
    failed: int   # of those, how many exited non-zero
    waiting: int  # tasks left claimed by other live workers (only with --no-wait; else 0)


def work(argv: Optional[Sequence[str]] = None) -> Outcome:
    """Run the selected part of the grid as one worker (``main``'s arguments); see ``main``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=[*STAGES, CONTROL],
                    help=f"'{CONTROL}' (opt-in): the capacity controls of CONTROLS")
    ap.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), choices=list(RECIPES),
                    help="retraining recipes whose networks to train, attack and certify (ibp: "
                    "certified training, opt-in, ~95 CPU-min per net)")
    ap.add_argument("--nproc", type=int, default=1, help="ranks per task (torchrun when > 1)")
    ap.add_argument("--rebuild", choices=REBUILD_MODES, default="exact",
                    help="a net whose checkpoint is missing: retrain with the logged code and require a "
                    "bit-identical record (exact), or retrain with the current code and re-run its "
                    "evaluations unless identical (adopt)")
    ap.add_argument("--max-tasks", type=int, default=0, help="stop after this many tasks (0: until none is left)")
    ap.add_argument("--retry-failed", action="store_true")
    ap.add_argument("--no-wait", action="store_true",
                    help="return when every task left is claimed by another live worker (exit 3) instead "
                    "of waiting for them: bench/grid_queue.py then takes the next step's tasks")
    ap.add_argument("--quiet", action="store_true",
                    help="print no summary line when no task ran (bench/grid_queue.py's idle polling)")
    ap.add_argument("--status", action="store_true", help="list the visible tasks and their state, run nothing")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.status:
        status(tasks(args.methods, args.seeds, args.stages, args.nproc, args.recipes, args.rebuild))
        return Outcome(0, 0, 0)
    if args.retry_failed:
        for f in (OUT / ".failed").glob("*"):
            f.unlink()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
    ran = failed = waiting = 0
    while not args.max_tasks or ran < args.max_tasks:
        todo = [t for t in tasks(args.methods, args.seeds, args.stages, args.nproc, args.recipes, args.rebuild)
                if not t.done.exists() and not (OUT / ".failed" / t.key).exists()]
        task = lock = None
        for t in todo:
            lock = claim(t)
            if lock is not None:
                if t.done.exists():  # finished by another worker between listing and claiming
                    lock.unlink(missing_ok=True)
                    continue
                task = t
                break
        if task is None:
            if not todo:
                break
            if args.no_wait:
                waiting = len(todo)
                break
            time.sleep(30)  # everything left is claimed by live workers or waits on their outputs
            continue
        try:
            failed += run_task(task, env) != 0
        finally:
            lock.unlink(missing_ok=True)
        ran += 1
    if ran or not args.quiet:
        print(f"grid: {ran} tasks run, {failed} failed" + (f", {waiting} left to other workers" if waiting else ""),
              flush=True)
    return Outcome(ran, failed, waiting)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit 0 when the selected tasks are done, 1 when one failed, 3 (--no-wait) when tasks are
    left that other live workers hold."""
    out = work(argv)
    return 1 if out.failed else 3 if out.waiting else 0


if __name__ == "__main__":
    sys.exit(main())
