"""The toy's exact diffusion and the MDP step (METHOD.md E1, E2): closed forms, not "it ran"."""
import math

import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from toy.diffusion import (
    DTYPE, GaussianMixture, MixtureConfig, ddim_sample, ddim_step_with_logprob, pretrain_student,
    sd_alphas_cumprod, student_sample, teacher_sample, trailing_timesteps,
)

AC = sd_alphas_cumprod()
DATA = GaussianMixture()


def sd_ddim_scheduler():
    """diffusers' DDIM exactly as Stable Diffusion ships it."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         set_alpha_to_one=False, clip_sample=False, timestep_spacing="trailing")


def test_schedule_and_grid_match_diffusers():
    sched = sd_ddim_scheduler()
    assert torch.allclose(AC, sched.alphas_cumprod.to(DTYPE), rtol=1e-6)
    for k in (1, 2, 4, 5, 8, 50):
        sched.set_timesteps(k)
        assert trailing_timesteps(k).tolist() == sched.timesteps.tolist()
    assert trailing_timesteps(5).tolist() == [999, 799, 599, 399, 199]
    assert trailing_timesteps(4).tolist() == [999, 749, 499, 249]


@settings(max_examples=30, deadline=None)
@given(abar=st.floats(1e-3, 0.999), seed=st.integers(0, 10_000), label=st.integers(0, 8))
def test_exact_score_is_autograd_of_log_density(abar, seed, label):
    x = (3 * torch.randn(6, 2, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)).requires_grad_()
    labels = torch.full((6,), label)  # label 8 = null (unconditional)
    (grad,) = torch.autograd.grad(DATA.log_prob(x, abar, labels).sum(), x)
    assert torch.allclose(DATA.score(x, abar, labels), grad, atol=1e-9, rtol=1e-7)


def test_cfg_with_unit_guidance_is_the_conditional_eps_and_null_label_is_unconditional():
    x = torch.randn(16, 2, dtype=DTYPE)
    labels = torch.arange(16) % 8
    assert torch.allclose(DATA.guided_eps(x, 500, labels, 1.0), DATA.eps(x, 500, labels))
    assert torch.allclose(DATA.eps(x, 500, torch.full((16,), 8)), DATA.eps(x, 500, None))
    w = 3.0
    eps_u, eps_c = DATA.eps(x, 500), DATA.eps(x, 500, labels)
    assert torch.allclose(DATA.guided_eps(x, 500, labels, w), eps_u + w * (eps_c - eps_u))


@settings(max_examples=25, deadline=None)
@given(k=st.integers(0, 4), eta=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_ddim_step_matches_diffusers_scheduler_step(k, eta, seed):
    """Same noise in, same sample out: our E1 step is diffusers' DDIMScheduler.step."""
    g = torch.Generator().manual_seed(seed)
    sched = sd_ddim_scheduler()
    sched.set_timesteps(5)
    grid = trailing_timesteps(5)
    t, t_prev = grid[k].item(), (grid[k + 1].item() if k < 4 else -1)
    x, eps, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    _, _, mean, std = ddim_step_with_logprob(eps.double(), t, t_prev, x.double(), AC, eta)
    theirs = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    assert torch.allclose((mean + std * noise.double()).float(), theirs, atol=1e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 999), dt=st.integers(1, 400), eta=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_logprob_is_torch_normal_logprob_averaged_over_dims(t, dt, eta, seed):
    g = torch.Generator().manual_seed(seed)
    x, eps = torch.randn(4, 3, 5, generator=g, dtype=DTYPE), torch.randn(4, 3, 5, generator=g, dtype=DTYPE)
    t_prev = t - dt  # may be negative: the last step, to SD's final alpha
    prev, logp, mean, std = ddim_step_with_logprob(eps, t, t_prev, x, AC, eta, generator=g)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(prev).mean(dim=(1, 2))
    assert torch.allclose(logp, ref, atol=1e-9)
    # the log-prob of a given action does not depend on how the step was sampled
    again = ddim_step_with_logprob(eps, t, t_prev, x, AC, eta, prev_sample=prev)[1]
    assert torch.equal(again, logp)


