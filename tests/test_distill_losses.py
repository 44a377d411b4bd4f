"""KD losses and the ECKD teacher gate against direct per-example computations of the papers' formulas.

Every reference below loops over the batch in plain Python (``math``) on ``.tolist()`` values and shares
nothing with the vectorised torch code under test.
"""

import math
from collections import namedtuple
from typing import List, Sequence

import pytest
import torch
from torch import nn

from recsys_kd.distill import (
    KDLossConfig,
    TeacherGate,
    detach_teacher,
    hard_label_bce,
    hint_loss,
    kd_loss,
    logit_mse,
    mean_teacher,
    soft_label_bce,
    weighted_teacher,
)

B, M, H_S, H_T = 5, 3, 4, 6
TOL = dict(rel_tol=1e-9, abs_tol=1e-12)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(target: float, prob: float) -> float:
    return -(target * math.log(prob) + (1.0 - target) * math.log(1.0 - prob))


def ref_hard(z_s: Sequence[float], y: Sequence[float]) -> float:
    return sum(_bce(y[b], _sig(z_s[b])) for b in range(len(z_s))) / len(z_s)


def ref_soft(z_s: Sequence[float], z_t: Sequence[float], tau: float) -> float:
    # ECKD eq. 8: L_CE(sigma(z_T / tau), sigma(z_S / tau)), target first, no tau^2
    return sum(_bce(_sig(z_t[b] / tau), _sig(z_s[b] / tau)) for b in range(len(z_s))) / len(z_s)


def ref_mse(z_s: Sequence[float], z_t: Sequence[float]) -> float:
    return sum((z_t[b] - z_s[b]) ** 2 for b in range(len(z_s))) / len(z_s)


def ref_hint(
    v_s: List[List[float]], v_t: List[List[float]], w: List[List[float]], bias: List[float]
) -> float:
    # ECKD eq. 9: || W v_T - v_S ||^2, W in R^{n x m} maps the teacher's m-vector to the student's n
    total = 0.0
    for b in range(len(v_s)):
        for i in range(len(v_s[b])):
            proj = sum(w[i][k] * v_t[b][k] for k in range(len(v_t[b]))) + bias[i]
            total += (proj - v_s[b][i]) ** 2
    return total / len(v_s)


def ref_gate(z: List[List[float]], w: Sequence[float], bias: Sequence[float]):
    # ECKD eq. 11 and the eq. 10 ensemble, one example at a time
    alphas, ensemble = [], []
    for row in z:
        scores = [w[i] * row[i] + bias[i] for i in range(len(row))]
        exps = [math.exp(s) for s in scores]
        alpha = [e / sum(exps) for e in exps]
        alphas.append(alpha)
        ensemble.append(sum(alpha[i] * row[i] for i in range(len(row))))
    return alphas, ensemble


def _logits(n: int = B) -> torch.Tensor:
    return 2.0 * torch.randn(n, dtype=torch.float64)


def _labels() -> torch.Tensor:
    return torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- losses


def test_hard_label_bce_matches_direct() -> None:
    z_s, y = _logits(), _labels()
    assert math.isclose(hard_label_bce(z_s, y).item(), ref_hard(z_s.tolist(), y.tolist()), **TOL)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.5])
def test_soft_label_bce_matches_eq8(tau: float) -> None:
    z_s, z_t = _logits(), _logits()
    got = soft_label_bce(z_s, z_t, tau).item()
    assert math.isclose(got, ref_soft(z_s.tolist(), z_t.tolist(), tau), **TOL)


def test_soft_label_bce_has_no_tau_squared_factor() -> None:
    tau = 3.0
    z_s, z_t = _logits().requires_grad_(), _logits()
    loss = soft_label_bce(z_s, z_t, tau)
    ref = ref_soft(z_s.tolist(), z_t.tolist(), tau)
    assert math.isclose(loss.item(), ref, **TOL)
    assert not math.isclose(loss.item(), tau * tau * ref, rel_tol=1e-3)
    # d/dz_S of eq. 8 (mean over B): (sigma(z_S/tau) - sigma(z_T/tau)) / (tau B); Hinton's would be x tau^2
    loss.backward()
    zs, zt = z_s.tolist(), z_t.tolist()
    for b in range(B):
        expected = (_sig(zs[b] / tau) - _sig(zt[b] / tau)) / (tau * B)
        assert math.isclose(z_s.grad[b].item(), expected, **TOL)


