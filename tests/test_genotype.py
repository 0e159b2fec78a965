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
