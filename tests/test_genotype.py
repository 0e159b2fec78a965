"""Genotypes are validated JSON data; published cells load by name."""
import json

import pytest

from dsrna_dist import genotype as G
from dsrna_dist.registry import Registry, RegistryError


def test_published_round_trip(tmp_path):
    for name, g in G.PUBLISHED.items():
        p = tmp_path / f"{name}.json"
        G.save(g, str(p))
        assert G.load(str(p)) == g
        assert G.load(name) == g
        assert g.nodes == 4


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["normal"].__setitem__(0, ["conv_9x9", 0]), "unknown op 'conv_9x9'"),
    (lambda d: d["normal"].__setitem__(0, ["none", 0]), "unknown op 'none'"),
    (lambda d: d["normal"].__setitem__(2, ["sep_conv_3x3", 3]), "input 3 invalid for node 3"),
    (lambda d: d["reduce"].pop(), "needs 2 edges per node"),
    (lambda d: d.__setitem__("normal_concat", [2, 9]), "normal_concat"),
    (lambda d: d.__setitem__("extra", 1), "unknown field"),
    (lambda d: d["normal"].__setitem__(1, ["sep_conv_3x3", "1"]), "expected [op_name, input_index]"),
])
def test_invalid_genotypes_are_refused(tmp_path, mutate, needle):
    d = G.PUBLISHED["DARTS_V2"].to_dict()
    mutate(d)
    p = tmp_path / "g.json"
    p.write_text(json.dumps(d))
    with pytest.raises(G.GenotypeError) as e:
        G.load(str(p))
    assert needle in str(e.value) and str(p) in str(e.value)


def test_node_count_mismatch_and_missing_file(tmp_path):
    with pytest.raises(G.GenotypeError, match="expects 3"):
        G.load("DARTS_V2", nodes=3)
    with pytest.raises(G.GenotypeError, match="no such file"):
        G.load(str(tmp_path / "missing.json"))
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(G.GenotypeError, match="invalid JSON"):
        G.load(str(p))


def test_registry_errors_list_valid_names():
    r: Registry = Registry("widget")
    r.register("a", 1)
    r.register("b")(2)
    assert r.get("b") == 2 and sorted(r) == ["a", "b"]
    with pytest.raises(RegistryError, match="unknown widget 'c' \\(config key x.name\\); valid: a, b"):
        r.get("c", key="x.name")
    with pytest.raises(RegistryError, match="duplicate"):
        r.register("a", 3)


def test_param_free_ops_counts_weightless_edges():
    # DARTS_V2 (Liu et al. 2019): normal cell 5 sep_conv_3x3, 2 skip_connect, 1 dil_conv_3x3;
    # reduction cell 4 max_pool_3x3 and 4 skip_connect
    assert G.PUBLISHED["DARTS_V2"].param_free_ops() == (2, 8)
    for g in G.PUBLISHED.values():  # an independent rule: an op has no weights iff pool / skip
        want = tuple(sum(("pool" in op or op == "skip_connect") for op, _ in cell) for cell in (g.normal, g.reduce))
        assert g.param_free_ops() == want


def test_cell_replication_tables(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    darts, pc = G.PUBLISHED["DARTS_V2"], G.PUBLISHED["PC_DARTS"]
    for label, runs in {"a": {"x_s0": darts, "x_s1": darts, "base_s0": pc, "base_s1": pc, "base_s2": darts},
                        "b": {"base_s0": darts, "base_s1": pc}}.items():
        for name, g in runs.items():
            (tmp_path / label / name).mkdir(parents=True)
            G.save(g, str(tmp_path / label / name / "genotype.json"))
    r = subprocess.run([sys.executable, str(root / "bench" / "cell_replication.py"), f"a={tmp_path / 'a'}",
                        f"b={tmp_path / 'b'}", "--baseline", "base", "--methods", "x"],
                       capture_output=True, text=True, check=True)
    n_darts, n_pc = sum(darts.param_free_ops()), sum(pc.param_free_ops())
    assert n_darts != n_pc
    mean_base_a = (2 * n_pc + n_darts) / 3
    assert f"| x | {n_darts:.1f} ± 0.0 (n=2) | - |" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("| x | ") and "Welch" in line)
    # set b has no run of x: its cell is "-" and the pooled test is set a's alone
    assert row.count(f"{n_darts - mean_base_a:+.2f}") == 2 and "| - |" in row
