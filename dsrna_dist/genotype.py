"""Genotypes as data: a validated dataclass <-> JSON, plus the published cells by name.

A genotype lists, for each intermediate node of the normal and the reduction cell, the two
incoming edges as ``(op_name, input_index)`` where inputs 0 and 1 are the cell inputs and
``k >= 2`` is intermediate node ``k - 2``. Nothing is eval'd: files are plain JSON.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

Edge = Tuple[str, int]
#: the fields of a genotype file (anything else in a file is refused by from_dict)
FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")

#: ops without weights: what a loose certified bound or a flat Jacobian can favour without
#: learning anything (issue 11: DSRNA-CB's pull toward pools)
PARAM_FREE_OPS = frozenset(("max_pool_3x3", "avg_pool_3x3", "skip_connect", "none"))


class GenotypeError(ValueError):
    """A genotype file or value is malformed; the message says where."""


@dataclass(frozen=True)
class Genotype:
    normal: Tuple[Edge, ...]
    normal_concat: Tuple[int, ...]
    reduce: Tuple[Edge, ...]
    reduce_concat: Tuple[int, ...]

    @property
    def nodes(self) -> int:
        """Number of intermediate nodes per cell."""
        return len(self.normal) // 2

    def param_free_ops(self) -> Tuple[int, int]:
        """How many of the normal and of the reduction cell's selected edges carry no weights."""
        return (sum(op in PARAM_FREE_OPS for op, _ in self.normal),
                sum(op in PARAM_FREE_OPS for op, _ in self.reduce))

    def to_dict(self) -> Dict[str, Any]:
        return {"normal": [list(e) for e in self.normal], "normal_concat": list(self.normal_concat),
                "reduce": [list(e) for e in self.reduce], "reduce_concat": list(self.reduce_concat)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def __str__(self) -> str:
        def cell(edges: Sequence[Edge]) -> str:
            return "; ".join(f"{edge_name(src, i // 2)} {op}" for i, (op, src) in enumerate(edges))
        return f"normal: {cell(self.normal)} | reduce: {cell(self.reduce)}"


def node_name(index: int) -> str:
    """One naming convention for cell nodes everywhere (heatmaps, cell diagrams, logs): the
    cell inputs ``c_{k-2}`` (index 0) and ``c_{k-1}`` (index 1), intermediate node ``k - 2``
    for index ``k >= 2`` (so intermediate nodes are numbered 0, 1, ...)."""
    return "c_{k-2}" if index == 0 else "c_{k-1}" if index == 1 else str(index - 2)


def edge_name(src: int, node: int) -> str:
    """The edge from input ``src`` (genotype index) into intermediate node ``node`` (0-based)."""
    return f"{node_name(src)}->{node}"


def edge_names(nodes: int) -> List[str]:
    """Edge names in the supernet's alpha row order: node 0's 2 inputs, node 1's 3, ..."""
    return [edge_name(j, i) for i in range(nodes) for j in range(2 + i)]


def _parse_edges(raw: Any, where: str) -> Tuple[Edge, ...]:
    if not isinstance(raw, (list, tuple)):
        raise GenotypeError(f"{where}: expected a list of [op, input] pairs")
    out = []
    for i, e in enumerate(raw):
        if (not isinstance(e, (list, tuple)) or len(e) != 2 or not isinstance(e[0], str)
                or isinstance(e[1], bool) or not isinstance(e[1], int)):
            raise GenotypeError(f"{where}[{i}]: expected [op_name, input_index], got {e!r}")
        out.append((e[0], int(e[1])))
    return tuple(out)


def validate(g: Genotype, where: str = "genotype", nodes: int | None = None) -> Genotype:
    """Check op names, edge counts, input indices and concat lists; raise GenotypeError."""
    from .space.ops import OPS  # late import: the op registry fills on import

    for cell, edges, concat in (("normal", g.normal, g.normal_concat), ("reduce", g.reduce, g.reduce_concat)):
        if len(edges) == 0 or len(edges) % 2:
            raise GenotypeError(f"{where}.{cell}: needs 2 edges per node, got {len(edges)} edges")
        n = len(edges) // 2
        if nodes is not None and n != nodes:
            raise GenotypeError(f"{where}.{cell}: has {n} intermediate nodes but the network "
                                f"config (model.nodes) expects {nodes}")
        for i, (op, src) in enumerate(edges):
            if op not in OPS or op == "none":
                valid = ", ".join(o for o in OPS.names() if o != "none")
                raise GenotypeError(f"{where}.{cell}[{i}]: unknown op {op!r}; valid: {valid}")
            node = i // 2
            if not 0 <= src < node + 2:
                raise GenotypeError(f"{where}.{cell}[{i}]: input {src} invalid for node {node + 2} "
                                    f"(must be in 0..{node + 1})")
        if not concat or any(not 2 <= c < n + 2 for c in concat) or len(set(concat)) != len(concat):
            raise GenotypeError(f"{where}.{cell}_concat: {list(concat)} must be distinct nodes in 2..{n + 1}")
    if len(g.normal) != len(g.reduce):
        raise GenotypeError(f"{where}: normal and reduce cells have different node counts")
    return g


def from_dict(d: Mapping[str, Any], where: str = "genotype") -> Genotype:
    if not isinstance(d, Mapping):
        raise GenotypeError(f"{where}: expected a JSON object")
    missing = {"normal", "reduce"} - set(d)
    if missing:
        raise GenotypeError(f"{where}: missing field(s) {sorted(missing)}")
    unknown = set(d) - set(FIELDS)
    if unknown:
        raise GenotypeError(f"{where}: unknown field(s) {sorted(unknown)}")
    normal = _parse_edges(d["normal"], f"{where}.normal")
    reduce = _parse_edges(d["reduce"], f"{where}.reduce")
    def concat(key: str, n: int) -> Tuple[int, ...]:
        raw = d.get(key, list(range(2, n // 2 + 2)))
        if not isinstance(raw, (list, tuple)) or not all(isinstance(c, int) and not isinstance(c, bool) for c in raw):
            raise GenotypeError(f"{where}.{key}: expected a list of node indices")
        return tuple(raw)
    g = Genotype(normal, concat("normal_concat", len(normal)), reduce, concat("reduce_concat", len(reduce)))
    return validate(g, where)


def load(path_or_name: str, nodes: int | None = None) -> Genotype:
    """Load a genotype from a JSON file, or a published one by name (see :data:`PUBLISHED`)."""
    if path_or_name in PUBLISHED:
        g = PUBLISHED[path_or_name]
    else:
        if not os.path.isfile(path_or_name):
            raise GenotypeError(f"genotype {path_or_name!r}: no such file and not a published name "
                                f"(published: {', '.join(PUBLISHED)})")
        try:
            with open(path_or_name) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GenotypeError(f"genotype file {path_or_name}: invalid JSON ({e})") from None
        g = from_dict(data, where=f"genotype file {path_or_name}")
    return validate(g, f"genotype {path_or_name}", nodes=nodes)


def save(g: Genotype, path: str) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a genotype."""
    from .engine.io import atomic_write_text

    atomic_write_text(path, g.to_json() + "\n")


def _g(normal: List[Edge], reduce: List[Edge]) -> Genotype:
    return Genotype(tuple(normal), tuple(range(2, len(normal) // 2 + 2)),
                    tuple(reduce), tuple(range(2, len(reduce) // 2 + 2)))


# Published cells (data, copied from the authors' genotypes.py files).
PUBLISHED: Dict[str, Genotype] = {
    "DARTS_V1": _g(
        [("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
         ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
        [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
         ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)]),
    "DARTS_V2": _g(
        [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
         ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
         ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)]),
    "PC_DARTS_CIFAR": _g(
        [("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
         ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
        [("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
         ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)]),
    "PC_DARTS_IMAGENET": _g(
        [("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 0), ("skip_connect", 1),
         ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("dil_conv_5x5", 4)],
        [("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 1),
         ("sep_conv_3x3", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_3x3", 3)]),
}
PUBLISHED["DARTS"] = PUBLISHED["DARTS_V2"]
PUBLISHED["PC_DARTS"] = PUBLISHED["PC_DARTS_CIFAR"]
