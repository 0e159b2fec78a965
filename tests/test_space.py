"""Search space: cells, supernet, arch weights, genotype derivation, fx tracing."""
import types

import pytest
import torch
import torch.nn.functional as F

from dsrna_dist.config import DARTS_PRIMITIVES, SupernetConfig
from dsrna_dist.space.cells import MixedOp, PartialMixedOp, SearchCell, channel_shuffle
from dsrna_dist.space.ops import build_op
from dsrna_dist.space.supernet import Supernet, derive_genotype, normalize_edges, reduction_layers

torch.set_num_threads(1)
PRIMS = list(DARTS_PRIMITIVES)


def info(c=3, size=8, k=10):
    return types.SimpleNamespace(name="t", in_channels=c, image_size=size, num_classes=k,
                                 mean=(0.5,) * c, std=(0.25,) * c)


def tiny(**kw):
    base = dict(init_channels=4, layers=3, nodes=2)
    base.update(kw)
    return SupernetConfig(**base)


@pytest.mark.parametrize("c,size,nodes", [(1, 28, 3), (3, 32, 4)])
def test_supernet_shapes_and_reductions(c, size, nodes):
    torch.manual_seed(0)
    m = Supernet(SupernetConfig(init_channels=4, layers=5, nodes=nodes), info(c, size, 7))
    assert [cell.reduction for cell in m.cells] == [i in (1, 3) for i in range(5)]
    assert reduction_layers(8) == (2, 5)  # DARTS: layers // 3 and 2 * layers // 3
    out = m(torch.rand(2, c, size, size))
    assert out.shape == (2, 7)
    e = sum(2 + i for i in range(nodes))
    assert m.alphas_normal.shape == (e, len(PRIMS)) and m.alphas_reduce.shape == (e, len(PRIMS))
    arch, weights = {id(p) for p in m.arch_parameters()}, {id(p) for p in m.weight_parameters()}
    assert not arch & weights and arch | weights == {id(p) for p in m.parameters()}
    assert isinstance(m.normalize, torch.nn.Module) and list(m.children())[0] is m.normalize


def test_mixed_op_skips_none_but_equals_full_weighted_sum():
    torch.manual_seed(0)
    for stride in (1, 2):
        mixed = MixedOp(4, stride, PRIMS)
        assert len(mixed.ops) == len(PRIMS) - 1  # the zero op is never built
        x = torch.randn(2, 4, 8, 8)
        w = torch.randn(len(PRIMS))  # arbitrary, not softmaxed: catches index mix-ups
        built = iter(mixed.ops)
        ref = 0
        for k, name in enumerate(PRIMS):  # the reference computes the zero op too
            op = build_op("none", 4, stride, False) if name == "none" else next(built)
            ref = ref + w[k] * op(x)
        torch.testing.assert_close(mixed(x, w), ref)


def test_channel_shuffle_matches_explicit_permutation():
    x = torch.arange(2 * 12 * 2 * 2, dtype=torch.float32).reshape(2, 12, 2, 2)
    g, cg = 4, 3
    perm = [gi * cg + i for i in range(cg) for gi in range(g)]  # out channel i*g+gi <- in gi*cg+i
    torch.testing.assert_close(channel_shuffle(x, g), x[:, perm])


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_mixed_op(stride):
    torch.manual_seed(0)
    op = PartialMixedOp(8, stride, PRIMS, k=4)
    x = torch.randn(2, 8, 8, 8)
    w = torch.softmax(torch.randn(len(PRIMS)), -1)
    part = op.mixed(x[:, :2], w)
    rest = x[:, 2:] if stride == 1 else F.max_pool2d(x[:, 2:], 2, 2)
    joined = torch.cat([part, rest], 1)
    perm = [g * 2 + i for i in range(2) for g in range(4)]
    torch.testing.assert_close(op(x, w), joined[:, perm])
    with pytest.raises(ValueError, match="divisible"):
        PartialMixedOp(6, 1, PRIMS, k=4)


