"""The toy's diffusion: SD's noise schedule on a 2D Gaussian mixture whose score is known exactly.

Everything a Stable Diffusion script does to latents happens here to 2D points, so the methods can be
checked against closed forms. Names mirror redif.py / dmdr.py (`ddim_step_with_logprob`,
`trailing_timesteps`). Everything is float64 on CPU.
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPE = torch.float64
NUM_TRAIN_TIMESTEPS = 1000


def sd_alphas_cumprod(beta_start=0.00085, beta_end=0.012, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """abar_t of SD's "scaled_linear" schedule, exactly as diffusers builds it."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(DTYPE)


def trailing_timesteps(num_steps, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """Evenly spaced "trailing" grid t_1 > ... > t_K (K=5: 999, 799, 599, 399, 199; K=4: 999, 749, 499, 249)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    grid = torch.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps, dtype=torch.float64)
    return (grid.round() - 1).long()


def _abar(alphas_cumprod, t):
    """abar at integer timesteps t (int or LongTensor); t < 0 means "after the last step": SD's final
    alpha, alphas_cumprod[0] (diffusers' DDIM with set_alpha_to_one=False, as SD ships it)."""
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    return torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], alphas_cumprod[0])


def _expand(v, like):
    """(B,) or scalar -> broadcastable against `like` (B, ...)."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim())) if v.dim() > 0 else v


def ddim_step_with_logprob(eps, t, t_prev, sample, alphas_cumprod, eta=1.0, prev_sample=None, generator=None):
    """One DDIM step as a Gaussian policy (E1) with the log-density of the taken action (E2).

    eps, sample: (B, ...); t, t_prev: int or (B,) LongTensor, t_prev < 0 for the last step.
    Returns prev_sample (B, ...), log_prob (B,), mean (B, ...), std (broadcastable to (B, ...)).
    log_prob is the Gaussian log-density averaged over the non-batch dimensions (as in DDPO), so the
    PPO/GRPO clip range does not depend on the latent size. With eta = 0 (std = 0) the step is
    deterministic and log_prob is defined as 0.
    """
    abar_t = _expand(_abar(alphas_cumprod, t).to(sample.dtype), sample)
    abar_prev = _expand(_abar(alphas_cumprod, t_prev).to(sample.dtype), sample)
    x0_hat = (sample - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    # E1: sigma_k = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    std = eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()
    mean = abar_prev.sqrt() * x0_hat + (1 - abar_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype, device=sample.device)
        prev_sample = mean + std * noise
    # E2: log N(a | mean, std^2 I), averaged over dimensions; 0 where the step is deterministic
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * safe_std**2)
        - torch.log(safe_std)
        - 0.5 * math.log(2 * math.pi)
    )
    log_prob = torch.where(std > 0, log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob.mean(dim=tuple(range(1, sample.dim()))), mean, std


def x0_from_eps(sample, eps, abar_t):
    """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar_t = _expand(abar_t, sample)
    return (sample - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def add_noise(x0, noise, abar_t):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (the forward process)."""
    abar_t = _expand(abar_t, x0)
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise


# ---------------------------------------------------------------------------------------------------
# Data: a 2D Gaussian mixture, label = mode ("the prompt"), with exact eps of p_t at every t
# ---------------------------------------------------------------------------------------------------
@dataclass
class MixtureConfig:
    num_modes: int = 8
    radius: float = 2.0
    std_along: float = 0.25  # each mode is stretched along the circle ...
    std_across: float = 0.06  # ... and thin across it (anisotropic, so the score is not isotropic)
    seed: int = 0  # mixture weights are drawn from it (non-uniform, so coverage is a real test)


class GaussianMixture:
    """p_0 = sum_m w_m N(m_m, S_m). Under the VP forward process p_t is again a mixture:
    N(sqrt(abar) m_m, abar S_m + (1 - abar) I), so its score and epsilon are exact.

    Labels 0..M-1 select one mode (the conditional p_t(x | c) is a single Gaussian); label M is the
    null label (unconditional), so classifier-free guidance is exact too.
    """

    def __init__(self, cfg=MixtureConfig(), weights=None, means=None, covs=None):
        g = torch.Generator().manual_seed(cfg.seed)
        m = cfg.num_modes
        if means is None:
            angles = 2 * math.pi * torch.arange(m, dtype=DTYPE) / m
            means = cfg.radius * torch.stack([angles.cos(), angles.sin()], -1)
            tangent = torch.stack([-angles.sin(), angles.cos()], -1)
            normal = torch.stack([angles.cos(), angles.sin()], -1)
            rot = torch.stack([tangent, normal], -1)  # columns: along, across
            diag = torch.diag(torch.tensor([cfg.std_along**2, cfg.std_across**2], dtype=DTYPE))
            covs = rot @ diag @ rot.transpose(-1, -2)
        if weights is None:
            weights = 0.5 + torch.rand(m, generator=g, dtype=DTYPE)
        self.weights = torch.as_tensor(weights, dtype=DTYPE) / torch.as_tensor(weights, dtype=DTYPE).sum()
        self.means = torch.as_tensor(means, dtype=DTYPE)  # (M, 2)
        self.covs = torch.as_tensor(covs, dtype=DTYPE)  # (M, 2, 2)
        self.num_modes = len(self.weights)
        self.null_label = self.num_modes
        self._eigvals, self._rot = torch.linalg.eigh(self.covs)  # (M, 2), (M, 2, 2): columns = eigenvectors

    def sample(self, n, labels=None, generator=None):
        """Exact samples of p_0 (labels drawn from the weights unless given). Returns x (n, 2), labels (n,)."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)[labels]
        z = torch.randn(n, 2, generator=generator, dtype=DTYPE)
        return self.means[labels] + (chol @ z.unsqueeze(-1)).squeeze(-1), labels

    def _log_weights(self, batch, labels):
        """log w_m, restricted to the label's component where a (non-null) label is given: (B, M)."""
        log_w = self.weights.log().expand(batch, -1)
        if labels is None:
            return log_w
        labels = torch.as_tensor(labels).expand(batch)
        keep = F.one_hot(labels.clamp(max=self.num_modes - 1), self.num_modes).bool()
        keep = keep | (labels >= self.num_modes).unsqueeze(-1)  # the null label keeps every component
        log_w = torch.where(keep, log_w, torch.full_like(log_w, -math.inf))
        return log_w - torch.logsumexp(log_w, -1, keepdim=True)

    def _rotated(self, x, abar):
        """Each component of p_t in its own eigenbasis: cov_m(t) = R_m diag(abar lam_m + 1 - abar) R_m^T.
        Returns diff (B, M, 2) = R_m^T (x - sqrt(abar) m_m), variances (B, M, 2). Elementwise, no inverses."""
        abar = torch.as_tensor(abar, dtype=DTYPE).expand(x.shape[0]).reshape(-1, 1, 1)
        diff = x.to(DTYPE).unsqueeze(1) - abar.sqrt() * self.means
        return torch.einsum("bmi,mij->bmj", diff, self._rot), abar * self._eigvals + (1 - abar)

    def _log_components(self, diff, var):
        return -0.5 * (diff**2 / var).sum(-1) - 0.5 * var.log().sum(-1) - math.log(2 * math.pi)

    def score(self, x, abar, labels=None):
        """Exact grad_x log p_t(x | label) for x (B, 2), abar (B,) or scalar; label M or None = unconditional."""
        diff, var = self._rotated(x, abar)
        resp = torch.softmax(self._log_weights(x.shape[0], labels) + self._log_components(diff, var), -1)
        comp_score = -torch.einsum("bmj,mij->bmi", diff / var, self._rot)  # -cov^-1 (x - mean), (B, M, 2)
        return (resp.unsqueeze(-1) * comp_score).sum(1)

    def log_prob(self, x, abar, labels=None):
        """Exact log p_t(x | label); tests check `score` against its autograd."""
        diff, var = self._rotated(x, abar)
        return torch.logsumexp(self._log_weights(x.shape[0], labels) + self._log_components(diff, var), -1)

    def eps(self, x, t, labels=None, alphas_cumprod=None):
        """Exact epsilon of p_t: eps = -sqrt(1 - abar_t) * score."""
        alphas_cumprod = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        abar = _abar(alphas_cumprod, torch.as_tensor(t).expand(x.shape[0]))
        return -(1 - abar).sqrt().unsqueeze(-1) * self.score(x, abar, labels)

    def guided_eps(self, x, t, labels, guidance, alphas_cumprod=None):
        """CFG with exact scores: eps = eps_u + w (eps_c - eps_u)."""
        eps_u = self.eps(x, t, None, alphas_cumprod)
        if guidance == 1.0:
            return self.eps(x, t, labels, alphas_cumprod)
        return eps_u + guidance * (self.eps(x, t, labels, alphas_cumprod) - eps_u)

    def mode_of(self, x):
        """Index of the most likely component of p_0 for each point (for coverage and per-label checks)."""
        diff, var = self._rotated(x, 1.0)
        return (self.weights.log() + self._log_components(diff, var)).argmax(-1)


# ---------------------------------------------------------------------------------------------------
# Samplers and the student network
# ---------------------------------------------------------------------------------------------------
def ddim_sample(eps_fn, x_T, timesteps, alphas_cumprod, eta=0.0, generator=None, return_trajectory=False):
    """Run DDIM on `timesteps` (descending), eps_fn(x, t) -> eps. Returns x after the last step
    (and the trajectory [x_{t_1}, ..., x_final] (K+1, B, 2) if asked)."""
    x, traj = x_T, [x_T]
    for k, t in enumerate(timesteps.tolist()):
        t_prev = timesteps[k + 1].item() if k + 1 < len(timesteps) else -1
        x, _, _, _ = ddim_step_with_logprob(eps_fn(x, t), t, t_prev, x, alphas_cumprod, eta, generator=generator)
        traj.append(x)
    return (x, torch.stack(traj)) if return_trajectory else x


def timestep_embedding(t, dim=64):
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim), as in SD's UNet."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=DTYPE) / half)
    args = torch.as_tensor(t, dtype=DTYPE).reshape(-1, 1) * freqs
    return torch.cat([args.cos(), args.sin()], -1)


