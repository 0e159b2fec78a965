"""The bound engine: trace a model with torch.fx and propagate bounds over its graph.

* Tracing (once, at construction): modules whose type has a bound class are leaves; any other
  module (cells, MixedOp, SepConv, FactorizedReduce...) is traced through into registered
  primitives. Extra ``forward`` arguments with defaults (``drop_prob=0.``,
  ``arch_weights=None``) are fixed to their defaults. Python-level decisions (``if
  self.training``) are frozen at trace time; a model returning ``(logits, aux)`` is bounded
  on ``logits``.
* Evaluation: the graph is interpreted against the *live* model on every call (parameters
  replaced or moved later are picked up). Nodes that do not depend on the input (softmax(alpha),
  weight slices...) are computed concretely with autograd, so bounds stay differentiable in
  alpha/beta; perturbed nodes get a bound class.
* Value-free runs: when every BatchNorm's statistics are known up front (eval mode, or batch
  statistics captured from the caller's forward and passed as ``bn_stats``), no bound needs the
  clean value of a perturbed node, so ops flagged ``value_free`` only ``prepare`` their context
  and the clean pass is skipped; structural ops still run on same-shaped stand-ins.
* Methods: ``ibp``; ``crown-ibp`` (IBP intermediate bounds, one backward pass from the
  specification, as Zhang et al. 2020; *not* intersected with IBP, so it can be looser than
  IBP on some nets: it is provably no looser only in special cases such as one hidden ReLU
  layer with zero lower slopes); ``crown`` (a backward pass for every input of a ReLU / max
  pool, chunked over neurons and examples, intersected with IBP; the output bound is
  intersected with IBP too, so CROWN is never looser than IBP); ``crown-forward`` (every node's
  forward-mode linear bounds, :mod:`.lin`, concretized and intersected with IBP at every relaxed
  input, then one backward pass from the specification as CROWN-IBP, intersected with the
  forward and IBP bounds: about two forward passes at batch D = input numel). Full CROWN
  runs that forward pass first (``crown_forward``, on by default): its backward passes then
  run only on the rows still loose under IBP ∩ forward (tests: its margin bound is never
  below plain full CROWN's on the test nets; not a theorem, as CROWN's adaptive lower slope
  is not monotone in the boxes). Cost switches for full CROWN:
  ``crown_probe_rows=P`` (a max-pool input node first runs P evenly spread rows of its
  loose set; if none gained more than ``crown_probe_tol`` of its box width, the other rows keep
  their IBP ∩ forward boxes: sound, possibly looser than full CROWN, off by default),
  ``crown_stages`` (cut passes first, the full pass only on neurons still loose: same bounds),
  ``crown_depth`` (every intermediate pass cut: looser), ``crown_pool_inputs=False`` (max-pool
  inputs keep IBP boxes: looser); ``keep_lin`` / ``prior_lin`` / ``frozen`` let a radius search
  reuse one full pass at every smaller eps (dsrna_dist.bounds.certify).
* Input set: ``{x' : ||x' - x||_p <= eps} intersected with [x_min, x_max]``. l_inf: the exact
  box. l_2: IBP starts from the box hull of the set, and every node of the affine prefix
  (Normalize -> conv -> BN, up to the first non-linearity) is intersected with its l_2-ball
  bound ``centre -/+ eps ||J_row||_2`` (exact there, as the rows stay orthogonal up to the
  first mixing op), so every later IBP / CROWN-IBP box gains; a linear bound ``a.x'`` is
  concretized as the better (both are sound) of the l_2-ball value ``a.x -/+ eps ||a||_2``
  (dual norm) and the box-hull value, i.e. a sound bound over the intersection.
* Memory: chunking bounds one coefficient matrix, but with grad enabled autograd keeps every
  chunk's tensors alive: CROWN-IBP + backward costs roughly (2 + S) forward activations for S
  specification rows (S = K-1 for the margin). Full CROWN is for certification (no_grad).
"""
from __future__ import annotations

import inspect
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from . import ops_linear, ops_mix, ops_nonlinear, ops_shape  # noqa: F401  (register the bound classes)
from .base import (BOUND_OPS, BoundError, BoundOp, Interval, concretize_rows, function_key, has_module_bound,
                   method_key, module_key, sum_spec)
from .ops_linear import BoundBatchNorm, BoundLinear, uses_batch_stats
from .ops_nonlinear import MAX_POOL, RELU_LOWER, BoundMaxPool2d, BoundReLU
from .lin import Lin, concretize as lin_concretize, dual_norms

BNStats = Mapping[nn.Module, Optional[Tuple[Tensor, Tensor]]]

