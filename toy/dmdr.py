"""Toy DMD / DMDR: distribution matching distillation with an RL branch, on the exact 2D mixture.

The SD script dmdr.py does the same to latents. Here the real score is the exact (optionally CFG) epsilon of
the data, the fake score is the exact conditional epsilon plus a small trainable MLP delta initialised to zero
(the analogue of "teacher + LoRA"), and the generator is an EpsMLP started from `pretrain_student` (the
analogue of "the student starts from the teacher's weights"). Order follows METHOD.md sections 5-6: the
losses (E8, E9), the cold-start schedules (E10, E11), the reward and RL losses (E12), the fake and real
scores, the generator's sampler, the loop.

Choices where the papers are silent (ours):
- real_guidance defaults to 1.0 (no CFG): with CFG w the real x0 estimate at high noise is about
  m_c + (w - 1)(m_c - E[x0]), i.e. off the data (the toy's over-saturation), and DMD follows it: after the
  default 600 iterations at K = 1, SW2 to the data is 0.16 at w = 1, 0.54 at w = 1.5, 0.94 at w = 2 (the
  teacher's).
- The RL branch scores the generator's final output (its last step, the earlier ones without grad, as ReFL
  does), while DMD trains a random step (backward simulation). Rewarding every step's x0 estimate let the
  blurry early estimates climb the reward while the final samples did not.
- GRPO / DPO make that last step a Gaussian policy: DDIM with eta = 1 to "after the last step" (E1, E2);
  GRPO groups and DPO pairs share label and state and differ only in that step's noise. DPO's reference is
  the generator as RL switches on (after the cold start).
- The fake score learns from the trained step's x0, as DMD2's backward simulation and DMDR's SDXL code feed
  theirs: a mix of every step's outputs. toy/fake_study.py measures what that costs at K >= 2, with a
  fitted-Gaussian oracle (`fake = "gaussian"`), `fake_samples = "final"`, and our fix, a fake told the step
  (`fake_per_step`). The defaults stay the papers'.
- The fake delta is sqrt(abar_t) * MLP (see FakeScore.delta), its Adam has beta1 = 0, and each fresh generator
  sample enters the fake loss at fake_draws (t, noise) pairs: without these the fake jittered or lagged,
  and the generator wandered with it.
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from toy.diffusion import (
    DTYPE, add_noise, ddim_step_with_logprob, sd_alphas_cumprod, timestep_embedding,
    trailing_timesteps, x0_from_eps,
)
from toy.redif import clipped_surrogate, grpo_advantages  # E4, E5: shared with ReDiF


@dataclass
class ToyDMDRConfig:
    steps: int = 4  # K generator steps (trailing grid: 999, 749, 499, 249)
    rl: str = "none"  # RL branch (E12): none | refl | dpo | grpo
    use_dmd: bool = True  # False with rl="refl": "RL only" (no distillation, no fake score)
    rl_weight: float = None  # lambda_rl of E12; None: RL_WEIGHTS[rl]
    rl_start: int = 300  # cold start: RL switches on at this iteration (ignored when use_dmd=False)
    iters: int = 600  # generator updates
    fake_updates: int = 5  # fake-score updates per generator update (DMDR: 5; DMD2 SD1.5: 10)
    real_guidance: float = 1.0  # CFG w_real of the real score (1.0: none; see the module docstring)
    dynadg: bool = True  # E10
    dynars: bool = True  # E11 (False: uniform renoise times)
    lambda0: float = 0.75  # E10, official demo
    total_steps: int = 150  # S of E10/E11 (official demo: 10k steps, RL from 20k)
    a0: float = 4.0  # E11, official demo
    b0: float = 1.5
    lr: float = 1e-5  # generator (Adam; DMD2's SD1.5 value: its x0 at t=999 is 15x its eps, so keep it small)
    fake_lr: float = 1e-3  # fake-score delta (Adam, beta1 = 0: momentum would only add lag to a moving target)
    fake_draws: int = 8  # (t, noise) draws per fresh generator sample in the fake loss: less jitter, cheaply
    batch: int = 128
    group_size: int = 8  # GRPO group (G samples sharing label and state); DPO always uses pairs
    grpo_clip: float = 1e-4  # E5 clip range (one on-policy update per rollout, so the ratio stays 1)
    dpo_beta: float = 0.05  # Diffusion-DPO beta on the per-step log-ratio (E2 scale: averaged over dims)
    max_grad_norm: float = 10.0  # DMD2's clipping
    fake_hidden: int = 64
    fake: str = "learned"  # learned: FakeScore (the method) | gaussian: GaussianFake, a diagnostic oracle
    fake_samples: str = "step"  # the fake learns from: step = the trained step's x0 (DMD2, DMDR) | final = x0 at K
    fake_per_step: bool = False  # ours, not the papers': the fake also gets the step k, so each step's x0 meets
    # the score of that step's own outputs, not of all steps' mixed (toy/fake_study.py)


# Our choice: the largest weights that kept DMDR's SW2 to the data within ~1.3x DMD's at K = 2, 4, 8 while
# the reward rose (the official demo's lambda_rl = 0.05 is "about the size of the DMD loss"; E12). The
# log-prob gradients of GRPO / DPO are ~1 / std ~ 30x the reward's. At K = 1 the gain is smaller (ReFL:
# +0.04); 0.12 there gives +0.08 at the same SW2. Much more and DMD can no longer hold the generator: its
# normalised gradient (E8) stops growing once x is off the data, the reward's never does (K = 2, 0.12:
# SW2 doubled).
RL_WEIGHTS = {"none": 0.0, "refl": 0.06, "dpo": 0.1, "grpo": 0.003}


# ---------------------------------------------------------------------------------------------------
# DMD losses (E8, E9) and the cold-start schedules (E10, E11): pure functions, shared with dmdr.py
# ---------------------------------------------------------------------------------------------------
def dmd_loss(x, x0_real, x0_fake):
    """E8. x: generator output (B, ...) with grad; x0_real, x0_fake: the two scores' x0 estimates at the
    renoised x. d loss / d x = g / numel, so a descent step moves x toward x0_real and away from x0_fake."""
    dims = tuple(range(1, x.dim()))
    p_real = x - x0_real
    p_fake = x - x0_fake
    g = (p_real - p_fake) / (p_real.abs().mean(dim=dims, keepdim=True) + 1e-8)  # E8: per sample (+ 1e-8: official)
    g = torch.nan_to_num(g)
    return 0.5 * F.mse_loss(x, (x - g).detach())


def fake_score_loss(eps_pred, noise):
    """E9: the ordinary epsilon loss of the fake score on (detached) generator samples."""
    return F.mse_loss(eps_pred, noise)


def dynadg_scale(step, lambda0=0.75, total_steps=10000):
    """E10: lambda_r(s) = lambda0 * 0.5 * (1 + cos(pi s / S)) for s < S, then 0."""
    return lambda0 * 0.5 * (1 + math.cos(math.pi * step / total_steps)) if step < total_steps else 0.0


def dynars_beta(step, a0=4.0, b0=1.5, total_steps=10000):
    """E11: Beta(a(s), b(s)) of the renoise time; (a0, b0) at s = 0 (high noise), (1, 1) from s = S on."""
    c = 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0))) if total_steps > 0 else 0.0
    return 1 + (a0 - 1) * c, 1 + (b0 - 1) * c


def sample_renoise_timesteps(batch_size, step, a0=4.0, b0=1.5, total_steps=10000, t_min=20, t_max=980,
                             generator=None, dynamic=True):
    """E11: t = round(t_min + u (t_max - t_min)), u ~ Beta(a(s), b(s)) (dynamic=False: uniform). -> (B,) long."""
    a, b = dynars_beta(step, a0, b0, total_steps) if dynamic else (1.0, 1.0)
    beta = torch.distributions.Beta(torch.tensor(float(a)), torch.tensor(float(b)))
    if generator is None:
        u = beta.sample((batch_size,))
    else:  # Beta takes no generator: draw a seed from it and sample under a forked global RNG
        seed = torch.randint(2**62, (1,), generator=generator).item()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # = torch.manual_seed for CPU draws, minus CUDA's
            u = beta.sample((batch_size,))
    return (t_min + u * (t_max - t_min)).round().long()


# ---------------------------------------------------------------------------------------------------
# Reward (E12) and the RL losses
# ---------------------------------------------------------------------------------------------------
def toy_reward(x):
    """The toy's differentiable "aesthetic score": height, R(x) = y. (B, 2) -> (B,).

    It prefers part of the data (the upper modes, and the upper end of every mode) and is unbounded: a
    generator that only climbs it leaves the data upward (reward hacking); one that must also match the data
    (DMD) can only move a little way up. The teacher's reward is about sum_c w_c E[y | c] = 0.14."""
    return x[..., 1]


