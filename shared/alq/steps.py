"""The AMSGrad-based steps of ALQ (thesis §2.4.1-2.4.3), one quantised tensor at a time.

AMSGrad (Eq. 2.10) keeps first/second moments of the gradient; ALQ reads them as a quadratic
model of the loss around the current point (Eq. 2.12): g = a·m̂ (the step's linear term) and
the diagonal H = sqrt(v̂) (+ε). Every step below minimises that model under its domain:

- :func:`bases_step`  Alg. 2.4: bases by Eq. 2.21 (nearest codeword to ŵ - g/H), then the
  coordinates by the closed form Eq. 2.26;
- :func:`alpha_step`  Alg. 2.3: plain AMSGrad in the α domain (Eq. 2.23) with the gradient
  ∂ℓ/∂α = B ∂ℓ/∂ŵ (Eq. 2.16) and L2 on α;
- :func:`prune_scores`  Alg. 2.2 line 13: the loss increment of dropping α_i, Eq. 2.15.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared.alq.multibit import MultiBit, masked_lstsq, nearest_codes


@dataclass
class Moments:
    """AMSGrad moments of one tensor (shape of what they track)."""

    m: torch.Tensor
    v: torch.Tensor
    vmax: torch.Tensor
    t: int = 0

    @classmethod
    def like(cls, x: torch.Tensor) -> Moments:
        z = torch.zeros_like(x, dtype=torch.float32)
        return cls(z.clone(), z.clone(), z.clone())

    def update(self, grad: torch.Tensor, betas: tuple[float, float]) -> None:
        b1, b2 = betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        torch.maximum(self.vmax, self.v, out=self.vmax)

    def model(self, lr: float, betas: tuple[float, float], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, H) of the quadratic model Eq. 2.12: g = a·m̂, H = sqrt(v̂_max) + ε (bias-corrected)."""
        b1, b2 = betas
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.vmax / (1 - b2**self.t)
        return lr * m_hat, v_hat.sqrt() + eps


@dataclass
class StepConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lam: float = 1e-6  # λ of Eq. 2.26, relative to the mean diagonal of B^T H B
    alpha_decay: float = 0.0  # L2 on α (§2.4.3); 0 = off


@dataclass
class TensorState:
    """Everything ALQ carries for one quantised tensor."""

    mb: MultiBit
    w_moments: Moments = field(init=False)  # moments of ∂ℓ/∂ŵ, grouped (G, n)
    a_moments: Moments = field(init=False)  # moments of ∂ℓ/∂α (G, K)

    def __post_init__(self) -> None:
        self.w_moments = Moments.like(self.mb.grouped())
        self.a_moments = Moments.like(self.mb.alpha)


def bases_step(st: TensorState, grad_w: torch.Tensor, cfg: StepConfig) -> None:
    """Alg. 2.4 for one tensor; ``grad_w`` is ∂ℓ/∂ŵ grouped ``(G, n)``."""
    mb = st.mb
    st.w_moments.update(grad_w, cfg.betas)
    g, H = st.w_moments.model(cfg.lr, cfg.betas, cfg.eps)
    w_hat = mb.grouped()
    # Eq. 2.21: each weight's bits become the codeword nearest to its unconstrained step.
    B_new = nearest_codes(mb.alpha * mb.active, w_hat - g / H)
    B_new = torch.where(mb.active.unsqueeze(-1), B_new, torch.ones_like(B_new))
    # Eq. 2.26: α = (B^T H B + λI)^-1 B^T (H ŵ^q - g); λ scaled to H so it stays "small".
    lam = cfg.lam * float(H.mean()) * mb.group_size
    alpha = masked_lstsq(B_new, w_hat - g / H, mb.active, H=H, lam=lam)
    mb.B, mb.alpha = B_new, alpha
    mb.canonicalise()


def alpha_grad(mb: MultiBit, grad_w: torch.Tensor) -> torch.Tensor:
    """Eq. 2.16: ∂ℓ/∂α_g = B_g^T ∂ℓ/∂ŵ_g (zero for inactive coordinates)."""
    return torch.bmm(mb.B, grad_w.unsqueeze(-1)).squeeze(-1) * mb.active


def alpha_step(st: TensorState, grad_w: torch.Tensor, cfg: StepConfig) -> None:
    """Alg. 2.3 / Eq. 2.23 for one tensor: AMSGrad on α with L2 decay; bases unchanged."""
    mb = st.mb
    ga = alpha_grad(mb, grad_w) + cfg.alpha_decay * mb.alpha
    st.a_moments.update(ga, cfg.betas)
    g, H = st.a_moments.model(cfg.lr, cfg.betas, cfg.eps)
    mb.alpha = (mb.alpha - g / H) * mb.active
    mb.canonicalise()


def prune_scores(st: TensorState, grad_w: torch.Tensor, cfg: StepConfig) -> torch.Tensor:
    """Alg. 2.2 lines 10-13: update the α-domain moments with Eq. 2.16's gradient, then the
    loss increment of removing each α_i (Eq. 2.15), f = -g_i α_i + ½ H_ii α_i²; +inf where
    already inactive."""
    mb = st.mb
    st.a_moments.update(alpha_grad(mb, grad_w), cfg.betas)
    g, H = st.a_moments.model(cfg.lr, cfg.betas, cfg.eps)
    f = -g * mb.alpha + 0.5 * H * mb.alpha**2
    return torch.where(mb.active, f, torch.full_like(f, float("inf")))