def test_edge_normalization_and_genotype_weights():
    torch.manual_seed(0)
    m = Supernet(tiny(nodes=3, partial_channels=2, edge_normalization=True), info())
    with torch.no_grad():
        m.betas_normal.copy_(torch.randn_like(m.betas_normal))
        m.alphas_normal.copy_(torch.randn_like(m.alphas_normal))
    b = m.betas_normal.detach()
    ref = torch.cat([torch.softmax(b[0:2], 0), torch.softmax(b[2:5], 0), torch.softmax(b[5:9], 0)])
    torch.testing.assert_close(normalize_edges(b, 3), ref)
    gw = m.genotype_weights()["normal"]
    torch.testing.assert_close(gw, torch.softmax(m.alphas_normal.detach(), -1) * ref[:, None])


def reference_parse(weights, primitives, nodes):
    """Independent re-statement of the DARTS reference ``_parse`` (lists, explicit loops)."""
    none = primitives.index("none")
    gene, start, n = [], 0, 2
    for i in range(nodes):
        W = weights[start:start + n]
        edges = sorted(range(i + 2), key=lambda x: -max(W[x][k] for k in range(len(W[x])) if k != none))[:2]
        for j in edges:
            k_best = None
            for k in range(len(W[j])):
                if k != none and (k_best is None or W[j][k] > W[j][k_best]):
                    k_best = k
            gene.append((primitives[k_best], j))
        start += n
        n += 1
    return gene


def test_derive_matches_reference_parse_on_random_weights():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        nodes = 3 + trial % 2
        e = sum(2 + i for i in range(nodes))
        normal = torch.softmax(torch.randn(e, len(PRIMS), generator=g) * 3, -1)
        reduce = torch.softmax(torch.randn(e, len(PRIMS), generator=g) * 3, -1)
        geno = derive_genotype(normal, reduce, PRIMS, nodes)
        assert list(geno.normal) == reference_parse(normal.tolist(), PRIMS, nodes)
        assert list(geno.reduce) == reference_parse(reduce.tolist(), PRIMS, nodes)
        assert geno.normal_concat == tuple(range(2, nodes + 2))


def test_derive_ignores_none_and_caps_skips():
    e = 9  # 3 nodes
    w = torch.full((e, len(PRIMS)), 0.01)
    w[:, PRIMS.index("none")] = 0.9  # strongest everywhere, never chosen
    w[:, PRIMS.index("skip_connect")] = torch.linspace(0.5, 0.1, e)  # skip dominates every edge
    w[:, PRIMS.index("sep_conv_3x3")] = 0.05
    g = derive_genotype(w, w, PRIMS, 3)
    assert all(op == "skip_connect" for op, _ in g.normal)
    capped = derive_genotype(w, w, PRIMS, 3, max_skip=2)
    skips = [(i, src) for i, (op, src) in enumerate(capped.normal) if op == "skip_connect"]
    assert len(skips) == 2
    # the two survivors are the strongest skips: node 2's edges (rows 0, 1 have the largest weights)
    assert sorted(src for i, src in skips) == [0, 1] and all(i < 2 for i, _ in skips)
    assert all(op == "sep_conv_3x3" for op, _ in capped.normal[2:])
    assert all(op == "skip_connect" for op, _ in capped.reduce)  # the cap is for the normal cell


@pytest.mark.parametrize("pc", [1, 2])
def test_fx_trace_and_arch_weight_override(pc):
    torch.manual_seed(0)
    m = Supernet(tiny(partial_channels=pc, edge_normalization=pc > 1), info())
    x = torch.rand(3, 3, 8, 8)
    gm = torch.fx.symbolic_trace(m)
    torch.testing.assert_close(gm(x), m(x))
    # an override equal to arch_weights() is the same network; a different one is not
    same = {k: v.detach().clone() for k, v in m.arch_weights().items()}
    torch.testing.assert_close(m(x, same), m(x))
    other = dict(same)
    other["normal"] = torch.softmax(torch.randn_like(same["normal"]) * 5, -1)
    assert not torch.allclose(m(x, other), m(x))
    # with a detached override alpha gets no gradient; with the default it does
    m(x, same).sum().backward()
    assert all(p.grad is None for p in m.arch_parameters())
    m(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.arch_parameters())


def test_channels_last_same_function():
    torch.manual_seed(0)
    m = Supernet(tiny(), info())
    x = torch.rand(2, 3, 8, 8)
    ref = m(x)
    m = m.to(memory_format=torch.channels_last)
    torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), ref,
                               rtol=1e-4, atol=1e-5)


