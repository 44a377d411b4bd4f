r"""Knowledge-distillation losses for CTR students: ECKD (Zhu et al., CIKM 2020) and KD-DAGFM (Tian et al.,
WSDM 2023).

Everything here is a pure function of tensors (no I/O, no state). Logits are ``[B]``, one per example.
Every loss is a *mean* over the batch: ECKD's equation 5 writes the cross-entropy as a sum over examples,
KD-DAGFM's equations 12-13 as a mean; the mean keeps the loss weights independent of the batch size and
only rescales the learning rate relative to the sum.

Detaching the teacher: the primitives (:func:`soft_label_bce`, :func:`logit_mse`, :func:`hint_loss`,
:func:`mean_teacher`, :func:`weighted_teacher`) are the formulas and nothing else, so a gradient reaches
whatever their inputs depend on. That is what lets the ECKD teacher gate (``recsys_kd.distill.gating``)
learn through the distillation loss. In the co-train scheme (ECKD section 3.4.1: "the back-propagation of
the distillation loss is unidirectional so that the student model learns from the teacher, but not vice
versa") the *raw* teacher outputs must therefore be cut from the graph before they reach a primitive:
:func:`kd_loss` does this itself, and :func:`detach_teacher` does it for callers of the primitives.
"""

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


# The checks are calls fx records without running them (torch.fx.wrap): torchrec's train pipeline
# traces the task module to find its table lookups, and a traced tensor cannot steer control flow.
@torch.fx.wrap
def _check_logits(name: str, x: torch.Tensor) -> None:
    if x.dim() != 1:
        raise ValueError(f"{name} must be [B] logits, got shape {tuple(x.shape)}")


@torch.fx.wrap
def _check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    # [B] against [B, 1] would broadcast to [B, B] and give a silently wrong loss
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} differ in shape")


@torch.fx.wrap
def _check_hidden(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> None:
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError(
            f"hidden vectors must be [B, H], got student {tuple(student_hidden.shape)}, "
            f"teacher {tuple(teacher_hidden.shape)}"
        )


@torch.fx.wrap
def _check_teachers(teacher_logits: torch.Tensor) -> None:
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be [B, M], got shape {tuple(teacher_logits.shape)}")


@torch.fx.wrap
def _check_teacher_weights(teacher_logits: torch.Tensor, weights: torch.Tensor) -> None:
    _check_teachers(teacher_logits)
    if weights.shape != (teacher_logits.shape[1],):
        raise ValueError(f"weights must be [M={teacher_logits.shape[1]}], got shape {tuple(weights.shape)}")
    if bool((weights < 0).any()) or abs(float(weights.sum()) - 1.0) > 1e-5:
        raise ValueError(f"teacher weights must be >= 0 and sum to 1, got {weights.tolist()}")


def detach_teacher(outputs: Any) -> Any:
    """
    Cut teacher outputs from the autograd graph so that no loss computed from them trains the teacher
    (ECKD section 3.4.1, co-train scheme). Tensors are detached; tuples, lists and dicts are walked
    recursively; anything else (``None``, numbers) is returned unchanged.

    Args:
        outputs (Any): a tensor, or a (nested) tuple / list / dict of them, e.g. the
            ``(logits [B], hidden [B, H], fields [B, F, D])`` of ``CTRModel.forward_with_hidden``.

    Returns:
        Any: the same structure with every tensor detached.

    Example::

        t_logits, t_hidden, _ = detach_teacher(teacher.forward_with_hidden(dense, sparse))
    """
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, tuple):
        items = [detach_teacher(o) for o in outputs]
        # namedtuples are rebuilt from positional fields
        return type(outputs)(*items) if hasattr(outputs, "_fields") else tuple(items)
    if isinstance(outputs, list):
        return [detach_teacher(o) for o in outputs]
    if isinstance(outputs, dict):
        return {k: detach_teacher(v) for k, v in outputs.items()}
    return outputs