def test_soft_label_bce_minimum_is_teacher_entropy_at_matching_logits() -> None:
    z_t = _logits()
    tau = 2.0
    got = soft_label_bce(z_t.clone(), z_t, tau).item()
    entropy = sum(_bce(_sig(z / tau), _sig(z / tau)) for z in z_t.tolist()) / B
    assert math.isclose(got, entropy, **TOL) and got > 0


def test_logit_mse_matches_eq12() -> None:
    z_s, z_t = _logits(), _logits()
    assert math.isclose(logit_mse(z_s, z_t).item(), ref_mse(z_s.tolist(), z_t.tolist()), **TOL)


def test_hint_loss_projects_the_teacher_side_eq9() -> None:
    v_s = torch.randn(B, H_S, dtype=torch.float64)
    v_t = torch.randn(B, H_T, dtype=torch.float64)
    proj = nn.Linear(H_T, H_S).double()  # W in R^{n x m}: teacher (m = H_T) -> student (n = H_S)
    got = hint_loss(v_s, v_t, proj).item()
    ref = ref_hint(v_s.tolist(), v_t.tolist(), proj.weight.tolist(), proj.bias.tolist())
    assert math.isclose(got, ref, **TOL)
    with pytest.raises(ValueError):
        hint_loss(v_s, v_t, nn.Linear(H_T, H_S + 1).double())


def test_shape_mismatch_raises_instead_of_broadcasting() -> None:
    z_s = _logits()
    with pytest.raises(ValueError):
        logit_mse(z_s, z_s.unsqueeze(1))
    with pytest.raises(ValueError):
        soft_label_bce(z_s.unsqueeze(1), z_s.unsqueeze(1), 1.0)
    with pytest.raises(ValueError):
        soft_label_bce(z_s, z_s, 0.0)


def test_teacher_aggregation_helpers() -> None:
    z = torch.randn(B, M, dtype=torch.float64)
    rows = z.tolist()
    for b, got in enumerate(mean_teacher(z).tolist()):
        assert math.isclose(got, sum(rows[b]) / M, **TOL)
    w = [0.5, 0.3, 0.2]
    for b, got in enumerate(weighted_teacher(z, torch.tensor(w, dtype=torch.float64)).tolist()):
        assert math.isclose(got, sum(w[i] * rows[b][i] for i in range(M)), **TOL)
    with pytest.raises(ValueError):
        weighted_teacher(z, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError):
        weighted_teacher(z, torch.tensor([1.2, -0.1, -0.1]))
    with pytest.raises(ValueError):
        weighted_teacher(z, torch.tensor([0.5, 0.5]))


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(hard=-0.1),
        dict(soft=-1.0),
        dict(mse=float("nan")),
        dict(hint=float("inf")),
        dict(hard=0.0),  # every weight zero
        dict(temperature=0.0),
        dict(temperature=-2.0),
        dict(hard=True),
    ],
)
def test_config_rejects(kwargs) -> None:
    with pytest.raises(ValueError):
        KDLossConfig(**kwargs).validate()


def test_config_accepts_both_conventions() -> None:
    KDLossConfig(hard=0.5, soft=0.5, temperature=2.0).validate()  # ECKD, beta + gamma = 1
    KDLossConfig(hard=0.1, mse=921.6).validate()  # released KD-DAGFM code
    KDLossConfig(hard=0.0, hint=1e-4).validate()


# ---------------------------------------------------------------------------------------------- kd_loss


