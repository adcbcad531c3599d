"""The distillation baselines ReDiF compares against, on the toy: progressive and consistency distillation.

Both start from `student_init` (an EpsMLP fitted to the teacher's epsilon) and distil the exact teacher
(CFG w = TEACHER_GUIDANCE, DDIM). Samplers: a progressive-distillation student is a plain K-step DDIM
student (`student_sample`, eta 0, trailing grid); a consistency-distillation model is sampled with
multistep consistency sampling (`consistency_sample`, Song et al. 2023, Alg. 1), at any K.
"""
import copy
import math

import torch
import torch.nn.functional as F

from toy.diffusion import (DTYPE, TEACHER_GUIDANCE, add_noise, ddim_step_with_logprob, sd_alphas_cumprod,
                           trailing_timesteps)
from toy.redif import student_eps


def ddim_step(eps, t, t_prev, x):
    """The deterministic DDIM step (E1 with eta = 0). x, eps (B, 2); t, t_prev (B,) or int -> (B, 2)."""
    return ddim_step_with_logprob(eps, t, t_prev, x, sd_alphas_cumprod(), eta=0.0)[2]  # the mean


def _train(model, loss_fn, iters, lr, generator):
    """Adam with a cosine schedule on loss_fn(model, generator) -> scalar."""
    model.requires_grad_(True).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(iters, 1))
    for _ in range(iters):
        loss = loss_fn(model, generator)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------------
# Progressive distillation (Salimans & Ho 2022): one student step = two teacher steps, halve, repeat
# ---------------------------------------------------------------------------------------------------
def progressive_start_steps(steps, min_start=32):
    """Our choice: the exact teacher's DDIM on K * 2^m >= 32 steps is the first stage's teacher (trailing
    grids of N/2 steps lie inside those of N, so each stage's grid halves the previous one)."""
    return steps * 2 ** max(0, math.ceil(math.log2(min_start / steps)))


def progressive_distillation(data, student_init, steps, iters_per_stage=200, batch=256, lr=5e-4, seed=0,
                             guidance=TEACHER_GUIDANCE, min_start=32):
    """Distil down to a `steps`-step DDIM student (sample it with `student_sample`). Each stage trains a
    student on the n-step grid so that its one DDIM step from x_t (data noised to a grid time) lands where the
    teacher's two steps on the 2n-step grid land (MSE on the landing state, as E7); the student then becomes
    the next stage's teacher. Stage 0's teacher is the exact CFG epsilon."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ac = sd_alphas_cumprod()
    teacher_eps = lambda x, t, labels: data.guided_eps(x, t, labels, guidance, ac)
    student = copy.deepcopy(student_init)
    n = progressive_start_steps(steps, min_start)
    while n > steps:
        n //= 2
        fine = torch.cat([trailing_timesteps(2 * n), torch.tensor([-1])])  # 2n grid and "the end"

        def loss_fn(model, g, fine=fine, teacher_eps=teacher_eps):
            x0, labels = data.sample(batch, generator=g)
            k = torch.randint(fine.numel() // 2, (batch,), generator=g)  # a student step of the n-step grid
            t, t_mid, t_next = fine[2 * k], fine[2 * k + 1], fine[2 * k + 2]
            x_t = add_noise(x0, torch.randn(batch, 2, generator=g, dtype=DTYPE), ac[t])  # (B, 2)
            with torch.no_grad():
                x_mid = ddim_step(teacher_eps(x_t, t, labels), t, t_mid, x_t)
                target = ddim_step(teacher_eps(x_mid, t_mid, labels), t_mid, t_next, x_mid)
            landed = ddim_step(student_eps(model, x_t, t, labels, guidance), t, t_next, x_t)
            return F.mse_loss(landed, target)

        student = _train(student, loss_fn, iters_per_stage, lr, g)
        frozen = copy.deepcopy(student)
        teacher_eps = lambda x, t, labels, frozen=frozen: student_eps(frozen, x, t, labels, guidance)
    return student


# ---------------------------------------------------------------------------------------------------
# Consistency distillation (Song et al. 2023) with the exact teacher's ODE (DDIM) step
# ---------------------------------------------------------------------------------------------------
def consistency_fn(model, x, t, labels, guidance=TEACHER_GUIDANCE):
    """f_theta(x_t, t): the student's DDIM step from t straight to the end. t = -1 ("already at the end")
    gives f = x, the boundary condition, exactly: the step from -1 to -1 is the identity."""
    t = torch.as_tensor(t).expand(x.shape[0])
    return ddim_step(student_eps(model, x, t, labels, guidance), t, torch.full_like(t, -1), x)


def consistency_distillation(data, student_init, iters=1500, batch=256, lr=5e-4, ema=0.95, grid_steps=50,
                             seed=0, guidance=TEACHER_GUIDANCE):
    """CD: f_theta(x_{t_n}) must match f_ema(x_hat_{t_{n+1}}) where x_hat is the exact teacher's DDIM (ODE) step
    from t_n to the adjacent grid time t_{n+1} (the teacher's 50-step grid, then the end). The EMA target
    (mu = 0.95, Song et al.'s CD value) is returned: sample it with `consistency_sample` at any K."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ac = sd_alphas_cumprod()
    grid = torch.cat([trailing_timesteps(grid_steps), torch.tensor([-1])])
    target = copy.deepcopy(student_init).requires_grad_(False)

    def loss_fn(model, g):
        x0, labels = data.sample(batch, generator=g)
        n = torch.randint(grid_steps, (batch,), generator=g)
        t, t_next = grid[n], grid[n + 1]
        x_t = add_noise(x0, torch.randn(batch, 2, generator=g, dtype=DTYPE), ac[t])  # (B, 2)
        with torch.no_grad():
            x_next = ddim_step(data.guided_eps(x_t, t, labels, guidance, ac), t, t_next, x_t)  # teacher ODE step
            f_target = consistency_fn(target, x_next, t_next, labels, guidance)
        return F.mse_loss(consistency_fn(model, x_t, t, labels, guidance), f_target)

    model = copy.deepcopy(student_init).requires_grad_(True).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(iters):
        loss = loss_fn(model, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # theta^- <- mu theta^- + (1 - mu) theta
            for p_target, p in zip(target.parameters(), model.parameters()):
                p_target.lerp_(p, 1 - ema)
    return target.eval()


@torch.no_grad()
def consistency_sample(model, x_T, labels, steps, generator=None, guidance=TEACHER_GUIDANCE):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) on the trailing K-step grid: x = f(x_T, t_1),
    then for each later t_k renoise x to t_k with fresh noise and apply f again. x_T (B, 2) -> x0 (B, 2)."""
    ac, grid = sd_alphas_cumprod(), trailing_timesteps(steps)
    x = consistency_fn(model, x_T, grid[0].item(), labels, guidance)
    for t in grid[1:].tolist():
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = consistency_fn(model, add_noise(x, noise, ac[t]), t, labels, guidance)
    return x