def hard_label_bce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""
    The CTR loss on the true labels, ECKD equations 5-6 / KD-DAGFM equation 13:

    .. math:: \mathcal{L}_{CE} = -\frac{1}{B} \sum_b \big[ y_b \log \sigma(z_{S,b})
        + (1 - y_b) \log(1 - \sigma(z_{S,b})) \big]

    Args:
        student_logits (torch.Tensor): :math:`z_S`, shape [B].
        labels (torch.Tensor): :math:`y \in \{0, 1\}` (any float in [0, 1] works), shape [B].

    Returns:
        torch.Tensor: scalar.

    Example::

        loss = hard_label_bce(torch.randn(4), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    """
    _check_logits("student_logits", student_logits)
    _check_same("student_logits", student_logits, "labels", labels)
    return F.binary_cross_entropy_with_logits(student_logits, labels.to(student_logits.dtype))


def soft_label_bce(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    r"""
    KD by soft labels, ECKD equation 8: the binary cross-entropy of equation 5 with the tempered teacher
    probability as the target and the tempered student probability as the prediction,

    .. math:: \mathcal{L}_{KD} = \mathcal{L}_{CE}\big(\sigma(z_T / \tau), \sigma(z_S / \tau)\big)
        = -\frac{1}{B} \sum_b \big[ p_b \log q_b + (1 - p_b) \log(1 - q_b) \big],
        \quad p = \sigma(z_T / \tau),\ q = \sigma(z_S / \tau)

    **No** :math:`\tau^2` factor: ECKD's equation 8 has none (Hinton et al. multiply the soft term by
    :math:`\tau^2` so that its gradient, which here is :math:`(q - p) / \tau` per example, keeps its scale
    as :math:`\tau` grows). Fold :math:`\tau^2` into the ``soft`` weight of :class:`KDLossConfig` to get
    Hinton's convention. The value is a cross-entropy, not a KL divergence: its minimum over the student is
    the teacher's binary entropy, not 0 (the gradient with respect to the student is the same).

    The teacher logits are used as given; detach them first unless a gradient is meant to reach them
    (the teacher gate's ensemble logit is the one case where it is).

    Args:
        student_logits (torch.Tensor): :math:`z_S`, shape [B].
        teacher_logits (torch.Tensor): :math:`z_T`, shape [B].
        temperature (float): :math:`\tau > 0`. Default: 1.

    Returns:
        torch.Tensor: scalar.

    Example::

        loss = soft_label_bce(torch.randn(4), torch.randn(4), temperature=2.0)
    """
    _check_logits("student_logits", student_logits)
    _check_same("student_logits", student_logits, "teacher_logits", teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    target = torch.sigmoid(teacher_logits / temperature)
    return F.binary_cross_entropy_with_logits(student_logits / temperature, target)


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    r"""
    KD-DAGFM equation 12, the mean squared difference of the logits:

    .. math:: \mathcal{L}_{KD} = \frac{1}{B} \sum_b \big( T(x_b) - S(x_b) \big)^2

    Args:
        student_logits (torch.Tensor): :math:`S(x)`, shape [B].
        teacher_logits (torch.Tensor): :math:`T(x)`, shape [B]; used as given (detach first).

    Returns:
        torch.Tensor: scalar.

    Example::

        loss = logit_mse(torch.randn(4), torch.randn(4))
    """
    _check_logits("student_logits", student_logits)
    _check_same("student_logits", student_logits, "teacher_logits", teacher_logits)
    return (teacher_logits - student_logits).square().mean()


def hint_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection: nn.Module
) -> torch.Tensor:
    r"""
    KD by hint regression, ECKD equation 9, averaged over the batch:

    .. math:: \mathcal{L}_{KD} = \frac{1}{B} \sum_b \big\| W \mathbf{v}_{T,b} - \mathbf{v}_{S,b} \big\|_2^2,
        \quad W \in \mathbb{R}^{n \times m},\ \mathbf{v}_T \in \mathbb{R}^m,\ \mathbf{v}_S \in \mathbb{R}^n

    As in the paper it is the *teacher's* hint that is projected into the student's space (FitNets instead
    puts the regressor on the student side). ``projection`` is :math:`W` (e.g. ``nn.Linear(m, n,
    bias=False)``); it is learned with the student, so put its parameters in the student's optimizer.
    Note that with the teacher side projected, :math:`W = 0,\ \mathbf{v}_S = 0` is a trivial minimiser;
    the paper pairs this term with a small weight (:math:`\beta \le 10^{-3}`, :math:`\gamma = 1`) and the
    label loss keeps :math:`\mathbf{v}_S` informative.

    Args:
        student_hidden (torch.Tensor): :math:`\mathbf{v}_S`, shape [B, n].
        teacher_hidden (torch.Tensor): :math:`\mathbf{v}_T`, shape [B, m]; used as given (detach first).
        projection (nn.Module): :math:`W`, ``[B, m] -> [B, n]``.

    Returns:
        torch.Tensor: scalar.

    Example::

        loss = hint_loss(torch.randn(4, 8), torch.randn(4, 16), nn.Linear(16, 8, bias=False))
    """
    _check_hidden(student_hidden, teacher_hidden)
    projected = projection(teacher_hidden)
    _check_same("projection(teacher_hidden)", projected, "student_hidden", student_hidden)
    return (projected - student_hidden).square().sum(dim=1).mean()


def mean_teacher(teacher_logits: torch.Tensor) -> torch.Tensor:
    r"""
    The plain ensemble of M teachers, the mean of their logits (ECKD equation 10 with
    :math:`\alpha_i = 1 / M`, the "without gating" baseline of section 4.6.1):

    .. math:: z_T = \frac{1}{M} \sum_{i=1}^M z_{T_i}

    Args:
        teacher_logits (torch.Tensor): shape [B, M].

    Returns:
        torch.Tensor: shape [B].

    Example::

        z = mean_teacher(torch.randn(4, 3))  # [4]
    """
    _check_teachers(teacher_logits)
    return teacher_logits.mean(dim=1)


def weighted_teacher(teacher_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    r"""
    ECKD equation 10 with fixed teacher weights: :math:`z_T = \sum_{i=1}^M \alpha_i z_{T_i}`, where
    :math:`\alpha_i \ge 0` and :math:`\sum_i \alpha_i = 1` (checked). For per-example learned weights use
    :class:`recsys_kd.distill.gating.TeacherGate`.

    Args:
        teacher_logits (torch.Tensor): shape [B, M].
        weights (torch.Tensor): :math:`\alpha`, shape [M].

    Returns:
        torch.Tensor: shape [B].

    Example::

        z = weighted_teacher(torch.randn(4, 3), torch.tensor([0.5, 0.3, 0.2]))  # [4]
    """
    _check_teacher_weights(teacher_logits, weights)
    return teacher_logits @ weights.to(teacher_logits.dtype)


@dataclass
class KDLossConfig:
    r"""
    Weights of the student loss. Each weight is named after its term, not after a paper's Greek letter,
    because the papers and the code disagree on the letters:

    - ``hard``: the label BCE. ECKD eq. 7 :math:`\gamma`; KD-DAGFM eq. 14 :math:`\beta`; the released
      KD-DAGFM code's ``alpha`` (0.1).
    - ``soft``: ECKD eq. 8 soft-label BCE. ECKD eq. 7 :math:`\beta` (soft-label KD; tuned in 0..1 with
      :math:`\beta + \gamma = 1`).
    - ``mse``: KD-DAGFM eq. 12 logit MSE. KD-DAGFM eq. 14 :math:`\alpha`; the released code's ``beta``
      (921.6). (RecBole's YAML comments swap the two; these names do not.)
    - ``hint``: ECKD eq. 9 hint regression. ECKD eq. 7 :math:`\beta` for hint KD (tuned in
      [0, 1e-3] with :math:`\gamma = 1`).
    - ``temperature``: :math:`\tau` of ECKD eq. 8 (tried in 1..15).

    .. math:: \mathcal{L} = w_{hard} \mathcal{L}_{CE} + w_{soft} \mathcal{L}_{soft}
        + w_{mse} \mathcal{L}_{MSE} + w_{hint} \mathcal{L}_{hint}

    Example::

        eckd = KDLossConfig(hard=0.5, soft=0.5, temperature=2.0)
        kd_dagfm_code = KDLossConfig(hard=0.1, mse=921.6)
    """

    hard: float = 1.0
    soft: float = 0.0
    mse: float = 0.0
    hint: float = 0.0
    temperature: float = 1.0

    def validate(self) -> "KDLossConfig":
        """Raise ``ValueError`` on a negative or non-finite weight, all weights zero, or ``temperature <= 0``.

        Returns:
            KDLossConfig: self, so that ``KDLossConfig(...).validate()`` chains.
        """
        weights = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "temperature"}
        for name, value in weights.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"KDLossConfig.{name} must be a number, got {value!r}")
            if not (0.0 <= float(value) < float("inf")):
                raise ValueError(f"KDLossConfig.{name} must be finite and >= 0, got {value}")
        if all(float(v) == 0.0 for v in weights.values()):
            raise ValueError(f"KDLossConfig: all loss weights are zero ({weights})")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 < float(t) < float("inf")):
            raise ValueError(f"KDLossConfig.temperature must be finite and > 0, got {t!r}")
        return self


def kd_loss(
    config: KDLossConfig,
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logit: torch.Tensor,
    hint: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    r"""
    The student loss of KD-DAGFM (eq. 14) and ECKD (eq. 7), with every term, for training and logging:

    .. math:: \mathcal{L} = w_{hard} \mathcal{L}_{CE}(y, \sigma(z_S))
        + \underbrace{w_{soft} \mathcal{L}_{CE}(\sigma(z_T/\tau), \sigma(z_S/\tau))
        + w_{mse} \overline{(z_T - z_S)^2} + w_{hint} \mathcal{L}_{hint}}_{\text{distill}}

    ``teacher_logit`` is the (aggregated) teacher :math:`z_T`, ``[B]``: raw teacher outputs must be
    detached by the caller (:func:`detach_teacher`) so the loss never trains a teacher (ECKD co-train
    scheme); an aggregate made by :class:`~recsys_kd.distill.gating.TeacherGate` keeps its graph, so
    the gate learns through the distillation terms. ``hint`` is the scalar hint-regression loss
    (:func:`hint_loss`, ECKD eq. 9, averaged over teachers by the caller), required when
    ``config.hint`` > 0.

    A term whose weight is 0 is returned detached, for logging only, and is left out of the sums (so
    it can neither train anything nor turn the total into NaN). ``distill`` is the weighted sum of the
    teacher terms alone: ECKD (section 3.4.2) stops early on it.

    Args:
        config (KDLossConfig): the weights and temperature; validated here.
        student_logits (torch.Tensor): :math:`z_S`, shape [B].
        labels (torch.Tensor): shape [B].
        teacher_logit (torch.Tensor): :math:`z_T`, shape [B].
        hint (Optional[torch.Tensor]): the hint-regression loss, a scalar.

    Returns:
        Dict[str, torch.Tensor]: scalars ``hard``, ``soft``, ``mse``, ``hint`` (when given),
        ``distill`` and ``total``.

    Example::

        z_t = mean_teacher(detach_teacher(teacher_logits))  # [B, M] -> [B]
        out = kd_loss(KDLossConfig(hard=0.5, soft=0.5, temperature=2.0), z_s, y, z_t)
        out["total"].backward()
    """
    config.validate()
    _check_logits("teacher_logit", teacher_logit)
    terms: Dict[str, torch.Tensor] = {
        "hard": hard_label_bce(student_logits, labels),
        "soft": soft_label_bce(student_logits, teacher_logit, config.temperature),
        "mse": logit_mse(student_logits, teacher_logit),
    }
    if hint is not None:
        terms["hint"] = hint
    elif config.hint > 0:
        raise ValueError("KDLossConfig.hint > 0 needs the hint term (teacher hint vectors and a projection)")
    weights = {"hard": config.hard, "soft": config.soft, "mse": config.mse, "hint": config.hint}
    weighted = {name: float(weights[name]) * value for name, value in terms.items() if weights[name] > 0}
    out = {name: value if weights[name] > 0 else value.detach() for name, value in terms.items()}
    teacher_terms = [weighted[name] for name in ("soft", "mse", "hint") if name in weighted]
    out["distill"] = torch.stack(teacher_terms).sum() if teacher_terms else student_logits.new_zeros(())
    out["total"] = weighted["hard"] + out["distill"] if "hard" in weighted else out["distill"]
    return out