METHODS = ("ibp", "crown-ibp", "crown", "crown-forward")
NORMS = ("inf", "2")
_SHAPE_METHODS = {"size", "dim"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim"}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if has_module_bound(type(m)):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    """fx graph of ``model.forward(x)``, other arguments fixed at their defaults."""
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty}
    try:
        return _Tracer().trace(model, concrete_args=concrete or None)
    except Exception as e:  # noqa: BLE001 - report the tracing failure in one line
        raise BoundError(f"cannot trace {type(model).__name__} with torch.fx "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _is_relu(n: fx.Node, model: nn.Module) -> bool:
    if n.op == "call_module":
        return type(model.get_submodule(n.target)) is nn.ReLU
    if n.op == "call_function":
        return n.target in (F.relu, torch.relu)
    return n.op == "call_method" and n.target == "relu"


def merge_duplicate_relus(graph: fx.Graph, model: nn.Module) -> int:
    """Make every ReLU of the same tensor one node; returns how many nodes were removed.

    In a DARTS cell each op starts with its own ReLU, so a state read by k ops is k identical
    ReLU nodes. Relaxed separately, each gets its own sign-dependent choice of line in a CROWN
    backward pass; merged, the coefficients are summed first and relaxed once, which is never
    looser (A1 L + A2 U <= (A1 + A2) L pointwise when A2 < 0 <= A1 + A2, since L <= U) and does
    the work once. IBP is unchanged (same value, same box)."""
    first: Dict[fx.Node, fx.Node] = {}
    removed = 0
    for n in list(graph.nodes):
        if not _is_relu(n, model) or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        if len(n.args) > 1 or any(k != "inplace" for k in n.kwargs):
            continue
        src = n.args[0]
        if src in first:
            n.replace_all_uses_with(first[src])
            graph.erase_node(n)
            removed += 1
        else:
            first[src] = n
    return removed


from ..engine.unwrap import unwrap_model as unwrap  # noqa: E402  (the one unwrap helper)


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _map(a: Any, fn) -> Any:
    return fx.node.map_aggregate(a, lambda n: fn(n) if isinstance(n, fx.Node) else n)


class BoundedModel:
    """Bounds on the outputs of ``model`` for inputs in an l_inf / l_2 ball clipped to a range.

    ``relu_lower``: "adaptive" (CROWN) or "zero" lower lines for unstable ReLUs.
    ``max_memory_mb``: size target of one chunk of coefficient matrices in backward passes
    (spec rows and examples are chunked to stay near it; one row/example at least).
    ``merge_relus``: merge ReLU nodes of the same tensor at trace time (never looser, see
    :func:`merge_duplicate_relus`). ``max_pool``: "cheap", "cnn-cert" or "best" (see
    ops_nonlinear). ``l2_ball``: l_2 only, intersect the IBP boxes of the affine prefix with
    the ball's dual-norm bounds (see ``_l2_ball``). ``fold_spec``: IBP bounds of a spec fold
    it into a last Linear layer. The switches exist to measure each gain; keep the defaults.
    ``clean_values``: "auto" propagates bounds *value-free* whenever it can -- no op needs the
    clean forward once every BatchNorm's statistics are known (eval mode, or batch statistics
    passed as ``bn_stats``), which saves a third of the IBP pass; "always" runs the clean pass.
    """

    def __init__(self, model: nn.Module, relu_lower: str = "adaptive", max_memory_mb: float = 256.0,
                 clean_values: str = "auto", merge_relus: bool = True, max_pool: str = "best",
                 l2_ball: bool = True, fold_spec: bool = True, crown_stages: Tuple[int, ...] = (),
                 crown_depth: int = 0, crown_pool_inputs: bool = True, crown_forward: bool = True,
                 crown_probe_rows: int = 0, crown_probe_tol: float = 0.01) -> None:
        if relu_lower not in RELU_LOWER:
            raise BoundError(f"relu_lower: {relu_lower!r} not in {RELU_LOWER}")
        if max_pool not in MAX_POOL:
            raise BoundError(f"max_pool: {max_pool!r} not in {MAX_POOL}")
        self.max_pool = max_pool
        if clean_values not in ("auto", "always"):
            raise BoundError(f"clean_values: {clean_values!r} not in ('auto', 'always')")
        self.clean_values = clean_values
        self.l2_ball, self.fold_spec = bool(l2_ball), bool(fold_spec)
        if int(crown_depth) < 0 or any(int(d) < 1 for d in crown_stages):
            raise BoundError(f"crown_depth must be >= 0 and crown_stages >= 1 (got {crown_depth}, {crown_stages})")
        self.crown_stages = tuple(sorted({int(d) for d in crown_stages}))
        self.crown_depth, self.crown_pool_inputs = int(crown_depth), bool(crown_pool_inputs)
        self.crown_forward = bool(crown_forward)
        if int(crown_probe_rows) < 0 or crown_probe_tol < 0:
            raise BoundError(f"crown_probe_rows and crown_probe_tol must be >= 0 "
                             f"(got {crown_probe_rows}, {crown_probe_tol})")
        self.crown_probe_rows, self.crown_probe_tol = int(crown_probe_rows), float(crown_probe_tol)
        self._fwd_numel: Dict[Any, int] = {}
        self._cut_cache: Dict[Any, frozenset] = {}
        model = unwrap(model)
        self.model = model
        self.max_memory_mb = float(max_memory_mb)
        self.graph = trace(model)
        self.merged_relus = merge_duplicate_relus(self.graph, model) if merge_relus else 0
        self.nodes: List[fx.Node] = list(self.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders:
            raise BoundError(f"{type(model).__name__}.forward takes no input")
        self.input = placeholders[0]
        outs = [n for n in self.nodes if n.op == "output"]
        out = outs[0].args[0]
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], fx.Node):
            out = out[0]  # (logits, aux_logits) of a train-mode net with an auxiliary head: logits
        if not isinstance(out, fx.Node):
            raise BoundError("the model must return a logits tensor (or a tuple starting with it)")
        self.output = out
        self.perturbed = self._perturbed_nodes()
        if self.output not in self.perturbed:
            raise BoundError("the model output does not depend on its input")
        self.ops: Dict[fx.Node, BoundOp] = {}
        missing = []
        for n in self.nodes:
            if n in self.perturbed and n is not self.input:
                try:
                    self.ops[n] = self._make_op(n, relu_lower)
                except BoundError as e:
                    missing.append(str(e))
        if missing:
            raise BoundError("no bound class for: " + "; ".join(sorted(set(missing))))
        # nodes whose bounds a relaxation needs (inputs of ReLU / max pool)
        self.pre_act = {a for n, op in self.ops.items() if op.needs_input_bounds
                        for a in n.all_input_nodes if a in self.perturbed}
        #: the BatchNorms the bounds go through (what capture_bn_stats must hook for this model)
        self.bn_modules = [op.module for op in self.ops.values() if isinstance(op, BoundBatchNorm)]
        self._live_cache: Dict[Any, int] = {}
        self._max_pools = [op for op in self.ops.values() if isinstance(op, BoundMaxPool2d)]
        self._set_pool_relaxation("cnn-cert" if max_pool == "cnn-cert" else "cheap")
        self.relu_only_pre_act = {a for a in self.pre_act
                                  if all(isinstance(self.ops.get(u), BoundReLU) for u in a.users)}
        #: forward mode: the index of each node's last user (its Lin is freed after it)
        self.last_use = {n: max((self.index[u] for u in n.users), default=len(self.nodes)) for n in self.nodes}
        #: relaxed depth: the most ReLU / max-pool ops on a path from the input to each node
        self.depth: Dict[fx.Node, int] = {}
        for n in self.nodes:
            if n in self.perturbed:
                d = max((self.depth[a] for a in n.all_input_nodes if a in self.depth), default=0)
                op = self.ops.get(n)
                self.depth[n] = d + int(op is not None and op.needs_input_bounds)

    def _set_pool_relaxation(self, which: str) -> None:
        for op in self._max_pools:
            op.relaxation = which

    # ------------------------------------------------------------------ building
    def _perturbed_nodes(self) -> set:
        pert = {self.input}
        for n in self.nodes:
            if n is self.input or n.op in ("placeholder", "get_attr", "output"):
                continue
            if self._is_shape_query(n):
                continue
            if any(a in pert for a in n.all_input_nodes):
                pert.add(n)
        return pert

    @staticmethod
    def _is_shape_query(n: fx.Node) -> bool:
        return ((n.op == "call_method" and n.target in _SHAPE_METHODS)
                or (n.op == "call_function" and n.target is getattr and len(n.args) > 1
                    and n.args[1] in _SHAPE_ATTRS))

    def _make_op(self, n: fx.Node, relu_lower: str) -> BoundOp:
        module = None
        if n.op == "call_module":
            module = self.model.get_submodule(n.target)
            key = module_key(type(module))
            what = f"module {type(module).__module__}.{type(module).__qualname__} ({n.target})"
        elif n.op == "call_function":
            key = function_key(n.target)
            what = f"function {getattr(n.target, '__module__', '')}.{getattr(n.target, '__name__', n.target)}"
        elif n.op == "call_method":
            key = method_key(n.target)
            what = f"tensor method .{n.target}()"
        else:
            raise BoundError(f"node {n.name}: unexpected op {n.op}")
        if key is None or key not in BOUND_OPS:
            raise BoundError(what)
        op = BOUND_OPS.get(key)(n, module)
        op.perturbed_inputs = frozenset(a for a in n.all_input_nodes if a in self.perturbed)
        if hasattr(op, "lower_mode"):
            op.lower_mode = relu_lower
        return op

    def _module_of(self, n: fx.Node) -> Optional[nn.Module]:
        return self.model.get_submodule(n.target) if n.op == "call_module" else None

    # ------------------------------------------------------------------ forward passes
    def _input_box(self, x: Tensor, eps: Tensor, x_min: float, x_max: float) -> Interval:
        e = eps.view((-1,) + (1,) * (x.dim() - 1))
        return Interval((x - e).clamp(min=x_min), (x + e).clamp(max=x_max))

    def value_free_ok(self, bn_stats: Optional[BNStats]) -> bool:
        """Whether bounds can be propagated without the clean pass: every BatchNorm that
        normalises with batch statistics has them in ``bn_stats`` (none does in eval mode)."""
        for m in self.bn_modules:
            if uses_batch_stats(m) and (bn_stats is None or bn_stats.get(m) is None):
                return False
        return True

    def _propagate(self, x: Tensor, eps: Tensor, norm: str, method: str, x_min: float,
                   x_max: float, bn_stats: Optional[BNStats] = None,
                   prior: Optional[Mapping[fx.Node, Interval]] = None,
                   prior_lin: Optional[Mapping[fx.Node, List[Tensor]]] = None, frozen: bool = False,
                   keep_lin: bool = False) -> "_Run":
        run = _Run(self, x, eps, norm, x_min, x_max)
        run.lin = {} if keep_lin else None
        run.value_free = self.clean_values != "always" and self.value_free_ok(bn_stats)
        fwd = self.uses_forward(method, frozen)
        if fwd:
            run.fwd = {}
        for n in self.nodes:
            if n.op == "output":
                break
            if n is self.input:
                run.val[n] = x
                run.bnd[n] = self._input_box(x, eps, x_min, x_max)
                if fwd:
                    run.fwd[n] = Lin.identity(x)
                    run.fwd[n].box = run.bnd[n]
                if norm == "2" and self.l2_ball:
                    run.ball[n] = Interval.from_mid_rad(x, eps.view((-1,) + (1,) * (x.dim() - 1)).expand_as(x))
                continue
            if n not in self.perturbed:
                run.val[n] = self._eval_concrete(n, run)
                continue
            op = self.ops[n]
            ctx: Dict[str, Any] = {}
            args = _map(n.args, run.stand_in)
            kwargs = _map(n.kwargs, run.stand_in)
            if run.value_free and op.value_free:
                stats = bn_stats.get(op.module) if (bn_stats is not None and op.module is not None) else None
                op.prepare(ctx, stats, *args, **kwargs)
                run.val[n] = None
            else:
                run.val[n] = op.forward(ctx, *args, **kwargs)
            run.ctx[n] = ctx
            iargs = _map(n.args, run.arg_bound)
            ikwargs = _map(n.kwargs, run.arg_bound)
            box = op.ibp(ctx, *iargs, **ikwargs)
            if norm == "2":
                box = self._l2_ball(run, n, op, ctx, box)
            if prior is not None and n in prior:  # bounds proven on a superset of the input set
                p = prior[n]
                lo = torch.maximum(box.lower, p.lower)
                box = Interval(lo, torch.maximum(lo, torch.minimum(box.upper, p.upper)))
            if prior_lin is not None and n in prior_lin:  # linear bounds proven at a larger eps
                cl, nl, cu, nu = prior_lin[n]
                e = eps.view(-1, 1).to(cl.dtype)
                lo = torch.maximum(box.lower.flatten(1), cl - e * nl)
                up = torch.maximum(lo, torch.minimum(box.upper.flatten(1), cu + e * nu))
                box = Interval(lo.view(box.ref.shape), up.view(box.ref.shape))
            if fwd:
                box = self._forward_node(run, n, op, ctx, box)
            if method == "crown" and n in self.pre_act and not frozen:
                t0 = time.process_time()
                box = self._crown_intermediate(run, n, box)
                run.times[n.name] = time.process_time() - t0
            run.bnd[n] = box
            run.max_numel = max(run.max_numel, box.ref[0].numel())
            if fwd:
                run.fwd[n].box = box
                for a in n.all_input_nodes:  # free the Lins no later node reads
                    if a in run.fwd and self.last_use[a] <= self.index[n]:
                        del run.fwd[a]
        return run

    def uses_forward(self, method: str, frozen: bool = False) -> bool:
        """Whether a call runs the forward-mode pre-pass: always for "crown-forward"; for
        "crown" when ``crown_forward`` is on and the intermediate bounds are recomputed. (Grad
        mode does not change the bounds; under autograd the [B, D, ...] weight tensors of every
        node stay alive for the backward, as full CROWN's passes do: certification runs no_grad.)"""
        return method == "crown-forward" or (method == "crown" and self.crown_forward and not frozen)

    def _forward_node(self, run: "_Run", n: fx.Node, op: BoundOp, ctx: Dict[str, Any], box: Interval) -> Interval:
        """Forward-mode linear bounds of ``n`` (``run.fwd[n]``) from its inputs'; for a node
        whose box a relaxation reads (or the output), the box becomes IBP ∩ their concretization.
        An op without a ``lin`` rule (or one that declines) gets its box as constant bounds."""
        args = _map(n.args, lambda a: run.fwd[a] if a in run.fwd else run.val.get(a))
        kwargs = _map(n.kwargs, lambda a: run.fwd[a] if a in run.fwd else run.val.get(a))
        lin = op.lin(ctx, box, *args, **kwargs)
        if lin is None:
            run.fwd_fallback.append(n.name)
            lin = Lin.const(box.lower, box.upper, run.x[0].numel())
        run.fwd[n] = lin
        if n not in self.pre_act and n is not self.output:
            return box
        fb = lin_concretize(lin, run.x, run.bnd[self.input], run.eps, run.norm)
        run.fwd_conc[n] = fb
        lo = torch.maximum(box.lower, fb.lower)
        box = Interval(lo, torch.maximum(lo, torch.minimum(box.upper, fb.upper)))
        if run.lin is not None and n in self.pre_act:  # the forward bounds as functions of eps
            run.lin[n] = list(dual_norms(lin, run.norm))
        return box

    def _l2_ball(self, run: "_Run", n: fx.Node, op: BoundOp, ctx: Dict[str, Any], box: Interval) -> Interval:
        """Intersect ``n``'s IBP box with what the l_2 ball alone allows, where that is cheap.

        Along the affine prefix of the graph (input -> Normalize -> conv -> BN ...) every
        element is ``c_i + d_i x'_j(i)`` with distinct j: the Jacobian rows w.r.t. the input
        are orthogonal, and the *ball interval* ``centre +- eps |d_i|`` (``run.ball``) is held
        exactly. A mixing op (conv, linear) applied to such an input bounds each output by the
        dual norm, ``W c + b +- eps ||W_row D||_2`` (:meth:`BoundOp.ibp_l2`), up to sqrt(fan-in)
        tighter than IBP's ``|W| rad`` of the box hull. The set is ball ∩ box, inside both,
        so the intersection of the ball interval and the IBP box is sound; the box path then
        goes on from the intersection (every later IBP and CROWN-IBP bound gains), the ball
        path stops at the first mixing or non-linear op (its rows are no longer orthogonal).
        """
        pins = [a for a in n.all_input_nodes if a in self.perturbed]
        if len(pins) != 1 or pins[0] not in run.ball:
            return box
        src = pins[0]
        bargs = _map(n.args, lambda a: run.ball[a] if a is src else run.arg_bound(a))
        bkwargs = _map(n.kwargs, lambda a: run.ball[a] if a is src else run.arg_bound(a))
        ball = op.ibp_l2(ctx, *bargs, **bkwargs)
        if ball is None:
            if not op.keeps_orthogonal_rows:
                return box
            ball = op.ibp(ctx, *bargs, **bkwargs)
            if ball.ref[0].numel() > run.ball[src].ref[0].numel():
                return box  # broadcasting the perturbed input repeats rows: not orthogonal
            run.ball[n] = ball
        lo = torch.maximum(box.lower, ball.lower)
        return Interval(lo, torch.maximum(lo, torch.minimum(box.upper, ball.upper)))

    def _eval_concrete(self, n: fx.Node, run: "_Run") -> Any:
        if n.op == "placeholder":
            if not n.args:
                raise BoundError(f"forward argument {n.name!r} has no default value")
            return n.args[0]
        if n.op == "get_attr":
            return _fetch_attr(self.model, n.target)
        args = _map(n.args, run.stand_in)  # a shape query may read a perturbed node
        kwargs = _map(n.kwargs, run.stand_in)
        if n.op == "call_module":
            return self.model.get_submodule(n.target)(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)

    # ------------------------------------------------------------------ backward passes
    def _peak_live(self, run: "_Run", start: fx.Node, cut: Optional[frozenset] = None) -> int:
        """Most coefficient elements (per spec row and example, lA or uA) alive at once in a
        backward pass from ``start``: every pending node of the DAG holds its own matrix, and
        a DARTS cell has many parallel branches, so this is several times the largest node."""
        key = (start, tuple(run.x.shape[1:]), cut)
        if key in self._live_cache:
            return self._live_cache[key]
        size = lambda n: run.bnd[n].ref[0].numel() if n in run.bnd else run.x[0].numel()  # noqa: E731
        pending = {start}
        live = peak = size(start)
        for n in reversed(self.nodes[: self.index[start] + 1]):
            if n not in pending:
                continue
            pending.discard(n)
            if n is not self.input and not (cut is not None and n in cut and n is not start):
                for a in n.all_input_nodes:
                    if a in self.perturbed and a not in pending:
                        pending.add(a)
                        live += size(a)
            peak = max(peak, live)
            live -= size(n)
        self._live_cache[key] = peak
        return peak

    def _chunks(self, run: "_Run", b: int, rows: int, start: Optional[fx.Node] = None,
                cut: Optional[frozenset] = None) -> Tuple[int, int]:
        """(examples, rows) per chunk so that one backward pass from ``start`` (all its live
        [b, rows, node] matrices, lA and uA, plus temporaries) fits ``max_memory_mb``."""
        live = self._peak_live(run, start, cut) if start is not None else max(run.max_numel, 1)
        per = (2 * live + 6 * max(run.max_numel, 1)) * run.x.element_size()
        budget = max(1.0, self.max_memory_mb * 2 ** 20 / per)  # rows*examples per chunk
        rows_c = int(max(1, min(rows, budget)))
        ex_c = int(max(1, min(b, budget // rows_c)))
        return ex_c, rows_c

    def _backward(self, run: "_Run", start: fx.Node, lA: Optional[Tensor], uA: Optional[Tensor],
                  bs: slice, cut: Optional[frozenset] = None,
                  parts: Optional[List[Tuple[Tensor, ...]]] = None,
                  lins: Optional[List[Tuple[Any, ...]]] = None) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Linear bounds of ``spec . start`` over the input set for examples ``bs``.

        ``cut``: nodes (never ``start``) where the pass stops and concretizes its coefficients
        over the node's box -- sound (the node's value lies in its box), looser than going on
        to the input, and the pass costs only the ops between ``start`` and the cut. ``parts`` (a
        pass with no cut, lA and uA given): receives the bounds as functions of eps
        (:meth:`_Run.eps_linear`)."""
        As: Dict[fx.Node, List[Optional[Tensor]]] = {start: [lA, uA]}
        lbias: Any = 0.0
        ubias: Any = 0.0
        for n in reversed(self.nodes[: self.index[start] + 1]):
            if n not in As:
                continue
            cl, cu = As.pop(n)
            if n is self.input:
                if parts is not None:
                    parts.append(run.eps_linear(cl, cu, lbias, ubias, bs))
                if lins is not None:  # the linear bounds themselves (forward re-anchoring)
                    lins.append((cl, cu, lbias, ubias))
                lo, up = run.concretize(cl, cu, bs)
                lbias = lbias + lo if lo is not None else lbias
                ubias = ubias + up if up is not None else ubias
                continue
            if cut is not None and n in cut and n is not start:
                box = run.arg_bound(n, bs)
                lo_b, up_b = box.lower.unsqueeze(1), box.upper.unsqueeze(1)
                if cl is not None:
                    lbias = lbias + sum_spec(cl.clamp(min=0) * lo_b + cl.clamp(max=0) * up_b)
                if cu is not None:
                    ubias = ubias + sum_spec(cu.clamp(min=0) * up_b + cu.clamp(max=0) * lo_b)
                continue
            op = self.ops[n]
            args = _map(n.args, lambda a: run.arg_bound(a, bs))
            kwargs = _map(n.kwargs, lambda a: run.arg_bound(a, bs))
            res, lb, ub = op.backward(run.ctx[n], cl, cu, *args, **kwargs)
            if cl is not None:
                lbias = lbias + lb
            if cu is not None:
                ubias = ubias + ub
            self._accumulate(As, n.args, res)
        ref = lA if lA is not None else uA
        zero = ref.new_zeros(ref.shape[:2])
        return (lbias + zero if lA is not None else None), (ubias + zero if uA is not None else None)

    def _accumulate(self, As, args, res) -> None:
        if isinstance(args, fx.Node):
            if res is None or args not in self.perturbed:
                return
            slot = As.setdefault(args, [None, None])
            for i in range(2):
                if res[i] is not None:
                    slot[i] = res[i] if slot[i] is None else slot[i] + res[i]
            return
        if isinstance(args, (list, tuple)) and isinstance(res, (list, tuple)):
            for a, r in zip(args, res):
                self._accumulate(As, a, r)

    #: stack [C; -C] when C has at most this many rows (see _lower_upper)
    stack_rows: int = 1

    def _lower_upper(self, run: "_Run", node: fx.Node, C: Tensor, bs: slice,
                     need_upper: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """Lower (and upper) bounds of ``C @ node`` for examples ``bs``.

        For a single spec row (DSRNA-CB's mean margin) both come from ONE lower-bound pass
        over the stacked rows [C; -C]: the relaxations are sign-symmetric, so ub(C) = -lb(-C)
        exactly, and one op on 2 rows costs less than two ops on 1 row in a graph of thousands
        of small ops (5% of an arch step, bench_metrics.py); with 9 rows stacking measured 19%
        slower, so lA and uA then travel side by side.
        """
        if not need_upper:
            return self._backward(run, node, C, None, bs)[0], None
        if C.shape[1] > self.stack_rows:
            return self._backward(run, node, C, C, bs)
        k = C.shape[1]
        lo, _ = self._backward(run, node, torch.cat([C, -C], 1), None, bs)
        return lo[:, :k], -lo[:, k:]

    def _spec_bounds(self, run: "_Run", node: fx.Node, C: Tensor, need_upper: bool = True):
        """CROWN bounds of ``C[b] @ node[b]`` (C: [B, S, *node_shape]), chunked."""
        B, S = C.shape[:2]
        ex_c, rows_c = self._chunks(run, B, S, node)
        lows, ups = [], []
        for b0 in range(0, B, ex_c):
            bs = slice(b0, min(B, b0 + ex_c))
            lr, ur = [], []
            for s0 in range(0, S, rows_c):
                Cc = C[bs, s0:s0 + rows_c]
                lo, up = self._lower_upper(run, node, Cc, bs, need_upper)
                lr.append(lo)
                ur.append(up)
            lows.append(torch.cat(lr, 1))
            if need_upper:
                ups.append(torch.cat(ur, 1))
        return torch.cat(lows, 0), (torch.cat(ups, 0) if need_upper else None)

    def _cut(self, node: fx.Node, depth: int) -> Optional[frozenset]:
        """Where an intermediate-bound pass from ``node`` stops (``depth`` > 0; 0: nowhere, it
        goes on to the input): the outputs of relaxed ops (ReLU, max pool) at least ``depth``
        relaxed layers back. Their boxes are exact images of their input boxes, so the pass
        loses only the correlation between their elements, and its cost stops growing with
        the depth of the network."""
        if depth <= 0:
            return None
        key = (node, depth)
        if key not in self._cut_cache:
            top = self.depth[node] - depth
            self._cut_cache[key] = frozenset(n for n, op in self.ops.items()
                                             if op.needs_input_bounds and self.depth[n] <= top)
        return self._cut_cache[key]

    def _loose_mask(self, node: fx.Node, box: Interval) -> Tensor:
        """[b, N] bool: the elements of ``node`` whose bounds matter to some user's relaxation
        (unstable ReLUs, max-pool candidates), per example."""
        everything = torch.ones_like(box.ref.flatten(1), dtype=torch.bool)
        mask = None
        for u in node.users:
            op = self.ops.get(u)
            if op is None or not op.needs_input_bounds:
                continue
            if not self.crown_pool_inputs and not isinstance(op, BoundReLU):
                mask = torch.zeros_like(everything) if mask is None else mask
                continue  # max-pool inputs keep their IBP boxes (a cheaper, looser CROWN)
            m = op.loose_inputs(box) if u.args and u.args[0] is node else None
            if m is None:
                return everything
            mask = m.flatten(1) if mask is None else mask | m.flatten(1)
        return everything if mask is None else mask

    def _crown_intermediate(self, run: "_Run", node: fx.Node, box: Interval) -> Interval:
        """Tighten ``node``'s IBP box by backward passes from an identity spec, chunked.

        Only neurons whose relaxation can change are recomputed: for a node that feeds ReLUs
        only, the neurons unstable in some example of the chunk (a stable neuron is already
        handled exactly); for a node feeding a max pool, its candidates (or none, with
        ``crown_pool_inputs=False``).

        Staged (``crown_stages``): first passes cut ``d`` relaxed layers back (see :meth:`_cut`;
        cost grows with ``d``, not with the depth of the network) on every loose neuron, then
        the pass to the input only on the neurons *still* loose. Every stage is sound and is
        intersected in, so a neuron a cheap stage proves stable keeps an exact relaxation:
        for ReLU-only nodes the result relaxes every neuron as single-stage full CROWN does,
        or tighter (intersection), at a fraction of the cost -- IBP leaves thousands of
        neurons per layer loose that a cut pass already settles (e.g. 2003 -> 6 on a cell of
        the fmnist_small net).
        """
        val = box.ref
        B = val.shape[0]
        shape = tuple(val.shape[1:])
        N = math.prod(shape)
        lo_all, up_all = box.lower.flatten(1), box.upper.flatten(1)
        depths = [d for d in self.crown_stages if 0 < d < self.depth[node]]
        if self.crown_depth > 0:
            depths = [d for d in depths if d < self.crown_depth] + [self.crown_depth]
        else:
            depths = depths + [0]
        ex_c, _ = self._chunks(run, B, 1, node)
        lows, ups = [], []
        anchor = run.fwd is not None and node in run.fwd and node in run.fwd_conc
        updates: List[Tuple[Any, ...]] = []
        for b0 in range(0, B, ex_c):
            bs = slice(b0, min(B, b0 + ex_c))
            b = bs.stop - bs.start
            lo_c, up_c = lo_all[bs], up_all[bs]
            for d in depths:
                cut = self._cut(node, d)
                loose = self._loose_mask(node, Interval(lo_c.view((b,) + shape), up_c.view((b,) + shape)))
                cols_all = loose.any(0).nonzero().flatten()
                if cols_all.numel() == 0:
                    break
                sets = [cols_all]
                P = self.crown_probe_rows
                if d == 0 and P > 0 and node not in self.relu_only_pre_act and cols_all.numel() > 2 * P:
                    pick = torch.zeros(cols_all.numel(), dtype=torch.bool, device=cols_all.device)
                    pick[torch.linspace(0, cols_all.numel() - 1, P, device=cols_all.device).round().long()] = True
                    sets = [cols_all[pick], cols_all[~pick]]
                gain = math.inf
                for si, cols in enumerate(sets):
                    if si == 1 and gain < self.crown_probe_tol:  # the probes gained nothing: skip the rest
                        run.skipped[node.name] = run.skipped.get(node.name, 0) + int(cols.numel())
                        break
                    if d == 0:
                        run.rows[node.name] = run.rows.get(node.name, 0) + int(cols.numel())
                    lo_old, up_old = lo_c[:, cols], up_c[:, cols]
                    _, rows_c = self._chunks(run, b, cols.numel(), node, cut)
                    lr, ur = [], []
                    parts: Optional[List[Tuple[Tensor, ...]]] = [] if (run.lin is not None and cut is None) else None
                    lins: Optional[List[Tuple[Any, ...]]] = [] if (anchor and cut is None) else None
                    for s0 in range(0, cols.numel(), rows_c):
                        c = cols[s0:s0 + rows_c]
                        k = c.numel()
                        eye = val.new_zeros((k, N))
                        eye[torch.arange(k, device=val.device), c] = 1.0
                        Cc = eye.view((1, k) + shape).expand((b, k) + shape)
                        lo, up = self._backward(run, node, Cc, Cc, bs, cut, parts, lins)
                        lr.append(lo)
                        ur.append(up)
                    # tighten only where this example needs it, so results do not depend on chunking
                    sel = loose[:, cols]
                    lo_n = torch.where(sel, torch.maximum(torch.cat(lr, 1), lo_c[:, cols]), lo_c[:, cols])
                    up_n = torch.where(sel, torch.minimum(torch.cat(ur, 1), up_c[:, cols]), up_c[:, cols])
                    lo_c = lo_c.index_copy(1, cols, lo_n)
                    up_c = up_c.index_copy(1, cols, torch.maximum(up_n, lo_n))
                    if parts:
                        self._store_eps_linear(run, node, bs, cols, sel, parts, B, N)
                    if lins:
                        updates.append((bs, cols, sel, lins, torch.cat(lr, 1), torch.cat(ur, 1)))
                    if len(sets) > 1 and si == 0:  # largest relative gain of a probe on its box
                        rel = torch.maximum(lo_n - lo_old, up_old - up_n) / (up_old - lo_old).clamp(min=1e-30)
                        gain = float(torch.where(sel, rel, torch.zeros_like(rel)).max())
            lows.append(lo_c)
            ups.append(up_c)
        if updates:
            self._reanchor(run, node, updates)
        return Interval(torch.cat(lows, 0).view(val.shape), torch.cat(ups, 0).view(val.shape))

    @staticmethod
    def _reanchor(run: "_Run", node: fx.Node, updates: List[Tuple[Any, ...]]) -> None:
        """Give ``node``'s forward bounds the backward passes' linear bounds where those
        concretize tighter (per example, row and side). Both are sound linear bounds of the
        node over the input set; deep in a DARTS net the backward ones are 10-100x tighter
        than the forward ones, and every later node's forward bounds -- hence how many of
        its rows stay loose and need a backward pass -- start from them."""
        lin = run.fwd[node]
        B, D = lin.lw.shape[:2]
        shape = tuple(lin.lb.shape)
        lw, uw = lin.lw.reshape(B, D, -1).clone(), lin.uw.reshape(B, D, -1).clone()
        lb, ub = lin.lb.reshape(B, -1).clone(), lin.ub.reshape(B, -1).clone()
        fc = run.fwd_conc[node]
        f_lo, f_up = fc.lower.reshape(B, -1), fc.upper.reshape(B, -1)
        for bs, cols, sel, lins, lo_bw, up_bw in updates:
            x0 = run.x[bs].flatten(1)
            b = x0.shape[0]
            for side, (W, Bv, conc, better) in enumerate(((lw, lb, lo_bw, lo_bw > f_lo[bs][:, cols]),
                                                          (uw, ub, up_bw, up_bw < f_up[bs][:, cols]))):
                A = torch.cat([p[side].reshape(b, p[side].shape[1], D) for p in lins], 1)  # [b, k, D]
                bias = torch.cat([p[2 + side] + A.new_zeros(b, p[side].shape[1]) for p in lins], 1)
                bias = bias + torch.einsum("bkd,bd->bk", A, x0)  # relative to the clean input
                use = sel & better
                Wv, Bb = W[bs], Bv[bs]
                Wv[:, :, cols] = torch.where(use.unsqueeze(1), A.transpose(1, 2), Wv[:, :, cols])
                Bb[:, cols] = torch.where(use, bias, Bb[:, cols])
        new = Lin(lw.view((B, D) + shape[1:]), lb.view(shape), uw.view((B, D) + shape[1:]), ub.view(shape))
        run.fwd[node] = new

    @staticmethod
    def _store_eps_linear(run: "_Run", node: fx.Node, bs: slice, cols: Tensor, sel: Tensor,
                          parts: List[Tuple[Tensor, ...]], B: int, N: int) -> None:
        """Record the full-depth linear bounds of ``node``'s columns ``cols`` (examples ``bs``,
        where ``sel``) as ``centre -/+ eps * dual norm`` in ``run.lin`` (flat [B, N] tensors)."""
        if node not in run.lin:
            ref = run.x
            inf = torch.full((B, N), math.inf, dtype=ref.dtype, device=ref.device)
            zero = torch.zeros((B, N), dtype=ref.dtype, device=ref.device)
            run.lin[node] = [-inf, zero, inf.clone(), zero.clone()]
        cl, nl, cu, nu = (torch.cat([p[i] for p in parts], 1) for i in range(4))
        slot = run.lin[node]
        for i, (v, fill) in enumerate(((cl, -math.inf), (nl, 0.0), (cu, math.inf), (nu, 0.0))):
            cur = slot[i][bs]
            cur[:, cols] = torch.where(sel, v, cur[:, cols])
            slot[i][bs] = cur

    # ------------------------------------------------------------------ public API
    def _prepare(self, x: Tensor, eps: Union[float, Tensor], norm: str, method: str,
                 x_min: float, x_max: float) -> Tensor:
        if norm not in NORMS:
            raise BoundError(f"norm: {norm!r} not in {NORMS}")
        if method not in METHODS:
            raise BoundError(f"method: {method!r} not in {METHODS}")
        if x_min > x_max:
            raise BoundError(f"x_min={x_min} > x_max={x_max}")
        if x.numel() and (x.min() < x_min - 1e-6 or x.max() > x_max + 1e-6):
            raise BoundError(f"input outside the valid range [{x_min}, {x_max}]")
        eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
        eps_t = eps_t.expand(x.shape[0]) if eps_t.dim() == 0 else eps_t
        if eps_t.shape != (x.shape[0],):
            raise BoundError(f"eps: expected a number or a [{x.shape[0]}] tensor, got shape {tuple(eps_t.shape)}")
        if (eps_t < 0).any():
            raise BoundError("eps must be >= 0")
        return eps_t

    def bounds(self, x: Tensor, eps: Union[float, Tensor], norm: str = "inf", method: str = "crown-ibp",
               C: Optional[Tensor] = None, x_min: float = 0.0, x_max: float = 1.0,
               need_upper: bool = True, bn_stats: Optional[BNStats] = None,
               keep: Optional[Dict[fx.Node, Interval]] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """(lb, ub) of ``C @ logits`` for every input in the set; C: [S, K] or [B, S, K] or None
        (identity: bounds of the logits). Returns [B, S] tensors (ub None if not needed).

        ``bn_stats``: {BN module: (mean, var)} for the BatchNorms in train mode, e.g. captured
        from the caller's forward by :func:`capture_bn_stats`; then no clean pass is run.
        ``keep``: a dict that receives the relaxed nodes' boxes (certified training's
        bound-balance regulariser reads the ReLU pre-activation boxes from it)."""
        return self._bounds(x, eps, norm, method, lambda out: C, x_min, x_max, need_upper, bn_stats, keep=keep)

    def _forward_examples(self, x: Tensor, bn_stats: Optional[BNStats]) -> int:
        """Examples per forward-mode chunk: the weights are [b, D, *node] per node, D = input
        numel, so one example of a 28x28 DARTS net already holds ~60 MB per live Lin; chunks
        keep ~8 of the largest near ``max_memory_mb`` (one example at least). Batch statistics
        are per batch, so a call that computes them from the clean batch is not split."""
        if self.clean_values == "always" or not self.value_free_ok(bn_stats):
            return x.shape[0]
        key = tuple(x.shape[1:])
        if key not in self._fwd_numel:
            with torch.no_grad():
                run = self._propagate(x[:1], x.new_zeros(1), "inf", "ibp", -math.inf, math.inf, bn_stats)
            self._fwd_numel[key] = max(b.ref[0].numel() for b in run.bnd.values())
        per = 8 * x[0].numel() * self._fwd_numel[key] * x.element_size()
        return int(max(1, self.max_memory_mb * 2 ** 20 // per))

    def _bounds(self, x, eps, norm, method, make_C, x_min, x_max, need_upper, bn_stats=None,
                prior=None, keep=None, prior_lin=None, keep_lin=None, frozen=False):
        if torch.is_autocast_enabled(x.device.type):
            # a caller's mixed precision (the bf16 arch step, bf16 certified training) stops here:
            # bounds are propagated in fp32, as reduced-precision rounding is no part of the
            # relaxation (and CPU bf16 autocast mixed dtypes in the IBP tensordot: a crash)
            with torch.autocast(x.device.type, enabled=False):
                return self._bounds(x.float(), eps, norm, method, lambda out: _fp32(make_C(out)), x_min,
                                    x_max, need_upper, bn_stats, prior, keep, prior_lin, keep_lin, frozen)
        B = x.shape[0]
        ex_c = self._forward_examples(x, bn_stats) if (B > 1 and self.uses_forward(method, frozen)) else B
        if ex_c >= B:
            return self._bounds_one(x, eps, norm, method, make_C, x_min, x_max, need_upper, bn_stats,
                                    prior, keep, prior_lin, keep_lin, frozen)
        eps_t = self._prepare(x, eps, norm, method, x_min, x_max)
        lows, ups = [], []
        keeps: List[Dict] = []
        keep_lins: List[Dict] = []
        for b0 in range(0, B, ex_c):
            bs = slice(b0, min(B, b0 + ex_c))

            def make_c(out, bs=bs):
                C = make_C(out)
                return C[bs] if (C is not None and C.dim() == out.dim() + 1 and C.shape[0] == B) else C

            k = {} if keep is not None else None
            kl = {} if keep_lin is not None else None
            lo, up = self._bounds_one(
                x[bs], eps_t[bs], norm, method, make_c, x_min, x_max, need_upper, bn_stats,
                None if prior is None else {n: v.slice(bs) for n, v in prior.items()}, k,
                None if prior_lin is None else {n: [t[bs] for t in v] for n, v in prior_lin.items()}, kl, frozen)
            lows.append(lo)
            ups.append(up)
            keeps.append(k)
            keep_lins.append(kl)
        if keep is not None:
            keep.update({n: Interval(torch.cat([k[n].lower for k in keeps]), torch.cat([k[n].upper for k in keeps]))
                         for n in keeps[0]})
        if keep_lin is not None and keep_lins[0]:
            keep_lin.update({n: [torch.cat([kl[n][i] for kl in keep_lins]) for i in range(4)]
                             for n in keep_lins[0]})
        return torch.cat(lows), (torch.cat(ups) if need_upper else None)

    def _forward_spec(self, run: "_Run", C: Tensor) -> Tuple[Tensor, Tensor]:
        """Bounds of ``C @ out`` from the output's forward-mode linear bounds (C+ L + C- U)."""
        lin = run.fwd[self.output]
        B, D = lin.lw.shape[:2]
        Cf = C.flatten(2)
        Cp, Cn = Cf.clamp(min=0), Cf.clamp(max=0)
        lw, uw = lin.lw.reshape(B, D, -1), lin.uw.reshape(B, D, -1)
        lb, ub = lin.lb.reshape(B, -1), lin.ub.reshape(B, -1)
        w_lo = torch.einsum("bsk,bdk->bds", Cp, lw) + torch.einsum("bsk,bdk->bds", Cn, uw)
        w_up = torch.einsum("bsk,bdk->bds", Cp, uw) + torch.einsum("bsk,bdk->bds", Cn, lw)
        b_lo = torch.einsum("bsk,bk->bs", Cp, lb) + torch.einsum("bsk,bk->bs", Cn, ub)
        b_up = torch.einsum("bsk,bk->bs", Cp, ub) + torch.einsum("bsk,bk->bs", Cn, lb)
        box = lin_concretize(Lin(w_lo, b_lo, w_up, b_up), run.x, run.bnd[self.input], run.eps, run.norm)
        return box.lower, box.upper

    def _bounds_one(self, x, eps, norm, method, make_C, x_min, x_max, need_upper, bn_stats=None,
                    prior=None, keep=None, prior_lin=None, keep_lin=None, frozen=False):
        eps_t = self._prepare(x, eps, norm, method, x_min, x_max)
        run = self._propagate(x, eps_t, norm, method, x_min, x_max, bn_stats, prior, prior_lin, frozen,
                              keep_lin is not None)
        self.last_run_rows, self.last_run_times = dict(run.rows), dict(run.times)  # profiling (bench_crown_pass)
        self.last_run_skipped = dict(run.skipped)
        if keep is not None:  # hand the relaxed nodes' bounds back (certified_radius reuses them)
            keep.update({n: run.bnd[n] for n in self.pre_act})
        if keep_lin is not None and run.lin is not None:
            keep_lin.update(run.lin)
        out = run.stand_in(self.output)
        B = out.shape[0]
        per = tuple(out.shape[1:])
        C = make_C(out)
        if C is None:
            K = math.prod(per)
            C = torch.eye(K, dtype=out.dtype, device=out.device).view((K,) + per)
        C = C.to(out.dtype)
        if C.dim() == len(per) + 1:
            C = C.unsqueeze(0).expand((B,) + tuple(C.shape))
        if tuple(C.shape[2:]) != per or C.shape[0] != B:
            raise BoundError(f"C: expected shape [S, {', '.join(map(str, per))}] or [B, S, ...], "
                             f"got {tuple(C.shape)}")
        ibp_lb, ibp_ub = self._ibp_spec(run, C)
        if method == "ibp":
            return ibp_lb, (ibp_ub if need_upper else None)
        if run.fwd is not None and self.output in run.fwd:  # never looser than the forward bounds
            f_lb, f_ub = self._forward_spec(run, C)
            ibp_lb, ibp_ub = torch.maximum(ibp_lb, f_lb), torch.minimum(ibp_ub, f_ub)
        lb, ub = self._spec_bounds(run, self.output, C, need_upper)
        if self.max_pool == "best" and self._max_pools:
            self._set_pool_relaxation("cnn-cert")
            try:
                lb2, ub2 = self._spec_bounds(run, self.output, C, need_upper)
            finally:
                self._set_pool_relaxation("cheap")
            lb = torch.maximum(lb, lb2)
            ub = torch.minimum(ub, ub2) if ub is not None else None
        if method in ("crown", "crown-forward"):
            lb = torch.maximum(lb, ibp_lb)
            ub = torch.minimum(ub, ibp_ub) if ub is not None else None
        return lb, ub

    def _ibp_spec(self, run: "_Run", C: Tensor) -> Tuple[Tensor, Tensor]:
        """IBP bounds of ``C @ out`` with C folded into the last layer when it is a Linear:
        ``(C W) h + C b`` over h's box is never looser than ``C`` applied to the logit box
        (|C W| <= |C| |W| element-wise) and often 1.5-2x tighter for margins."""
        Cf = C.flatten(2)
        op = self.ops[self.output]
        src = self.output.args[0] if self.output.args else None
        if (self.fold_spec and isinstance(op, BoundLinear) and isinstance(src, fx.Node) and src in self.perturbed
                and not self.output.kwargs and len(self.output.args) == 1):
            m = op.module
            h = run.bnd[src]
            CW = Cf @ m.weight  # [B, S, in]
            centre = torch.einsum("bsn,bn->bs", CW, h.mid.flatten(1))
            if m.bias is not None:
                centre = centre + Cf @ m.bias
            spread = torch.einsum("bsn,bn->bs", CW.abs(), h.rad.flatten(1))
            return centre - spread, centre + spread
        box = run.bnd[self.output]
        centre = torch.einsum("bsk,bk->bs", Cf, box.mid.flatten(1))
        spread = torch.einsum("bsk,bk->bs", Cf.abs(), box.rad.flatten(1))
        return centre - spread, centre + spread

    def margin_lower_bound(self, x: Tensor, y: Tensor, eps: Union[float, Tensor], norm: str = "inf",
                           method: str = "crown-ibp", x_min: float = 0.0, x_max: float = 1.0,
                           target: Optional[Tensor] = None, prior: Optional[Mapping[fx.Node, Interval]] = None,
                           keep: Optional[Dict[fx.Node, Interval]] = None,
                           prior_lin: Optional[Mapping[fx.Node, List[Tensor]]] = None,
                           keep_lin: Optional[Dict[fx.Node, List[Tensor]]] = None,
                           frozen: bool = False) -> Tensor:
        """Lower bounds of ``f_y - f_j``: [B, K] with column ``y`` exactly 0 (its spec row is
        empty), or [B] against ``target`` when given. Differentiable in the model's parameters.

        ``prior``: bounds of relaxed nodes proven for the same examples on a *larger* input set
        (a larger eps), intersected in; ``keep``: a dict that receives this call's bounds of
        the relaxed nodes. Together they let a radius search reuse work across eps.
        ``keep_lin`` (full CROWN): receives the intermediate bounds as functions of eps,
        ``centre -/+ eps * norm``, valid at every eps up to this call's; ``prior_lin`` takes
        them back (at a smaller eps); ``frozen``: full CROWN without recomputing intermediate
        bounds (IBP intersected with ``prior`` / ``prior_lin``), one backward pass per call."""
        y = torch.as_tensor(y, device=x.device).long().view(-1)
        lb, _ = self._bounds(x, eps, norm, method,
                             lambda out: margin_spec(y, out.shape[-1], target).to(out.dtype),
                             x_min, x_max, need_upper=False, prior=prior, keep=keep, prior_lin=prior_lin,
                             keep_lin=keep_lin, frozen=frozen)
        if target is not None:
            return lb[:, 0]
        K = lb.shape[1] + 1
        out = lb.new_zeros((x.shape[0], K))
        return out.scatter(1, _others(y, K), lb)

    __call__ = bounds


def _fp32(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.float() if t is not None and t.is_floating_point() else t


def _others(y: Tensor, K: int) -> Tensor:
    """[B, K-1] indices of the classes other than y, in order."""
    ar = torch.arange(K, device=y.device).expand(y.shape[0], K)
    return ar[ar != y[:, None]].view(y.shape[0], K - 1)


def margin_spec(y: Tensor, K: int, target: Optional[Tensor] = None) -> Tensor:
    """C with rows ``e_y - e_j``: [B, K-1, K] over j != y, or [B, 1, K] for one target each."""
    eye = torch.eye(K, device=y.device)
    if target is not None:
        if (target == y).any():
            raise BoundError("target: a target class equals the true label")
        return (eye[y] - eye[target]).unsqueeze(1)
    j = _others(y, K)
    return eye[y].unsqueeze(1) - eye[j]


class _Run:
    """Per-call state: clean values, intervals and op contexts of every node."""

    def __init__(self, bm: BoundedModel, x: Tensor, eps: Tensor, norm: str, x_min: float, x_max: float):
        self.bm = bm
        self.x, self.eps, self.norm = x, eps, norm
        self.x_min, self.x_max = x_min, x_max
        self.val: Dict[fx.Node, Any] = {}
        self.bnd: Dict[fx.Node, Interval] = {}
        self.ctx: Dict[fx.Node, Dict[str, Any]] = {}
        #: l_2 only: ball intervals of the nodes with orthogonal input-Jacobian rows (see _l2_ball)
        self.ball: Dict[fx.Node, Interval] = {}
        self.max_numel = x[0].numel() if x.shape[0] else 1
        self.value_free = False
        #: full CROWN with ``keep_linear``: {pre-activation node: [centre_l, norm_l, centre_u,
        #: norm_u]} flat [B, N], the intermediate bounds as functions of eps (see eps_linear)
        self.lin: Optional[Dict[fx.Node, List[Tensor]]] = None
        #: forward mode: {node: Lin} of the nodes some later node still reads
        self.fwd: Optional[Dict[fx.Node, Lin]] = None
        #: forward mode: the nodes whose op had no linear rule (they kept their box)
        self.fwd_fallback: List[str] = []
        #: forward mode: the concretized forward bounds of the relaxed nodes (before intersection)
        self.fwd_conc: Dict[fx.Node, Interval] = {}
        #: full CROWN: rows (neurons) of each node's backward passes to the input (profiling)
        self.rows: Dict[str, int] = {}
        self.times: Dict[str, float] = {}
        #: full CROWN with crown_probe_rows: rows skipped because the probes gained < tol
        self.skipped: Dict[str, int] = {}

    def stand_in(self, a: fx.Node) -> Any:
        """The clean value of node ``a``, or (value-free run) a tensor of its shape."""
        v = self.val[a]
        return self.bnd[a].ref if v is None and a in self.bnd else v

    def arg_bound(self, a: fx.Node, bs: Optional[slice] = None) -> Any:
        if a in self.bm.perturbed:
            box = self.bnd[a]
            whole = bs is None or (bs.start in (0, None) and bs.stop >= self.x.shape[0] and bs.step in (1, None))
            return box if whole else box.slice(bs)
        return self.val[a]

    def eps_linear(self, lA: Tensor, uA: Tensor, lbias: Any, ubias: Any, bs: slice) -> Tuple[Tensor, ...]:
        """The bounds of a finished backward pass as functions of eps: ``lower(e) = cl - e nl``,
        ``upper(e) = cu + e nu`` (centre at the clean input, dual norm of the input coefficients).

        The relaxations were chosen on the boxes of this eps, and every smaller input set lies
        in those boxes, so the linear bounds hold there too; concretized over the plain ball
        (a superset of ball ∩ [x_min, x_max]) they are sound for every e <= this eps."""
        x0 = self.x[bs].flatten(1)
        p = 1 if self.norm == "inf" else 2

        def one(A: Tensor, bias: Any) -> Tuple[Tensor, Tensor]:
            Af = A.flatten(2)
            return torch.einsum("bsn,bn->bs", Af, x0) + bias, torch.linalg.vector_norm(Af, ord=p, dim=2)

        cl, nl = one(lA, lbias)
        cu, nu = one(uA, ubias)
        return cl, nl, cu, nu

    def concretize(self, lA: Optional[Tensor], uA: Optional[Tensor], bs: slice):
        box = self.bnd[self.bm.input].slice(bs)
        mid, rad = box.mid.flatten(1), box.rad.flatten(1)
        x0 = self.x[bs].flatten(1)
        eps = self.eps[bs]

        def one(A: Tensor, sign: float) -> Tensor:
            return concretize_rows(A.flatten(2), sign, mid, rad, self.norm, eps, ball_centre=x0)

        return (one(lA, -1.0) if lA is not None else None), (one(uA, 1.0) if uA is not None else None)