class EpsMLP(nn.Module):
    """epsilon_theta(x_t, t, label): the toy's "UNet". Label M is the null (unconditional) label.
    The weights are float32 (2-3x faster on CPU than float64); inputs and outputs are float64 like the rest
    of the toy, so the exact math around the network keeps its precision."""

    def __init__(self, num_labels, hidden=128, emb=64):
        super().__init__()
        self.emb = emb
        self.label_emb = nn.Embedding(num_labels + 1, emb)
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * emb, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x, t, labels):
        t = torch.as_tensor(t).expand(x.shape[0])
        h = torch.cat([x.float(), timestep_embedding(t, self.emb).float(), self.label_emb(labels)], -1)
        return self.net(h).to(x.dtype)


def guided(model, x, t, labels, guidance, null_label):
    """The network's CFG epsilon (one batched forward for both branches)."""
    if guidance == 1.0:
        return model(x, t, labels)
    t = torch.as_tensor(t).expand(x.shape[0])
    eps_u, eps_c = model(
        torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.full_like(labels, null_label), labels])
    ).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


_PRETRAINED = {}


def pretrain_student(data, steps=2000, batch=512, lr=2e-3, p_uncond=0.1, seed=0, hidden=128):
    """Cached: every method of a benchmark or test session starts from the same weights, trained once.
    Returns a fresh copy, so callers may fine-tune it in place."""
    key = (data.weights.numpy().tobytes(), data.means.numpy().tobytes(), data.covs.numpy().tobytes(),
           steps, batch, lr, p_uncond, seed, hidden)
    if key not in _PRETRAINED:
        _PRETRAINED[key] = _fit_exact_eps(data, steps, batch, lr, p_uncond, seed, hidden)
    return copy.deepcopy(_PRETRAINED[key])