def dpo_loss(log_prob, ref_log_prob, beta):
    """Diffusion-DPO on pairs, toy form. log_prob, ref_log_prob: (P, 2), column 0 the winner.

    Diffusion-DPO bounds the intractable chain likelihood with the forward process; the generator's x0
    step is an explicit Gaussian policy (E1, E2), so we use its exact log-ratio to the reference:
    -log sigmoid(beta [(log pi - log pi_ref)(x_w) - (log pi - log pi_ref)(x_l)])."""
    ratio = log_prob - ref_log_prob  # (P, 2)
    return -F.logsigmoid(beta * (ratio[:, 0] - ratio[:, 1])).mean()


# ---------------------------------------------------------------------------------------------------
# Fake score ("teacher + LoRA") and real score (teacher with CFG, plus DynaDG)
# ---------------------------------------------------------------------------------------------------
class FakeScore(nn.Module):
    """eps_fake(x_t, t, c) = exact conditional eps of the data + delta_phi(x_t, t, c), delta_phi(.) = 0 at init.

    Conditional on the label, no CFG (as DMD2's fake UNet gets the prompt): it must model the generator's
    p_fake(x | c), which is what the generator's conditional output is matched against. With steps > 1 it is
    conditional on the generator's step k too (fake_per_step): one embedding per (label, k)."""

    def __init__(self, data, hidden=64, emb=32, lora_scale=2.0, steps=1):
        super().__init__()
        self.data, self.emb = data, emb
        self.lora_scale = lora_scale  # the delta plays DMDR's fake LoRA at its scale 2.0 (alpha/r): DynaDG's units
        self.label_emb = nn.Embedding((data.num_modes + 1) * steps, emb)
        self.net = nn.Sequential(nn.Linear(2 + 2 * emb, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[-1].weight)  # zero delta: the fake score starts as the teacher (LoRA's B = 0)
        nn.init.zeros_(self.net[-1].bias)
        self.to(DTYPE)

    def delta(self, x, t, labels, alphas_cumprod, step=0):
        """sqrt(abar_t) * net: the x0 correction it implies, -sqrt(1 - abar_t) * net, is O(net) at every t.
        A plain eps delta learns large corrections at low t that leak to high t, where x0_from_eps
        amplifies them up to 1 / sqrt(abar_999) ~ 15x: the fake's x0 went 10 units off and DMD diverged."""
        t = torch.as_tensor(t).expand(x.shape[0])
        label_step = labels + (self.data.num_modes + 1) * step  # step: int or (B,)
        out = self.net(torch.cat([x, timestep_embedding(t, self.emb), self.label_emb(label_step)], -1))
        return alphas_cumprod[t].sqrt().unsqueeze(-1) * out

    def forward(self, x, t, labels, alphas_cumprod, step=0):
        return self.data.eps(x, t, labels, alphas_cumprod) + self.delta(x, t, labels, alphas_cumprod, step)


class GaussianFake:
    """A diagnostic stand-in for FakeScore, not the method: the exact eps of per-label Gaussians fitted to the
    latest generator samples. Each label's output of this toy's generator is close to one Gaussian, so this is
    about the best fake score there is, without FakeScore's lag or fitting error. A label with fewer than 3
    samples keeps its last fit; before the first, the fit is the data's own (as the LoRA starts at zero)."""

    lora_scale = 2.0  # DynaDG's units, as FakeScore

    def __init__(self, data):
        self.data, self.means, self.covs = data, data.means.clone(), data.covs.clone()
        self.fitted = data

    def fit(self, x, labels):
        for m in labels.unique().tolist():
            if (labels == m).sum() >= 3:
                self.means[m], self.covs[m] = x[labels == m].mean(0), torch.cov(x[labels == m].T)
        self.fitted = type(self.data)(weights=self.data.weights, means=self.means, covs=self.covs)

    def __call__(self, x, t, labels, alphas_cumprod, step=0):  # one fit for every step
        return self.fitted.eps(x, t, labels, alphas_cumprod)

    def delta(self, x, t, labels, alphas_cumprod, step=0):
        return self(x, t, labels, alphas_cumprod) - self.data.eps(x, t, labels, alphas_cumprod)


def real_eps(data, fake, x, t, labels, guidance, lam, alphas_cumprod, step=0):
    """The real score: the teacher with CFG. DynaDG (E10) switches the fake's LoRA in at scale lam, in the units
    of the fake's own scale (official demo: 0.75 against 2.0, so 37.5% of its delta), on both CFG branches, as
    the one adapted UNet does in dmdr.py: eps + (lam / s) (d_u + w (d_c - d_u))."""
    eps = data.guided_eps(x, t, labels, guidance, alphas_cumprod)
    if lam == 0:
        return eps
    delta = fake.delta(x, t, labels, alphas_cumprod, step)
    if guidance != 1.0:
        delta_u = fake.delta(x, t, torch.full_like(labels, data.num_modes), alphas_cumprod, step)  # the null label
        delta = delta_u + guidance * (delta - delta_u)
    return eps + lam / fake.lora_scale * delta  # E10


# ---------------------------------------------------------------------------------------------------
# The generator's sampler: predict x0 at t_k, renoise to t_{k+1} with fresh noise (DMD2 / LCM)
# ---------------------------------------------------------------------------------------------------
def predict_x0(model, x, t, labels, alphas_cumprod):
    """One generator step: its x0 estimate from the state x at t (no CFG: DMD bakes guidance in)."""
    return x0_from_eps(x, model(x, t, labels), alphas_cumprod[t])


@torch.no_grad()
def generate(model, z, labels, steps, generator=None):
    """K-step generation from z (B, 2) -> x0 (B, 2); deterministic given `generator`'s seed."""
    ac, grid = sd_alphas_cumprod(), trailing_timesteps(steps)
    x = z
    for k, t in enumerate(grid.tolist()):
        x0 = predict_x0(model, x, t, labels, ac)
        if k + 1 < steps:
            x = add_noise(x0, torch.randn(x0.shape, generator=generator, dtype=x0.dtype), ac[grid[k + 1]])
    return x0


@torch.no_grad()
def backward_simulate(model, z, labels, steps, k, generator):
    """DMD2's backward simulation: sample i is trained at step k_i (B,); its first k_i steps run without
    grad. Returns the states x_{t_k} (B, 2) and t_k (B,), from which the trained step predicts x0."""
    ac, grid = sd_alphas_cumprod(), trailing_timesteps(steps)
    states, x = [z], z  # K x (B, 2)
    for j in range(steps - 1):
        x0 = predict_x0(model, x, grid[j].item(), labels, ac)
        x = add_noise(x0, torch.randn(x0.shape, generator=generator, dtype=x0.dtype), ac[grid[j + 1]])
        states.append(x)
    return torch.stack(states)[k, torch.arange(z.shape[0])], grid[k]


def stochastic_x0_step(model, x, t, labels, alphas_cumprod, generator=None, prev_sample=None):
    """The generator step as a Gaussian policy for GRPO / DPO: DDIM with eta = 1 from t to "after the last
    step" (E1), std ~ 0.03. Returns the sample (B, 2) and its log-prob (B,) (E2)."""
    eps = model(x, t, labels)
    sample, log_prob, _, _ = ddim_step_with_logprob(eps, t, -1, x, alphas_cumprod, eta=1.0,
                                                   prev_sample=prev_sample, generator=generator)
    return sample, log_prob


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------
def rl_loss(cfg, model, ref, x_K, t_K, labels, ac, g):
    """E12's L_rl on the generator's final step. x_K (B, 2): states at the last grid time t_K (B,), reached
    without grad; the first B // G of them seed the GRPO groups / DPO pairs (same label and state)."""
    if cfg.rl == "refl":
        return -toy_reward(predict_x0(model, x_K, t_K, labels, ac)).mean()  # ReFL: climb R through G
    group = 2 if cfg.rl == "dpo" else cfg.group_size
    n = cfg.batch // group
    xs, ts, ls = (v[:n].repeat_interleave(group, 0) for v in (x_K, t_K, labels))  # (n * G, ...)
    sample, log_prob = stochastic_x0_step(model, xs, ts, ls, ac, generator=g)
    rewards = toy_reward(sample.detach()).reshape(n, group)
    if cfg.rl == "grpo":
        adv = grpo_advantages(rewards).flatten()  # E4
        return clipped_surrogate(log_prob, log_prob.detach(), adv, cfg.grpo_clip)  # E5, on-policy
    with torch.no_grad():
        _, ref_log_prob = stochastic_x0_step(ref, xs, ts, ls, ac, prev_sample=sample)
    order = rewards.argsort(-1, descending=True)  # (n, 2): winner first
    log_prob, ref_log_prob = (v.reshape(n, 2).gather(1, order) for v in (log_prob, ref_log_prob))
    return dpo_loss(log_prob, ref_log_prob, cfg.dpo_beta)


def train_dmdr(data, student_init, cfg, seed=0):
    """DMD (E8, E9) with DynaDG (E10), DynaRS (E11) and an RL branch (E12). Returns (generator, history)."""
    if cfg.rl not in RL_WEIGHTS:
        raise ValueError(f"rl must be one of {list(RL_WEIGHTS)}, got {cfg.rl!r}")
    if not cfg.use_dmd and cfg.rl == "none":
        raise ValueError("use_dmd=False needs an RL branch (rl='refl', 'dpo' or 'grpo')")
    if cfg.fake not in ("learned", "gaussian") or cfg.fake_samples not in ("step", "final"):
        raise ValueError(f"fake must be 'learned' or 'gaussian' and fake_samples 'step' or 'final', got "
                         f"{cfg.fake!r}, {cfg.fake_samples!r}")
    if cfg.fake_per_step and (cfg.fake, cfg.fake_samples) != ("learned", "step"):
        raise ValueError("fake_per_step needs the learned fake trained on every step's outputs (fix: fake="
                         "'learned', fake_samples='step')")
    if cfg.batch < (2 if cfg.rl == "dpo" else cfg.group_size):
        raise ValueError(f"batch {cfg.batch} holds no full GRPO group / DPO pair (fix: batch >= group_size)")
    rl_weight = RL_WEIGHTS[cfg.rl] if cfg.rl_weight is None else cfg.rl_weight
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ac = sd_alphas_cumprod()
    model = copy.deepcopy(student_init).requires_grad_(True).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.fake == "learned":
        fake = FakeScore(data, cfg.fake_hidden, steps=cfg.steps if cfg.fake_per_step else 1)
        fake_opt = torch.optim.Adam(fake.parameters(), lr=cfg.fake_lr, betas=(0.0, 0.999))
    else:
        fake = GaussianFake(data)
    renoise = lambda n, it: sample_renoise_timesteps(n, it, cfg.a0, cfg.b0, cfg.total_steps, generator=g,
                                                     dynamic=cfg.dynars)
    B, K = cfg.batch, cfg.steps
    n_dmd = B * cfg.use_dmd
    n_fake = B * cfg.use_dmd  # fresh generator samples for the fake score per iteration
    dmd, fake_part, final = slice(0, n_dmd), slice(n_dmd, n_dmd + n_fake), slice(n_dmd + n_fake, None)
    ref, history = None, []
    for it in range(cfg.iters):
        lam = dynadg_scale(it, cfg.lambda0, cfg.total_steps) if cfg.dynadg and cfg.use_dmd else 0.0
        rl_on = cfg.rl != "none" and (it >= cfg.rl_start or not cfg.use_dmd)
        if rl_on and ref is None:
            ref = copy.deepcopy(model).requires_grad_(False)  # DPO's reference: the generator as RL starts
        # One batch of starting noise for three uses: the DMD step, the fake score's samples, and B
        # final-step states (the RL branch scores the generator's output, as ReFL does; else: logging)
        z = torch.randn(n_dmd + n_fake + B, 2, generator=g, dtype=DTYPE)
        labels = torch.multinomial(data.weights, z.shape[0], replacement=True, generator=g)
        k = torch.randint(K, (z.shape[0],), generator=g)
        k[final] = K - 1
        if cfg.fake_samples == "final":
            k[fake_part] = K - 1
        k_fake = k if cfg.fake_per_step else torch.zeros_like(k)  # the step the fake is told
        x_k, t_k = backward_simulate(model, z, labels, K, k, g)  # (N, 2), (N,)

        # Fake score: fake_updates epsilon-loss steps on fresh, detached generator samples (E9, two time-scales),
        # each sample noised at fake_draws (t, noise) pairs; the updates split those B * fake_draws points
        fake_losses = []
        if cfg.use_dmd:
            with torch.no_grad():  # the fake score's exact part has no parameters: batch it once
                x_gen = predict_x0(model, x_k[fake_part], t_k[fake_part], labels[fake_part], ac)  # (n_fake, 2)
                x_gen, labels_gen = x_gen.repeat(cfg.fake_draws, 1), labels[fake_part].repeat(cfg.fake_draws)
                k_gen = k_fake[fake_part].repeat(cfg.fake_draws)
                t = renoise(x_gen.shape[0], it)  # DynaRS times for the fake loss too (E11)
                noise = torch.randn(x_gen.shape, generator=g, dtype=DTYPE)
                x_t = add_noise(x_gen, noise, ac[t])  # (n_fake * fake_draws, 2)
                eps_teacher = data.eps(x_t, t, labels_gen, ac)
            order = torch.randperm(x_t.shape[0], generator=g)  # drawn either way: the oracle's runs are paired
            if cfg.fake == "gaussian":  # the diagnostic oracle: fitted, not trained
                fake.fit(x_gen[:n_fake], labels_gen[:n_fake])
            else:
                for sl in order.chunk(cfg.fake_updates):
                    eps_fake = eps_teacher[sl] + fake.delta(x_t[sl], t[sl], labels_gen[sl], ac, k_gen[sl])
                    loss = fake_score_loss(eps_fake, noise[sl])  # E9
                    fake_opt.zero_grad()
                    loss.backward()
                    fake_opt.step()
                    fake_losses.append(loss.item())

        # Generator: DMD gradient on renoised output (E8) + lambda_rl * RL loss (E12)
        loss_dmd = loss_rl = torch.zeros((), dtype=DTYPE)
        if cfg.use_dmd:
            x = predict_x0(model, x_k[dmd], t_k[dmd], labels[dmd], ac)  # (B, 2), the one step with grad
            t = renoise(B, it)  # E11
            x_t = add_noise(x.detach(), torch.randn(x.shape, generator=g, dtype=DTYPE), ac[t])
            with torch.no_grad():
                eps_real = real_eps(data, fake, x_t, t, labels[dmd], cfg.real_guidance, lam, ac, k_fake[dmd])
                x0_real = x0_from_eps(x_t, eps_real, ac[t])
                x0_fake = x0_from_eps(x_t, fake(x_t, t, labels[dmd], ac, k_fake[dmd]), ac[t])
            loss_dmd = dmd_loss(x, x0_real, x0_fake)  # E8
        if rl_on:
            loss_rl = rl_loss(cfg, model, ref, x_k[final], t_k[final], labels[final], ac, g)
        loss = loss_dmd + rl_weight * loss_rl  # E12
        opt.zero_grad()
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()

        with torch.no_grad():
            reward = toy_reward(predict_x0(model, x_k[final], t_k[final], labels[final], ac)).mean()
        a, b = dynars_beta(it, cfg.a0, cfg.b0, cfg.total_steps) if cfg.dynars else (1.0, 1.0)
        history.append(dict(
            dmd_loss=loss_dmd.item(), fake_loss=sum(fake_losses) / max(len(fake_losses), 1),
            rl_loss=loss_rl.item(), reward=reward.item(), dynadg_scale=lam, dynars_mean=a / (a + b),
            grad_norm=grad_norm.item(),
        ))
    return model.requires_grad_(False).eval(), history