def test_kd_loss_total_is_weighted_sum_of_terms() -> None:
    cfg = KDLossConfig(hard=0.3, soft=0.7, mse=0.05, hint=1e-2, temperature=2.0)
    z_s, z_t, y = _logits(), _logits(), _labels()
    v_s = torch.randn(B, H_S, dtype=torch.float64)
    v_t = torch.randn(B, H_T, dtype=torch.float64)
    proj = nn.Linear(H_T, H_S, bias=False).double()
    out = kd_loss(cfg, z_s, y, z_t, hint_loss(v_s, v_t, proj))
    assert set(out) == {"hard", "soft", "mse", "hint", "distill", "total"}
    refs = {
        "hard": ref_hard(z_s.tolist(), y.tolist()),
        "soft": ref_soft(z_s.tolist(), z_t.tolist(), 2.0),
        "mse": ref_mse(z_s.tolist(), z_t.tolist()),
        "hint": ref_hint(v_s.tolist(), v_t.tolist(), proj.weight.tolist(), [0.0] * H_S),
    }
    for name, ref in refs.items():
        assert math.isclose(out[name].item(), ref, **TOL), name
    expected = 0.3 * refs["hard"] + 0.7 * refs["soft"] + 0.05 * refs["mse"] + 1e-2 * refs["hint"]
    assert math.isclose(out["total"].item(), expected, **TOL)
    from_terms = sum(getattr(cfg, k) * out[k].item() for k in ("hard", "soft", "mse", "hint"))
    assert math.isclose(out["total"].item(), from_terms, **TOL)
    distill = 0.7 * refs["soft"] + 0.05 * refs["mse"] + 1e-2 * refs["hint"]
    assert math.isclose(out["distill"].item(), distill, **TOL)


def test_kd_loss_zero_weight_terms_are_logged_but_not_trained() -> None:
    cfg = KDLossConfig(hard=0.1, mse=921.6)  # soft weight 0
    z_s = _logits().requires_grad_()
    out = kd_loss(cfg, z_s, _labels(), _logits())
    assert "hint" not in out
    assert not out["soft"].requires_grad and out["soft"].item() > 0
    assert math.isclose(out["total"].item(), 0.1 * out["hard"].item() + 921.6 * out["mse"].item(), **TOL)


def test_kd_loss_missing_hint_inputs_raise() -> None:
    with pytest.raises(ValueError, match="hint"):
        kd_loss(KDLossConfig(hint=1.0), _logits(), _labels(), _logits())
    with pytest.raises(ValueError):
        kd_loss(KDLossConfig(hard=-1.0), _logits(), _labels(), _logits())
    with pytest.raises(ValueError, match=r"\[B\]"):  # [B, M] teachers are aggregated first
        kd_loss(KDLossConfig(mse=1.0), _logits(), _labels(), torch.randn(B, M, dtype=torch.float64))


def test_kd_loss_of_several_teachers_mean_or_gate() -> None:
    z_s, y = _logits(), _labels()
    z_t = torch.randn(B, M, dtype=torch.float64)
    cfg = KDLossConfig(hard=0.0, mse=1.0)
    rows = z_t.tolist()
    avg = [sum(r) / M for r in rows]
    assert math.isclose(kd_loss(cfg, z_s, y, mean_teacher(z_t))["mse"].item(), ref_mse(z_s.tolist(), avg), **TOL)
    gate = TeacherGate(M).double()
    with torch.no_grad():
        gate.w.copy_(torch.tensor([0.7, -0.4, 1.3]))
        gate.b.copy_(torch.tensor([0.1, 0.0, -0.5]))
    _, ens = ref_gate(rows, gate.w.tolist(), gate.b.tolist())
    got = kd_loss(cfg, z_s, y, gate(z_t)[1])["mse"].item()
    assert math.isclose(got, ref_mse(z_s.tolist(), ens), **TOL)


# ---------------------------------------------------------------------------------------------- gate


def test_gate_matches_eq11_and_eq10() -> None:
    gate = TeacherGate(M).double()
    with torch.no_grad():
        gate.w.copy_(torch.tensor([0.5, -1.0, 2.0]))
        gate.b.copy_(torch.tensor([0.2, 0.3, -0.1]))
    z = 3.0 * torch.randn(B, M, dtype=torch.float64)
    alpha, ens = gate(z)
    assert alpha.shape == (B, M) and ens.shape == (B,)
    ref_alpha, ref_ens = ref_gate(z.tolist(), gate.w.tolist(), gate.b.tolist())
    for b in range(B):
        assert math.isclose(sum(alpha[b].tolist()), 1.0, **TOL)
        for i in range(M):
            assert math.isclose(alpha[b, i].item(), ref_alpha[b][i], **TOL)
        assert math.isclose(ens[b].item(), ref_ens[b], **TOL)
    # per-example: different rows get different weights
    assert not torch.allclose(alpha[0], alpha[1])