def test_bad_space_configs():
    with pytest.raises(Exception, match="model.primitives"):
        Supernet(tiny(primitives=("none", "conv_9x9")), info())
    with pytest.raises(ValueError, match="halved"):
        Supernet(tiny(), info(size=9))


def test_search_cell_edge_count_and_concat():
    cell = SearchCell(3, 6, 6, 4, reduction=True, reduction_prev=False, primitives=PRIMS)
    assert len(cell.edges) == 2 + 3 + 4
    out = cell(torch.randn(2, 6, 8, 8), torch.randn(2, 6, 8, 8), torch.softmax(torch.randn(9, 8), -1))
    assert out.shape == (2, 3 * 4, 4, 4)


@pytest.mark.parametrize("k,p", [(3, 2), (5, 4)])
@pytest.mark.parametrize("size", [7, 8, 28])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_subsampled_conv_equals_native_strided_dilated_conv(k, p, size, layout):
    """The rewrite of the stride-2 dil_conv: same output (bit-identical in the contiguous layout,
    to rounding in channels_last, whose kernels differ), same gradients (to float summation
    order), same state-dict, on odd and even maps."""
    from torch import nn

    from dsrna_dist.space.layers import SubsampledConv2d
    torch.manual_seed(0)
    ref = nn.Conv2d(6, 6, k, stride=2, padding=p, dilation=2, groups=6, bias=True)
    sub = SubsampledConv2d(6, 6, k, stride=2, padding=p, dilation=2, groups=6, bias=True)
    sub.load_state_dict(ref.state_dict())
    x = torch.randn(5, 6, size, size).contiguous(memory_format=layout)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ref(xa), sub(xb)
    assert ya.shape == yb.shape
    if layout == torch.contiguous_format:
        assert torch.equal(ya, yb)
    _same_outputs_and_grads(ref, sub, xa, xb, ya, yb)
    torch.testing.assert_close(sub.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


def _same_outputs_and_grads(ref, sub, xa, xb, ya, yb) -> None:
    """The rewrite's output, input gradient and weight gradient match the native conv's."""
    torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sub.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cin,cout", [(2, 1), (4, 2), (8, 4)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_subsampled_1x1_conv_equals_native_stride2(cin, cout, layout):
    """FactorizedReduce's 1x1 stride-2 convs as subsample-then-1x1: same output and gradients as
    the native conv (reference in the contiguous layout: in channels_last its backward corrupts
    the heap on an AVX2 CPU with few channels, torch 2.14.1), on the offset slice it reads."""
    from torch import nn

    from dsrna_dist.space.layers import SubsampledConv2d
    torch.manual_seed(0)
    ref = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
    sub = SubsampledConv2d(cin, cout, 1, stride=2, bias=False).to(memory_format=layout)
    sub.load_state_dict(ref.state_dict())
    for _ in range(5):  # repeated: the native kernel's corruption showed after a few calls
        x = torch.randn(8, cin, 8, 8)
        xa = x.clone().requires_grad_(True)
        xb = x.clone().contiguous(memory_format=layout).requires_grad_(True)
        ref.zero_grad()
        sub.zero_grad()
        _same_outputs_and_grads(ref, sub, xa, xb, ref(xa[:, :, 1:, 1:]), sub(xb[:, :, 1:, 1:]))


def test_subsampled_conv_is_used_only_where_exact():
    from torch import nn

    from dsrna_dist.space.layers import SubsampledConv2d
    convs = lambda op: [type(m) for m in op.modules() if isinstance(m, nn.Conv2d)]  # noqa: E731
    assert SubsampledConv2d in convs(build_op("dil_conv_3x3", 4, 2, True))
    assert SubsampledConv2d in convs(build_op("dil_conv_5x5", 4, 2, False))
    assert SubsampledConv2d not in convs(build_op("dil_conv_3x3", 4, 1, True))  # stride 1: native
    assert SubsampledConv2d not in convs(build_op("sep_conv_3x3", 4, 2, True))  # dilation 1: not exact
    assert set(convs(build_op("skip_connect", 4, 2, True))) == {SubsampledConv2d}  # FactorizedReduce: 1x1
    assert not SubsampledConv2d.applies(1, 2, 1, 1)  # a padded 1x1 reads the border: not rewritten
    with pytest.raises(ValueError, match="SubsampledConv2d"):
        SubsampledConv2d(2, 2, 3, stride=2, padding=1, dilation=2)  # not "same" padding: output size differs
