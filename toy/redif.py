"""Toy ReDiF: RL distillation of a K-step student onto the 50-step teacher, on the exact 2D mixture.

The SD script redif.py does the same to latents. The order follows METHOD.md sections 1-4: the pure RL
functions shared with redif.py (E4, E5, E6), the reward (E3), the teacher's outputs and trajectories, behaviour
cloning (E7), the K-step MDP rollout (E1, E2), the loop. The student is an EpsMLP sampled with the teacher's
CFG scale (`student_sample`), so its policy mean is the DDIM step of its guided epsilon.
"""
import copy
import functools
import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toy.diffusion import (
    DTYPE, TEACHER_GUIDANCE, TEACHER_STEPS, ddim_step_with_logprob, guided, sd_alphas_cumprod, student_sample,
    teacher_sample, trailing_timesteps,
)


# ---------------------------------------------------------------------------------------------------
# GRPO / PPO pieces (E4, E5, E6): pure functions on tensors, same names and semantics as in redif.py
# ---------------------------------------------------------------------------------------------------
def _check_finite(rewards, where):
    if not torch.isfinite(rewards).all():
        raise ValueError(f"non-finite rewards (NaN or inf) passed to {where} (fix: check the reward's inputs)")


def grpo_advantages(rewards, eps=1e-4):
    """E4: A_i = (R_i - mean_g R) / (std_g R + eps) per group, population std. rewards (num_groups, G)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (num_groups, G), got shape {tuple(rewards.shape)}")
    _check_finite(rewards, "grpo_advantages")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    advantages = centred / (rewards.std(dim=1, correction=0, keepdim=True) + eps)  # E4
    # An all-equal group carries no signal; rounding in its mean could leave ~1e-13 instead of 0.
    same = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return torch.where(same, torch.zeros_like(advantages), advantages)


class PerPromptStatTracker:
    """DDPO's per-prompt reward normalisation (PPO's advantage, no value network): per key, the last
    `buffer_size` rewards; until a key has `min_count` of them, the current batch's mean and std are used."""

    def __init__(self, buffer_size=32, min_count=16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats = {}  # key -> deque of its most recent rewards

    def update(self, keys, rewards):
        """keys: B hashables (prompts, labels); rewards (B,) -> advantages (B,)."""
        keys = keys.tolist() if torch.is_tensor(keys) else list(keys)
        if len(keys) != len(rewards):
            raise ValueError(f"{len(keys)} keys for {len(rewards)} rewards")
        _check_finite(rewards, "PerPromptStatTracker.update")
        advantages = torch.empty_like(rewards)
        for key in dict.fromkeys(keys):  # unique keys, in order of appearance
            idx = torch.tensor([i for i, k in enumerate(keys) if k == key])
            buffer = self.stats.setdefault(key, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[idx].tolist())
            seen = torch.tensor(list(buffer), dtype=rewards.dtype) if len(buffer) >= self.min_count else rewards
            advantages[idx] = (rewards[idx] - seen.mean()) / (seen.std(correction=0) + 1e-6)
        return advantages


def clipped_surrogate(log_prob, old_log_prob, advantages, clip_range):
    """E5: -mean(min(r A, clip(r, 1-e, 1+e) A)), r = exp(log_prob - old_log_prob); all (B,)."""
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return -torch.minimum(ratio * advantages, clipped * advantages).mean()


def gaussian_kl(mean, ref_mean, std):
    """E6: KL(N(mean, std^2) || N(ref_mean, std^2)) = (mean - ref_mean)^2 / (2 std^2), averaged over the
    non-batch dims like E2's log-prob. mean, ref_mean (B, ...); std > 0, broadcastable -> (B,)."""
    if (torch.as_tensor(std) <= 0).any():
        raise ValueError("gaussian_kl needs std > 0 (an eta = 0 step has no KL; fix: train with eta > 0)")
    return ((mean - ref_mean) ** 2 / (2 * std**2)).mean(dim=tuple(range(1, mean.dim())))  # E6


# ---------------------------------------------------------------------------------------------------
# Reward (E3): alignment with the teacher's output from the same (label, x_T)
# ---------------------------------------------------------------------------------------------------
SEMANTIC_FEATURES = 512
SEMANTIC_BANDWIDTH = 0.5  # our choice: about two mode widths; cos ~ exp(-d^2 / (2 * 0.5^2))


@functools.lru_cache(maxsize=4)
def _fourier_basis(num_features, bandwidth, seed):
    g = torch.Generator().manual_seed(seed)
    freqs = torch.randn(2, num_features, generator=g, dtype=DTYPE) / bandwidth
    phases = 2 * math.pi * torch.rand(num_features, generator=g, dtype=DTYPE)
    return freqs, phases


def semantic_embed(x, num_features=SEMANTIC_FEATURES, bandwidth=SEMANTIC_BANDWIDTH, seed=0):
    """The CLIP analogue: fixed random Fourier features of 2D points, unit norm. x (B, 2) -> (B, F).
    Cosines of these approximate an RBF kernel: near points are "the same content", far ones unrelated."""
    freqs, phases = _fourier_basis(num_features, bandwidth, seed)
    return F.normalize(torch.cos(x.to(DTYPE) @ freqs + phases), dim=-1)


PROXY_PULL = 0.5  # our choice: the proxy sees the teacher's output halfway to its mode's centre (about 2x
#                   the K = 5 BC student's alignment error of ~0.02, so the proxy's optimum is past it)


def alignment_reward(x_student, x_teacher, kind="semantic", prototypes=None, pull=PROXY_PULL):
    """E3: (B, 2), (B, 2) -> (B,). "semantic": cosine of the embeddings; "distance": -||x_s - x_t||.

    "proxy" (not E3: a lossy stand-in for CLIP / DINO similarity, to give the toy something to hack): the
    cosine of the student's embedding with the embedding of a *more prototypical* version of the teacher's
    output, x_t + pull * (c - x_t), c the nearest of `prototypes` (M, 2) (the data's mode centres), the way
    CLIP's embedding of an image leans toward its class prototype. Its maximum is that pulled point, off the
    teacher's output by pull * ||c - x_t||, yet from afar (a student error larger than that offset) raising it
    moves the student toward the teacher: it correlates with alignment at the start and not at the end. (The
    toy's K = 5 BC student is already closer than that offset, so RL from it can only trade alignment for it.)"""
    if kind == "semantic":
        return (semantic_embed(x_student) * semantic_embed(x_teacher)).sum(-1)  # E3
    if kind == "distance":
        return -(x_student - x_teacher).norm(dim=-1)  # E3
    if kind == "proxy":
        if prototypes is None:
            raise ValueError("the proxy reward needs prototypes (M, 2), e.g. data.means")
        centres = prototypes.to(x_teacher)[torch.cdist(x_teacher, prototypes.to(x_teacher)).argmin(-1)]
        return (semantic_embed(x_student) * semantic_embed(x_teacher + pull * (centres - x_teacher))).sum(-1)
    raise ValueError(f"reward kind must be 'semantic', 'distance' or 'proxy', got {kind!r}")


def alignment_error(x_student, x_teacher):
    """The toy's headline metric: mean distance to the teacher's output from the same (label, x_T)."""
    return (x_student - x_teacher).norm(dim=-1).mean().item()


# ---------------------------------------------------------------------------------------------------
# The teacher's outputs and trajectories, computed once per (data, size, seed) and shared
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def teacher_pairs(data, size, seed):
    """`size` (label, x_T) draws and the 50-step teacher's output from each: labels (N,), x_T, x0 (N, 2)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(data.weights, size, replacement=True, generator=g)
    x_T = torch.randn(size, 2, generator=g, dtype=DTYPE)
    return labels, x_T, teacher_sample(data, x_T, labels)


def teacher_grid_steps(steps, teacher_steps=TEACHER_STEPS):
    """Our choice: the teacher runs on the trailing grid of K * ceil(50 / K) steps, which contains the
    student's K-step grid (trailing grids of N and N/K share points). For K dividing 50 (1, 2, 5, 10, 25) it
    is the teacher's own 50-step run; K = 4 gives 52 steps, K = 8 gives 56."""
    return steps * math.ceil(teacher_steps / steps)


@functools.lru_cache(maxsize=16)
def teacher_states(data, size, seed, steps):
    """The teacher's states at the student's grid for `teacher_pairs(data, size, seed)`: (K+1, N, 2),
    [x_{t_1} = x_T, x_{t_2}, ..., x0]."""
    labels, x_T, _ = teacher_pairs(data, size, seed)
    fine = teacher_grid_steps(steps)
    _, traj = teacher_sample(data, x_T, labels, steps=fine, return_trajectory=True)  # (fine+1, N, 2)
    return traj[:: fine // steps]


# ---------------------------------------------------------------------------------------------------
# The student as a policy (E1, E2) and behaviour cloning (E7)
# ---------------------------------------------------------------------------------------------------
def student_eps(model, x, t, labels, guidance=TEACHER_GUIDANCE):
    """The student's CFG epsilon, as `student_sample` uses it. x (B, 2), t int or (B,), labels (B,)."""
    return guided(model, x, t, labels, guidance, model.label_emb.num_embeddings - 1)


def flat_grid(timesteps, batch):
    """(t, t_prev) for K steps stacked step-major: (K * B,) each; t_prev = -1 after the last step."""
    t_prev = torch.cat([timesteps[1:], timesteps.new_tensor([-1])])
    return timesteps.repeat_interleave(batch), t_prev.repeat_interleave(batch)


def policy_step(model, states, labels, timesteps, eta, actions=None, guidance=TEACHER_GUIDANCE):
    """All K steps of the policy at once (E1, E2). states (K, B, 2), labels (B,), actions (K, B, 2) or None.
    Returns action (K*B, 2), log_prob (K*B,), mean (K*B, 2), std (K*B, 1)."""
    steps, batch = states.shape[:2]
    t, t_prev = flat_grid(timesteps, batch)
    x = states.reshape(-1, 2)
    eps = student_eps(model, x, t, labels.repeat(steps), guidance)
    prev = None if actions is None else actions.reshape(-1, 2)
    return ddim_step_with_logprob(eps, t, t_prev, x, sd_alphas_cumprod(), eta, prev_sample=prev)  # E1, E2


def bc_loss(model, states, labels, timesteps, guidance=TEACHER_GUIDANCE):
    """E7: the student's eta = 0 step from the teacher's state at t_k must land on the teacher's state at
    t_{k+1} (MSE). states (K+1, B, 2) teacher states at the student's grid, labels (B,)."""
    landed, _, _, _ = policy_step(model, states[:-1], labels, timesteps, eta=0.0, guidance=guidance)
    return F.mse_loss(landed, states[1:].reshape(-1, 2))  # E7


def behaviour_cloning(data, student_init, steps, iters=300, transitions=512, lr=1e-3, pool=4096, seed=0,
                      guidance=TEACHER_GUIDANCE):
    """E7 from `student_init` on a cached pool of teacher trajectories, `transitions` (= trajectories x K)
    per step, so the cost does not grow with K. Returns a new, frozen model."""
    g = torch.Generator().manual_seed(seed)
    batch = max(1, transitions // steps)
    labels, _, _ = teacher_pairs(data, pool, 10_000 + seed)
    states = teacher_states(data, pool, 10_000 + seed, steps)  # (K+1, pool, 2)
    timesteps = trailing_timesteps(steps)
    model = copy.deepcopy(student_init).requires_grad_(True).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(iters, 1))
    for _ in range(iters):
        idx = torch.randint(pool, (batch,), generator=g)
        loss = bc_loss(model, states[:, idx], labels[idx], timesteps, guidance)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.requires_grad_(False).eval()


@torch.no_grad()
def rollout(model, x_T, labels, timesteps, eta, generator, guidance=TEACHER_GUIDANCE):
    """A K-step episode with eta > 0 (E1). x_T (B, 2) -> states (K, B, 2) (inputs of each step), actions
    (K, B, 2) (outputs; actions[-1] is x0), log_probs (K, B) (E2)."""
    states, actions, log_probs, x = [], [], [], x_T
    ac = sd_alphas_cumprod()
    for k, t in enumerate(timesteps.tolist()):
        t_prev = timesteps[k + 1].item() if k + 1 < len(timesteps) else -1
        eps = student_eps(model, x, t, labels, guidance)
        x_next, log_prob, _, _ = ddim_step_with_logprob(eps, t, t_prev, x, ac, eta, generator=generator)
        states.append(x), actions.append(x_next), log_probs.append(log_prob)
        x = x_next
    return torch.stack(states), torch.stack(actions), torch.stack(log_probs)


# ---------------------------------------------------------------------------------------------------
# The loop: sample G episodes per (label, x_T), reward against the teacher, then train (DDPO's two phases)
# ---------------------------------------------------------------------------------------------------
@dataclass
class ToyReDiFConfig:
    steps: int = 5  # K (paper: a 5-step student of a 50-step teacher; grid 999, 799, 599, 399, 199)
    algo: str = "grpo"  # "grpo": group-normalised advantages (E4); "ppo": per-label running statistics
    reward: str = "semantic"  # E3: "semantic" (random-feature cosine, the CLIP analogue) or "distance"; or
    #                          "proxy" (lossy: its optimum is off the teacher's output, see alignment_reward)
    iters: int = 60  # sample-then-train iterations (the paper's and DDPO's "epochs")
    groups: int = 32  # (label, x_T) pairs per iteration
    group_size: int = 8  # G episodes per pair, differing only by the policy's eta-noise
    inner_epochs: int = 2  # passes over each iteration's episodes
    minibatches: int = 2  # optimiser steps per pass (more = further off-policy)
    eta: float = 0.1  # our choice: eta = 1 forgets x_T (no alignment to learn) and E1's eta-dependent mean
    #                   drifts from the eta = 0 sampler used at inference; 0.1 keeps both small
    clip_range: float = 0.2  # E5; log-probs are averaged over only 2 dims here, so PPO's usual value fits
    beta: float = 0.01  # E6 weight of the KL to the reference (the student after behaviour cloning)
    lr: float = 3e-6  # the last step's std is eta * 0.029 (SD's final alpha), so tiny mean moves clip
    max_grad_norm: float = 1.0
    bc_iters: int = 300  # E7 steps before RL (0: start RL from student_init as given)
    bc_lr: float = 1e-3
    pool: int = 4096  # cached (label, x_T, teacher output) draws the iterations sample from
    eval_size: int = 512  # held-out pairs for the per-iteration alignment error
    buffer_size: int = 32  # PPO's PerPromptStatTracker
    min_count: int = 16
    guidance: float = TEACHER_GUIDANCE


def train_redif(data, student_init, cfg, seed=0):
    """E7 then GRPO or PPO (E1-E6). Returns (model, history): the held-out metrics of the RL start (iter 0; the
    over-optimisation experiments measure from it), then one dict per iteration (iter 1..iters)."""
    if cfg.algo not in ("grpo", "ppo"):
        raise ValueError(f"algo must be 'grpo' or 'ppo', got {cfg.algo!r}")
    if cfg.eta <= 0:
        raise ValueError("RL needs a stochastic policy: eta > 0")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = student_init
    if cfg.bc_iters > 0:
        model = behaviour_cloning(data, student_init, cfg.steps, cfg.bc_iters, lr=cfg.bc_lr, pool=cfg.pool,
                                  seed=seed, guidance=cfg.guidance)
    reference = copy.deepcopy(model).requires_grad_(False)  # E6's reference: the RL's initial policy
    model = copy.deepcopy(model).requires_grad_(True).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    tracker = PerPromptStatTracker(cfg.buffer_size, cfg.min_count)
    timesteps = trailing_timesteps(cfg.steps)
    pool_labels, pool_x_T, pool_teacher = teacher_pairs(data, cfg.pool, 20_000 + seed)
    eval_labels, eval_x_T, eval_teacher = teacher_pairs(data, cfg.eval_size, 30_000 + seed)

    def heldout(model):  # the student as deployed: eta 0, deterministic
        x_eval = student_sample(model, eval_x_T, eval_labels, cfg.steps, cfg.guidance)
        return dict(heldout_align_err=alignment_error(x_eval, eval_teacher),
                    heldout_reward=alignment_reward(x_eval, eval_teacher, cfg.reward, data.means).mean().item())
    history = [dict(iter=0, **heldout(model))]
    for it in range(1, cfg.iters + 1):
        # 1. sample: G episodes per (label, x_T), all with the same teacher output
        idx = torch.randint(cfg.pool, (cfg.groups,), generator=g).repeat_interleave(cfg.group_size)
        labels, x_T, x_teacher = pool_labels[idx], pool_x_T[idx], pool_teacher[idx]  # (B,), (B, 2), (B, 2)
        states, actions, old_log_probs = rollout(model, x_T, labels, timesteps, cfg.eta, g, cfg.guidance)
        rewards = alignment_reward(actions[-1], x_teacher, cfg.reward, data.means)  # E3, (B,)
        if cfg.algo == "grpo":
            advantages = grpo_advantages(rewards.reshape(cfg.groups, cfg.group_size)).flatten()  # E4
        else:
            advantages = tracker.update(labels, rewards)  # DDPO's PPO: per-label (per-prompt) statistics
        with torch.no_grad():
            _, _, ref_means, _ = policy_step(reference, states, labels, timesteps, cfg.eta, actions, cfg.guidance)
        ref_means = ref_means.reshape(states.shape)  # (K, B, 2)

        # 2. train: inner epochs of the clipped surrogate (E5) + beta * KL to the reference (E6), all K steps
        clipfracs, kls = [], []
        for _ in range(cfg.inner_epochs):
            for mb in torch.randperm(len(labels), generator=g).chunk(cfg.minibatches):
                _, log_prob, mean, std = policy_step(model, states[:, mb], labels[mb], timesteps, cfg.eta,
                                                     actions[:, mb], cfg.guidance)  # (K*b,), (K*b, 2)
                old = old_log_probs[:, mb].reshape(-1)
                surrogate = clipped_surrogate(log_prob, old, advantages[mb].repeat(cfg.steps), cfg.clip_range)  # E5
                kl = gaussian_kl(mean, ref_means[:, mb].reshape(-1, 2), std).mean()  # E6, per step k
                loss = surrogate + cfg.beta * kl
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                clipfracs.append(((log_prob - old).exp().sub(1).abs() > cfg.clip_range).double().mean().item())
                kls.append(kl.item())
        history.append(dict(iter=it, reward_mean=rewards.mean().item(), kl=sum(kls) / len(kls),
                            clipfrac=sum(clipfracs) / len(clipfracs), **heldout(model)))
    return model.requires_grad_(False).eval(), history