@settings(max_examples=20, deadline=None)
@given(t=st.integers(1, 999), dt=st.integers(1, 400))
def test_eta_zero_is_deterministic_with_zero_logprob_never_nan(t, dt):
    x, eps = torch.randn(4, 2, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    prev, logp, mean, std = ddim_step_with_logprob(eps, t, t - dt, x, AC, eta=0.0)
    assert torch.equal(prev, mean) and torch.all(std == 0)
    assert torch.equal(logp, torch.zeros(4, dtype=DTYPE))
    # at t_prev = -1 with eta = 1 the step stays stochastic (SD's final alpha is < 1), so every MDP step
    # has a finite log-prob
    _, logp1, _, std1 = ddim_step_with_logprob(eps, 199, -1, x, AC, eta=1.0)
    assert torch.all(std1 > 0) and torch.isfinite(logp1).all()


def _affine_ddim_map(mean, var, steps):
    """DDIM with the exact eps of N(mean, var I), started from the exact p_{t_1} = N(mu_1, s_1^2 I), is an
    affine map z -> A z + b of the standard normal z; read A and b off the map exactly."""
    one = GaussianMixture(weights=[1.0], means=[mean], covs=[[[var, 0.0], [0.0, var]]])
    eps_fn = lambda x, t: one.eps(x, t, None, AC)  # noqa: E731
    grid = trailing_timesteps(steps)
    abar = AC[grid[0]]
    mu_1, s_1 = abar.sqrt() * torch.tensor([mean], dtype=DTYPE), (abar * var + 1 - abar).sqrt()
    b = ddim_sample(eps_fn, mu_1, grid, AC)[0]
    a = ddim_sample(eps_fn, mu_1 + s_1 * torch.tensor([[1.0, 0.0]], dtype=DTYPE), grid, AC)[0] - b
    return a[0].item(), b


@pytest.mark.parametrize("mean,var", [([1.5, -0.5], 0.04), ([0.0, 2.0], 0.5)])
def test_ddim_with_exact_eps_maps_noise_onto_a_single_gaussian(mean, var):
    """The deterministic sampler must carry p_{t_1} onto p at SD's final alpha: N(sqrt(a0) m, a0 var + 1 - a0).
    Computed from the map itself, so no sampling error: the mean is exact at any step count, the std error
    is DDIM's first-order discretisation error (falls about as 1/steps)."""
    a0 = AC[0].item()
    target_std, target_mean = math.sqrt(a0 * var + 1 - a0), math.sqrt(a0) * torch.tensor(mean, dtype=DTYPE)
    std_err, mean_err = [], []
    for steps in (10, 50, 250):
        scale, shift = _affine_ddim_map(mean, var, steps)
        std_err.append(abs(scale / target_std - 1))
        mean_err.append((shift - target_mean).norm().item())
    assert max(mean_err) < 1e-10
    assert std_err[0] > std_err[1] > std_err[2] and std_err[2] < 0.04
    assert std_err[1] / std_err[2] > 3  # first order: 5x the steps, ~4-5x less error


def test_ddim_with_exact_eps_maps_noise_onto_the_mixture():
    g = torch.Generator().manual_seed(0)
    x0, labels = DATA.sample(4000, generator=g)
    x = ddim_sample(lambda x, t: DATA.eps(x, t, None, AC), torch.randn(4000, 2, generator=g, dtype=DTYPE),
                    trailing_timesteps(100), AC)
    assert torch.allclose(x.mean(0), x0.mean(0), atol=0.08)
    assert torch.allclose(torch.cov(x.T), torch.cov(x0.T), atol=0.12)
    share = torch.bincount(DATA.mode_of(x), minlength=8).to(DTYPE) / 4000.0
    assert torch.allclose(share, DATA.weights, atol=0.03)


def test_conditional_teacher_lands_in_its_label_mode():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(400) % DATA.num_modes
    x = teacher_sample(DATA, torch.randn(400, 2, generator=g, dtype=DTYPE), labels)
    assert (DATA.mode_of(x) == labels).double().mean() > 0.99


def test_pretrained_student_imitates_the_teacher_with_many_steps_not_with_one():
    """The "student starts from the teacher's weights" analogue: close at 50 steps, poor at 1 (the 1-step
    DDIM sample is the blurry posterior mean), which is the gap distillation must close."""
    model = pretrain_student(DATA)
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(512) % DATA.num_modes
    x_T = torch.randn(512, 2, generator=g, dtype=DTYPE)
    ref = teacher_sample(DATA, x_T, labels)
    err = {k: (student_sample(model, x_T, labels, k) - ref).norm(dim=-1).mean().item() for k in (1, 50)}
    assert err[50] < 0.2 and err[1] > 1.0
    assert pretrain_student(DATA) is not pretrain_student(DATA)  # cached weights, fresh copies


def test_student_sample_runs_at_its_guidance():
    """student_sample(guidance=1) is DDIM on the conditional epsilon alone, not at the teacher's default CFG."""
    from toy.diffusion import EpsMLP
    torch.manual_seed(0)
    model = EpsMLP(DATA.num_modes).eval()
    x_T = torch.randn(16, 2, dtype=DTYPE)
    labels = torch.arange(16) % DATA.num_modes
    with torch.no_grad():
        expected = ddim_sample(lambda x, t: model(x, t, labels), x_T, trailing_timesteps(3), AC)
    torch.testing.assert_close(student_sample(model, x_T, labels, 3, guidance=1.0), expected)


def test_mixture_config_controls_the_modes():
    data = GaussianMixture(MixtureConfig(num_modes=3, radius=1.0))
    assert data.means.shape == (3, 2) and torch.allclose(data.means.norm(dim=-1), torch.ones(3, dtype=DTYPE))
    assert math.isclose(data.weights.sum().item(), 1.0)


def test_conditional_log_prob_is_the_labels_own_gaussian():
    """p_t(x | c) of the mixture is the single Gaussian N(sqrt(abar) m_c, abar S_c + (1 - abar) I): its log
    density, not the joint log w_c + log N (the score cannot tell them apart: they differ by a constant)."""
    data = GaussianMixture()
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(64, 2, generator=g, dtype=DTYPE)
    for abar in (1.0, 0.3):
        for c in range(data.num_modes):
            cov = abar * data.covs[c] + (1 - abar) * torch.eye(2, dtype=DTYPE)
            ref = torch.distributions.MultivariateNormal(math.sqrt(abar) * data.means[c], cov).log_prob(x)
            torch.testing.assert_close(data.log_prob(x, torch.tensor(abar, dtype=DTYPE), torch.full((64,), c)), ref)


def test_mode_of_is_the_posteriors_most_likely_component():
    """mode_of (coverage, per-label checks) is argmax_m w_m N(x; m_m, S_m), the posterior's mode: with
    non-uniform weights this differs from the likelihood's argmax between modes."""
    data = GaussianMixture()
    assert data.weights.max() / data.weights.min() > 1.5  # non-uniform, so the weights matter
    g = torch.Generator().manual_seed(0)
    x = 2.2 * torch.randn(20000, 2, generator=g, dtype=DTYPE)
    comps = torch.stack([torch.distributions.MultivariateNormal(data.means[m], data.covs[m]).log_prob(x)
                         for m in range(data.num_modes)], -1)
    assert torch.equal(data.mode_of(x), (data.weights.log() + comps).argmax(-1))