def _fit_exact_eps(data, steps, batch, lr, p_uncond, seed, hidden):
    """The analogue of "the student starts from the teacher's weights": fit EpsMLP to the exact epsilon of
    p_t (denoising score matching with the exact target, so the minimiser is the same and the variance
    lower), dropping the label 10% of the time so the network also knows the unconditional epsilon."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = EpsMLP(data.num_modes, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    ac = sd_alphas_cumprod()
    for _ in range(steps):
        x0, labels = data.sample(batch, generator=g)
        labels = torch.where(torch.rand(batch, generator=g) < p_uncond, data.null_label, labels)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=g)
        x_t = add_noise(x0, torch.randn(batch, 2, generator=g, dtype=DTYPE), ac[t])
        target = data.eps(x_t, t, labels, ac)
        loss = F.mse_loss(model(x_t, t, labels), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


TEACHER_STEPS = 50
TEACHER_GUIDANCE = 2.0  # our choice for the toy: enough guidance to matter, not so much that modes leave the data


def teacher_sample(data, x_T, labels, guidance=TEACHER_GUIDANCE, steps=TEACHER_STEPS, return_trajectory=False):
    """The frozen teacher: exact CFG epsilon run with `steps`-step DDIM, eta 0 (deterministic given x_T)."""
    ac = sd_alphas_cumprod()
    return ddim_sample(lambda x, t: data.guided_eps(x, t, labels, guidance, ac), x_T,
                       trailing_timesteps(steps), ac, eta=0.0, return_trajectory=return_trajectory)


@torch.no_grad()
def student_sample(model, x_T, labels, steps, guidance=TEACHER_GUIDANCE, eta=0.0, generator=None):
    """A K-step DDIM student (eta 0 at inference: deterministic)."""
    null = model.label_emb.num_embeddings - 1
    return ddim_sample(lambda x, t: guided(model, x, t, labels, guidance, null), x_T,
                       trailing_timesteps(steps), sd_alphas_cumprod(), eta=eta, generator=generator)
