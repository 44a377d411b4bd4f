"""Interaction layers against direct loop implementations of their papers' formulas.

Each reference below is written with explicit loops over fields / pairs / heads / layers, straight from
the formula in the layer's docstring, and shares nothing with the vectorised code under test.
"""

import math
import warnings
from typing import Callable, List

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchrec.modules import crossnet as trc
from torchrec.modules.deepfm import FactorizationMachine

from recsys_kd.models.layers import (
    CIN,
    DAGFM,
    FM,
    MLP,
    BilinearInteraction,
    CrossNet,
    CrossNetV2,
    FmFM,
    FwFM,
    InteractingLayer,
    LowRankCrossNet,
    LowRankMixtureCrossNet,
    SENETLayer,
)

B, F, D = 3, 5, 4
N = F * D
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _x() -> torch.Tensor:
    return torch.randn(B, F, D)


def _randomize(module: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """Random values for every parameter, so zero biases or identity inits hide nothing."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def _pairs() -> List[tuple]:
    return [(i, j) for i in range(F) for j in range(i + 1, F)]


# ---------------------------------------------------------------- FM family


def test_fm_is_sum_of_pairwise_inner_products() -> None:
    x = _x()
    expected = sum((x[:, i] * x[:, j]).sum(1) for i, j in _pairs()).unsqueeze(1)
    torch.testing.assert_close(FM(F, D)(x), expected, **TOL)


def test_torchrec_factorization_machine_is_not_rendle_fm() -> None:
    # why FM is our own: torchrec's squares the sum over all F*D scalars, mixing embedding dimensions
    x = _x()
    assert not torch.allclose(FactorizationMachine()([x]), FM(F, D)(x), atol=1e-3)


def test_fwfm_weights_each_pair() -> None:
    x = _x()
    fwfm = _randomize(FwFM(F, D))
    expected = sum(fwfm.r[p] * (x[:, i] * x[:, j]).sum(1) for p, (i, j) in enumerate(_pairs()))
    torch.testing.assert_close(fwfm(x), expected.unsqueeze(1), **TOL)


def test_fmfm_matrix_per_pair_and_identity_start() -> None:
    x = _x()
    torch.testing.assert_close(FmFM(F, D)(x), FM(F, D)(x), **TOL)
    fmfm = _randomize(FmFM(F, D))
    expected = sum(((x[:, i] @ fmfm.M[p]) * x[:, j]).sum(1) for p, (i, j) in enumerate(_pairs()))
    torch.testing.assert_close(fmfm(x), expected.unsqueeze(1), **TOL)


# ---------------------------------------------------------------- cross networks


def _cross_v1_reference(x0: torch.Tensor, ws: List[torch.Tensor], bs: List[torch.Tensor]) -> torch.Tensor:
    xl = x0
    for w, b in zip(ws, bs):  # w: [N], b: [N]
        xl = x0 * (xl @ w).unsqueeze(1) + b + xl
    return xl


def _cross_v2_reference(x0: torch.Tensor, Ws: List[torch.Tensor], bs: List[torch.Tensor]) -> torch.Tensor:
    xl = x0
    for W, b in zip(Ws, bs):  # W: [N, N]
        xl = x0 * (torch.stack([W @ xl[n] for n in range(B)]) + b) + xl
    return xl


def _mixture_reference(
    x0: torch.Tensor, net: LowRankMixtureCrossNet, g: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    xl = x0
    k = net._num_experts
    for layer in range(net._num_layers):
        U, C, V = net.U_kernels[layer], net.C_kernels[layer], net.V_kernels[layer]
        b = net.bias[layer][:, 0]
        experts = [x0 * (g(g(xl @ V[i].T) @ C[i].T) @ U[i].T + b) for i in range(k)]
        if k == 1:
            xl = experts[0] + xl
            continue
        logits = torch.stack([net.gates[i].weight[0] @ xl.T for i in range(k)], dim=1)  # [B, K]
        gate = torch.softmax(logits, dim=1)
        xl = sum(gate[:, i : i + 1] * experts[i] for i in range(k)) + xl
    return xl


def _check_cross(net: torch.nn.Module, base: type, expected: torch.Tensor, x0: torch.Tensor) -> None:
    torch.testing.assert_close(net(x0), expected, **TOL)
    # torchrec's own forward computes the paper formula too, and ours equals it
    torch.testing.assert_close(base.forward(net, x0), expected, **TOL)


def test_crossnet_v1_is_dcn() -> None:
    x0 = torch.randn(B, N)
    net = _randomize(CrossNet(N, 3))
    expected = _cross_v1_reference(x0, [w[:, 0] for w in net.kernels], [b[:, 0] for b in net.bias])
    _check_cross(net, trc.VectorCrossNet, expected, x0)


def test_crossnet_v2_full_rank() -> None:
    x0 = torch.randn(B, N)
    net = _randomize(CrossNetV2(N, 3), std=0.2)
    expected = _cross_v2_reference(x0, list(net.kernels), [b[:, 0] for b in net.bias])
    _check_cross(net, trc.CrossNet, expected, x0)


def test_crossnet_v2_low_rank() -> None:
    x0 = torch.randn(B, N)
    net = _randomize(LowRankCrossNet(N, 3, low_rank=3))
    # W_l = U_l V_l^T, with torchrec's W_kernels = U [N, r] and V_kernels = V^T [r, N]
    Ws = [u @ v for u, v in zip(net.W_kernels, net.V_kernels)]
    expected = _cross_v2_reference(x0, Ws, list(net.bias))
    _check_cross(net, trc.LowRankCrossNet, expected, x0)


@pytest.mark.parametrize("num_experts", [1, 3])
def test_crossnet_v2_mixture_of_low_rank_experts(num_experts: int) -> None:
    x0 = torch.randn(B, N)
    net = _randomize(LowRankMixtureCrossNet(N, 2, num_experts=num_experts, low_rank=3))
    expected = _mixture_reference(x0, net, torch.relu)
    _check_cross(net, trc.LowRankMixtureCrossNet, expected, x0)


# ---------------------------------------------------------------- CIN


@pytest.mark.parametrize("layer_sizes,split_half", [((4, 3), False), ((4, 6, 3), True)])
def test_cin(layer_sizes: tuple, split_half: bool) -> None:
    x = _x()
    cin = CIN(F, D, layer_sizes, split_half=split_half)
    outputs = []
    prev = [x[:, j] for j in range(F)]  # X^0 as a list of [B, D] rows
    for k, (h_k, conv) in enumerate(zip(layer_sizes, cin.convs)):
        W = conv.weight[:, :, 0].view(h_k, len(prev), F)
        layer = [
            sum(W[h, i, j] * prev[i] * x[:, j] for i in range(len(prev)) for j in range(F))
            for h in range(h_k)
        ]
        to_next, to_output = layer, layer
        if split_half and k < len(layer_sizes) - 1:
            to_next, to_output = layer[: h_k // 2], layer[h_k // 2 :]
        outputs += [m.sum(1) for m in to_output]
        prev = to_next
    expected = torch.stack(outputs, dim=1)
    assert cin.output_dim == expected.shape[1]
    torch.testing.assert_close(cin(x), expected, **TOL)


def test_cin_split_half_needs_even_sizes() -> None:
    with pytest.raises(ValueError):
        CIN(F, D, (3, 4), split_half=True)


# ---------------------------------------------------------------- AutoInt


@pytest.mark.parametrize("use_residual,use_scale", [(True, False), (False, True)])
def test_interacting_layer(use_residual: bool, use_scale: bool) -> None:
    x = _x()
    heads, a = 2, 3
    layer = InteractingLayer(D, a, heads, F, use_residual=use_residual, use_scale=use_scale)
    W_q, W_k, W_v = layer.qkv.weight.view(3, heads, a, D).unbind(0)  # per head: [a, D]
    out = torch.zeros(B, F, heads * a)
    for h in range(heads):
        for i in range(F):
            q_i = x[:, i] @ W_q[h].T
            logits = torch.stack([(q_i * (x[:, j] @ W_k[h].T)).sum(1) for j in range(F)], dim=1)
            if use_scale:
                logits = logits / math.sqrt(a)
            attn = torch.softmax(logits, dim=1)
            out[:, i, h * a : (h + 1) * a] = sum(attn[:, j : j + 1] * (x[:, j] @ W_v[h].T) for j in range(F))
    if use_residual:
        out = out + torch.stack([x[:, i] @ layer.residual.weight.T for i in range(F)], dim=1)
    torch.testing.assert_close(layer(x), torch.relu(out), **TOL)


# ---------------------------------------------------------------- FiBiNet


def test_senet() -> None:
    x = _x()
    senet = _randomize(SENETLayer(F, D, reduction_ratio=2))
    W1, W2 = senet.excitation[0].weight, senet.excitation[2].weight  # [F/r, F], [F, F/r]
    z = torch.stack([x[:, f].mean(1) for f in range(F)], dim=1)
    a = torch.relu(torch.relu(z @ W1.T) @ W2.T)
    expected = torch.stack([x[:, f] * a[:, f : f + 1] for f in range(F)], dim=1)
    torch.testing.assert_close(senet(x), expected, **TOL)


@pytest.mark.parametrize("bilinear_type", ["field_all", "field_each", "field_interaction"])
def test_bilinear(bilinear_type: str) -> None:
    x = _x()
    bilinear = BilinearInteraction(F, D, bilinear_type)
    W = bilinear.weight
    products = []
    for p, (i, j) in enumerate(_pairs()):
        if bilinear_type == "field_all":
            W_ij = W
        elif bilinear_type == "field_each":
            W_ij = W[i]
        else:
            W_ij = W[p]
        products.append((x[:, i] @ W_ij) * x[:, j])
    expected = torch.stack(products, dim=1)
    torch.testing.assert_close(bilinear(x), expected, **TOL)


def test_bilinear_rejects_unknown_type() -> None:
    with pytest.raises(ValueError):
        BilinearInteraction(F, D, "field_pair")


# ---------------------------------------------------------------- DAGFM


def _dagfm_reference(dagfm: DAGFM, x: torch.Tensor) -> torch.Tensor:
    """The propagation of shared/papers/README.md, one field and one edge at a time."""
    C = dagfm.connection
    h0 = [sum(C[s, f] * x[:, f] for f in range(F)) for s in range(F)]
    h = h0
    pooled = [hs.sum(1) for hs in h0]
    for layer in range(dagfm._num_layers):
        p = dagfm.p[layer]
        if dagfm._outer:
            q = dagfm.q[layer]
            h = [
                h0[s] * sum((h[f] @ p[f, s]).unsqueeze(1) * q[f, s] for f in range(s + 1))
                for s in range(F)
            ]
        else:
            h = [h0[s] * sum(p[f, s] * h[f] for f in range(s + 1)) for s in range(F)]
        pooled += [hs.sum(1) for hs in h]
    return dagfm.linear(torch.stack(pooled, dim=1))


@pytest.mark.parametrize("interaction", ["inner", "outer"])
def test_dagfm_matches_propagation(interaction: str) -> None:
    x = _x()
    dagfm = _randomize(DAGFM(F, D, num_layers=3, interaction=interaction))
    torch.testing.assert_close(dagfm(x), _dagfm_reference(dagfm, x), **TOL)


@pytest.mark.parametrize("interaction", ["inner", "outer"])
def test_dagfm_edges_only_go_from_lower_to_higher_fields(interaction: str) -> None:
    x = _x()
    dagfm = _randomize(DAGFM(F, D, num_layers=2, interaction=interaction))
    before = dagfm(x)
    edge_params = list(dagfm.p) + list(dagfm.q)
    with torch.no_grad():
        for param in edge_params:
            param[3, 1] += 10.0  # edge 3 -> 1 goes backwards: masked out
    torch.testing.assert_close(dagfm(x), before, atol=0.0, rtol=0.0)
    with torch.no_grad():
        dagfm.p[0][1, 3] += 10.0  # edge 1 -> 3 exists
    assert not torch.allclose(dagfm(x), before)


def test_dagfm_initialisation() -> None:
    dagfm = DAGFM(39, 16, num_layers=3, interaction="outer")
    torch.testing.assert_close(dagfm.connection, torch.eye(39))
    # Xavier-normal with gain 1.414 on [F, F, D], as in the reference code
    std = torch.stack(list(dagfm.p) + list(dagfm.q)).std().item()
    assert std == pytest.approx(1.414 / math.sqrt(39 * 16), rel=0.05)


# ---------------------------------------------------------------- MLP


def test_mlp_eval_forward() -> None:
    x = torch.randn(B, N)
    mlp = MLP(N, [6, 5, 1], activation="tanh", dropout=0.5, batch_norm=True, activation_on_last=False)
    _randomize(mlp)
    bns = [m for m in mlp.layers if isinstance(m, torch.nn.BatchNorm1d)]
    for bn in bns:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    mlp.eval()
    linears = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
    h = x
    for i, lin in enumerate(linears):
        h = h @ lin.weight.T + lin.bias
        if i < len(bns):
            bn = bns[i]
            h = torch.tanh((h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
    torch.testing.assert_close(mlp(x), h, **TOL)


# ---------------------------------------------------------------- TorchScript and FLOPs


def _all_layers() -> List[tuple]:
    flat = torch.randn(B, N)
    return [
        (FM(F, D), _x()),
        (FwFM(F, D), _x()),
        (FmFM(F, D), _x()),
        (CrossNet(N, 2), flat),
        (CrossNetV2(N, 2), flat),
        (LowRankCrossNet(N, 2, low_rank=3), flat),
        (LowRankMixtureCrossNet(N, 2, num_experts=1, low_rank=3), flat),
        (LowRankMixtureCrossNet(N, 2, num_experts=3, low_rank=3), flat),
        (CIN(F, D, (4, 6, 3), split_half=True), _x()),
        (InteractingLayer(D, 3, 2, F, use_scale=True), _x()),
        (SENETLayer(F, D), _x()),
        (BilinearInteraction(F, D, "field_all"), _x()),
        (BilinearInteraction(F, D, "field_each"), _x()),
        (BilinearInteraction(F, D, "field_interaction"), _x()),
        (DAGFM(F, D, 2, "inner"), _x()),
        (DAGFM(F, D, 2, "outer"), _x()),
        (MLP(N, [6, 1], dropout=0.1, batch_norm=True, activation_on_last=False), flat),
    ]


def _name(case: tuple) -> str:
    return type(case[0]).__name__


@pytest.mark.parametrize("layer,x", _all_layers(), ids=[_name(c) for c in _all_layers()])
def test_scripts(layer: torch.nn.Module, x: torch.Tensor) -> None:
    layer.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit itself is deprecated in 2.13
        scripted = torch.jit.script(layer)
    torch.testing.assert_close(scripted(x), layer(x), **TOL)


def test_flops_hand_counts() -> None:
    # FM, F=5, D=4: sum over fields 20 + square 4; squares 20 + their sum 20; subtract 4, sum 4, halve 1
    assert FM(5, 4).flops_per_example() == 24 + 40 + 9
    # CrossNetV2, N=20, 3 layers: W x 2*20*20, + b 20, * x0 20, + x_l 20
    assert CrossNetV2(20, 3).flops_per_example() == 3 * (800 + 60)
    # CIN, F=5, D=4, layers (4, 3): per layer outer products H_in*F*D, compression 2*H*H_in*F*D,
    # pooling H*D
    assert CIN(5, 4, (4, 3)).flops_per_example() == (100 + 800 + 16) + (80 + 480 + 12)
    # DAGFM, F=5, D=4, L=3: connection 2*F*F*D = 200; per layer 200 (inner) or 400 (outer) + h0 * 20;
    # pooling 4 * 20; Linear(20, 1) 2*20 + 1
    assert DAGFM(5, 4, 3, "inner").flops_per_example() == 200 + 3 * 220 + 80 + 41
    assert DAGFM(5, 4, 3, "outer").flops_per_example() == 200 + 3 * 420 + 80 + 41
    # MLP 20 -> 8 -> 1 without activation on the last: 2*20*8 + 8 + relu 8; 2*8 + 1
    assert MLP(20, [8, 1], activation_on_last=False).flops_per_example() == 336 + 17


@pytest.mark.parametrize("layer,x", _all_layers(), ids=[_name(c) for c in _all_layers()])
def test_flops_cover_matrix_products(layer: torch.nn.Module, x: torch.Tensor) -> None:
    # torch counts only matrix products (and not CPU attention), so it is a lower bound on our count
    with FlopCounterMode(display=False) as counter:
        layer.eval()(x)
    counted = counter.get_total_flops() / x.shape[0]
    assert counted <= layer.flops_per_example()