def test_gate_starts_as_the_teacher_mean_and_scripts() -> None:
    gate = TeacherGate(M)
    z = torch.randn(B, M)
    alpha, ens = gate(z)
    torch.testing.assert_close(alpha, torch.full((B, M), 1.0 / M))
    torch.testing.assert_close(ens, mean_teacher(z))
    scripted = torch.jit.script(gate)
    with torch.no_grad():
        gate.w.copy_(torch.tensor([0.5, -1.0, 2.0]))
    for a, b in zip(scripted(z), gate(z)):
        torch.testing.assert_close(a, b)
    with pytest.raises(Exception):
        scripted(torch.randn(B, M + 1))


# ---------------------------------------------------------------------------------------------- gradients


class _Net(nn.Module):
    """A tiny CTR model: features [B, 8] -> hidden [B, H] -> logit [B]."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.body = nn.Linear(8, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor):
        h = torch.tanh(self.body(x))
        return self.out(h).squeeze(1), h


def _no_grad(module: nn.Module) -> bool:
    return all(p.grad is None for p in module.parameters())


def _has_grad(module: nn.Module) -> bool:
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_cotrain_kd_loss_trains_student_gate_projection_not_teachers() -> None:
    x, y = torch.randn(B, 8), _labels().float()
    teachers = nn.ModuleList([_Net(H_T) for _ in range(M)])
    student, gate, proj = _Net(H_S), TeacherGate(M), nn.Linear(H_T, H_S)
    t_out = [t(x) for t in teachers]
    t_logits, t_hidden = detach_teacher((torch.stack([o[0] for o in t_out], dim=1), t_out[0][1]))  # [B, M], [B, H_T]
    z_s, v_s = student(x)
    cfg = KDLossConfig(hard=0.5, soft=0.5, mse=0.1, hint=1e-2, temperature=2.0)
    out = kd_loss(cfg, z_s, y, gate(t_logits)[1], hint_loss(v_s, t_hidden, proj))
    out["total"].backward()
    assert all(_no_grad(t) for t in teachers)
    assert _has_grad(student) and _has_grad(gate) and _has_grad(proj)
    # co-train: each teacher learns from its own label loss only (ECKD eq. 6)
    hard_label_bce(t_out[0][0], y).backward()
    assert _has_grad(teachers[0]) and _no_grad(teachers[1])


def test_primitives_need_detach_teacher_in_cotrain() -> None:
    x, y = torch.randn(B, 8), _labels().float()
    teacher, student, proj = _Net(H_T), _Net(H_S), nn.Linear(H_T, H_S)
    z_s, v_s = student(x)
    # negative control: the primitives do not detach, so the teacher would be trained
    z_t, v_t = teacher(x)
    (soft_label_bce(z_s, z_t, 2.0) + hint_loss(v_s, v_t, proj)).backward()
    assert _has_grad(teacher)
    teacher.zero_grad(set_to_none=True)
    student.zero_grad(set_to_none=True)
    z_s, v_s = student(x)
    z_t, v_t = detach_teacher(teacher(x))
    loss = hard_label_bce(z_s, y) + soft_label_bce(z_s, z_t, 2.0) + logit_mse(z_s, z_t)
    (loss + hint_loss(v_s, v_t, proj)).backward()
    assert _no_grad(teacher) and _has_grad(student) and _has_grad(proj)


def test_detach_teacher_keeps_structure() -> None:
    a = torch.ones(2, requires_grad=True)
    Out = namedtuple("Out", ["logits", "hidden"])
    got = detach_teacher({"x": (a * 2, [a * 3, None]), "n": Out(a * 4, 5)})
    assert not got["x"][0].requires_grad and not got["x"][1][0].requires_grad
    assert got["x"][1][1] is None and isinstance(got["x"], tuple) and isinstance(got["x"][1], list)
    assert isinstance(got["n"], Out) and not got["n"].logits.requires_grad and got["n"].hidden == 5
