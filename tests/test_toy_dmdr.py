"""toy/dmdr.py: the DMD gradient (E8) against closed forms, the cold-start schedules (E10, E11), the sampler,
and one seeded learning test per method (DMD, RL only, DMDR with ReFL / DPO / GRPO)."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import toy.dmdr
from toy.diffusion import DTYPE, EpsMLP, GaussianMixture, add_noise, pretrain_student, sd_alphas_cumprod, x0_from_eps
from toy.dmdr import (
    FakeScore, GaussianFake, ToyDMDRConfig, backward_simulate, dmd_loss, dynadg_scale, dynars_beta, generate,
    predict_x0, real_eps, sample_renoise_timesteps, toy_reward, train_dmdr,
)

AC = sd_alphas_cumprod()


# ---------------------------------------------------------------------------------------------------
# E8: the DMD loss's gradient
# ---------------------------------------------------------------------------------------------------
shapes = st.sampled_from([(1, 2), (5, 2), (3, 7), (2, 4, 3, 3)])


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_dmd_gradient_is_g_over_numel(shape, seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(shape, generator=g, dtype=DTYPE)).requires_grad_()
    x0_real = scale * torch.randn(shape, generator=g, dtype=DTYPE)
    x0_fake = scale * torch.randn(shape, generator=g, dtype=DTYPE)
    dmd_loss(x, x0_real, x0_fake).backward()
    norm = (x - x0_real).abs().flatten(1).mean(1).reshape((-1,) + (1,) * (len(shape) - 1)) + 1e-8
    expected = (x0_fake - x0_real) / (norm * x.numel())  # g / N: descent moves x toward x0_real
    # the loss's target is x - g, so autograd's x - (x - g) recovers g to a few ulps of x (and of the x0s): float64
    # rounding at the operands' scale, not a wrong gradient (which is off by O(|g| / N))
    rounding = 8 * torch.finfo(DTYPE).eps * (x.abs() + x0_real.abs() + x0_fake.abs()).detach() / x.numel()
    assert ((x.grad - expected).abs() <= 1e-10 * expected.abs() + rounding).all()


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_dmd_gradient_is_zero_when_fake_equals_real(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=DTYPE).requires_grad_()
    x0 = torch.randn(shape, generator=g, dtype=DTYPE)
    loss = dmd_loss(x, x0, x0.clone())
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)


def test_dmd_loss_is_finite_where_the_estimates_equal_x():
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=DTYPE, requires_grad=True)
    x0_real = torch.stack([x[0].detach(), torch.tensor([0.0, 0.0], dtype=DTYPE)])  # sample 0: g = 0 / (0 + 1e-8)
    x0_fake = torch.stack([x[0].detach(), torch.tensor([1.0, 1.0], dtype=DTYPE)])
    dmd_loss(x, x0_real, x0_fake).backward()
    assert torch.all(x.grad[0] == 0)  # 0, and it does not spill into the other sample
    torch.testing.assert_close(x.grad[1], torch.full((2,), 1.0 / 0.75 / 4, dtype=DTYPE))


def gaussian(mean, cov):
    """A one-component GaussianMixture: its exact eps gives the Tweedie x0 estimate of N(mean, cov) at any t."""
    mean, cov = torch.as_tensor(mean, dtype=DTYPE), torch.as_tensor(cov, dtype=DTYPE)
    return GaussianMixture(weights=[1.0], means=mean.unsqueeze(0), covs=cov.unsqueeze(0))


def dmd_grads(gen_mu, gen_std, real, t, n, seed):
    """Per-sample d dmd_loss / dx for x ~ N(gen_mu, gen_std^2 I), with the exact x0 estimates of both
    Gaussians at the renoised x. Returns x (n, 2), its gradient (n, 2), the normaliser N mean|p_real| (n, 1)."""
    g = torch.Generator().manual_seed(seed)
    fake = gaussian(gen_mu, gen_std**2 * torch.eye(2, dtype=DTYPE))
    x = torch.as_tensor(gen_mu, dtype=DTYPE) + gen_std * torch.randn(n, 2, generator=g, dtype=DTYPE)
    x.requires_grad_()
    t = torch.as_tensor(t).expand(n)
    x_t = add_noise(x.detach(), torch.randn(n, 2, generator=g, dtype=DTYPE), AC[t])
    x0_real = x0_from_eps(x_t, real.eps(x_t, t, None, AC), AC[t])
    x0_fake = x0_from_eps(x_t, fake.eps(x_t, t, None, AC), AC[t])
    dmd_loss(x, x0_real, x0_fake).backward()
    return x, x.grad, x.numel() * (x.detach() - x0_real).abs().mean(1, keepdim=True)


def grad_kl(gen_mu, real_mean, real_cov, t):
    """grad_mu KL(p_fake,t || p_real,t) = abar C^-1 (mu - m), C = abar S + (1 - abar) I (the generator's
    covariance does not enter the mean's gradient)."""
    a = AC[t]
    cov_t = a * torch.as_tensor(real_cov, dtype=DTYPE) + (1 - a) * torch.eye(2, dtype=DTYPE)
    diff = torch.as_tensor(gen_mu, dtype=DTYPE) - torch.as_tensor(real_mean, dtype=DTYPE)
    return a * torch.linalg.solve(cov_t, diff)


def test_expected_dmd_gradient_is_grad_kl_per_t():
    """With the per-sample normaliser undone, E[N |p_real| dL/dx] = E[x0_fake - x0_real]
    = (1 - abar) C^-1 (mu - m) = (1 - abar) / abar * grad_mu KL_t (Tweedie; E[s_fake] = 0 under p_fake).
    Anisotropic data, so the direction changes with t and a wrong weighting would show."""
    mu, m, cov = [0.2, 0.4], [1.0, -0.5], [[0.09, 0.0], [0.0, 2.25]]
    real = gaussian(m, cov)
    for t in (50, 200, 400, 600, 800, 950):
        _, grad, norm = dmd_grads(mu, 0.5, real, t, 40000, seed=t)
        a = AC[t]
        estimate = (norm * grad).mean(0) * a / (1 - a)
        expected = grad_kl(mu, m, cov, t)
        torch.testing.assert_close(estimate, expected, rtol=0.03, atol=0.01 * expected.norm().item())


def test_dmd_gradient_on_the_mean_points_along_grad_kl():
    """The DMD loss as trained (normalised, t ~ U[20, 980]), differentiated w.r.t. a Gaussian generator's
    mean: a positive multiple of grad_mu KL (isotropic data: every t's KL gradient has the same direction)."""
    mu, m, cov = [0.3, -0.6], [1.5, 0.5], [[0.25, 0.0], [0.0, 0.25]]
    real = gaussian(m, cov)
    g = torch.Generator().manual_seed(0)
    total = torch.zeros(2, dtype=DTYPE)
    for t in torch.randint(20, 981, (40,), generator=g).tolist():
        _, grad, _ = dmd_grads(mu, 0.4, real, t, 2000, seed=t)
        total += grad.sum(0)  # x = mu + s z: dL/dmu = sum_i dL/dx_i
    direction = grad_kl(mu, m, cov, 500)
    assert torch.cosine_similarity(total, direction, dim=0) > 0.99


# ---------------------------------------------------------------------------------------------------
# E10, E11: the cold-start schedules
# ---------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(a0=st.floats(1.0, 10.0), b0=st.floats(1.0, 10.0), total=st.integers(1, 500))
def test_dynars_starts_at_a0_b0_ends_uniform_with_monotone_mean(a0, b0, total):
    assert dynars_beta(0, a0, b0, total) == pytest.approx((a0, b0))
    assert dynars_beta(total, a0, b0, total) == pytest.approx((1.0, 1.0), abs=1e-12)
    assert dynars_beta(3 * total + 7, a0, b0, total) == (1.0, 1.0)
    means = torch.tensor([a / (a + b) for a, b in (dynars_beta(s, a0, b0, total) for s in range(total + 3))])
    diffs = (means[1:] - means[:-1]) * (1 if a0 >= b0 else -1)  # a0 > b0: biased to high noise, mean decays
    assert torch.all(diffs <= 1e-12)


def test_renoise_timesteps_range_mean_and_reproducibility():
    a0, b0, total = 4.0, 1.5, 100
    state = torch.get_rng_state()
    early = sample_renoise_timesteps(20000, 0, a0, b0, total, generator=torch.Generator().manual_seed(0))
    late = sample_renoise_timesteps(20000, total, a0, b0, total, generator=torch.Generator().manual_seed(0))
    flat = sample_renoise_timesteps(20000, 0, a0, b0, total, generator=torch.Generator().manual_seed(1),
                                    dynamic=False)
    assert torch.equal(torch.get_rng_state(), state)  # the fork leaves the global RNG alone
    for t in (early, late, flat):
        assert t.dtype == torch.long and t.min() >= 20 and t.max() <= 980
    assert early.double().mean().item() == pytest.approx(20 + 960 * a0 / (a0 + b0), abs=6)  # SE ~1.2
    assert late.double().mean().item() == pytest.approx(500, abs=6)
    assert flat.double().mean().item() == pytest.approx(500, abs=6)
    again = sample_renoise_timesteps(20000, 0, a0, b0, total, generator=torch.Generator().manual_seed(0))
    assert torch.equal(early, again)


def test_dynadg_decays_monotonically_to_zero():
    total = 200
    scales = [dynadg_scale(s, 0.75, total) for s in range(total + 20)]
    assert scales[0] == 0.75 and scales[total // 2] == pytest.approx(0.375)
    assert all(b <= a for a, b in zip(scales, scales[1:]))
    assert all(s == 0.0 for s in scales[total:])


# ---------------------------------------------------------------------------------------------------
# Scores and sampler
# ---------------------------------------------------------------------------------------------------
def test_fake_score_starts_as_teacher_so_first_dmd_gradient_vanishes():
    data = GaussianMixture()
    fake = FakeScore(data)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=DTYPE).requires_grad_()
    labels = torch.randint(0, data.num_modes, (64,), generator=g)
    t = torch.randint(20, 981, (64,), generator=g)
    x_t = add_noise(x.detach(), torch.randn(64, 2, generator=g, dtype=DTYPE), AC[t])
    with torch.no_grad():
        x0_real = x0_from_eps(x_t, real_eps(data, fake, x_t, t, labels, 1.0, 0.75, AC), AC[t])
        x0_fake = x0_from_eps(x_t, fake(x_t, t, labels, AC), AC[t])
    dmd_loss(x, x0_real, x0_fake).backward()
    assert torch.all(x.grad == 0)  # zero LoRA delta: fake == real, with or without DynaDG


@pytest.mark.parametrize("guidance", [1.0, 1.75])
def test_dynadg_at_the_fake_lora_scale_turns_the_real_score_into_the_guided_fake_score(guidance):
    """E10 in the official code's units: lam is the LoRA's own scale, the fake runs at fake.lora_scale (2.0),
    and both CFG branches carry it. So lam = 0 is the guided teacher, lam = 2.0 is CFG over the fake score's two
    branches, and the real score is affine in lam in between (0.75: 37.5% of the way)."""
    data = GaussianMixture()
    fake = FakeScore(data)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        fake.net[-1].weight.copy_(0.5 * torch.randn(fake.net[-1].weight.shape, generator=g, dtype=DTYPE))
    x = torch.randn(32, 2, generator=g, dtype=DTYPE)
    labels = torch.randint(0, data.num_modes, (32,), generator=g)
    t = torch.randint(20, 981, (32,), generator=g)
    with torch.no_grad():
        real = {lam: real_eps(data, fake, x, t, labels, guidance, lam, AC) for lam in (0.0, 0.75, 2.0)}
        fake_c, fake_u = fake(x, t, labels, AC), fake(x, t, torch.full_like(labels, data.num_modes), AC)
    assert torch.equal(real[0.0], data.guided_eps(x, t, labels, guidance, AC))
    assert torch.allclose(real[2.0], fake_u + guidance * (fake_c - fake_u), rtol=1e-10, atol=1e-12)
    assert (real[2.0] - real[0.0]).abs().max() > 1e-2
    assert torch.allclose(real[0.75], real[0.0] + 0.375 * (real[2.0] - real[0.0]), rtol=1e-10, atol=1e-12)


def test_the_training_loop_feeds_the_dynadg_scale_to_the_real_score(monkeypatch):
    """E10 in the loop, as dmdr.py's: each iteration's real score runs at lam = dynadg_scale(it)."""
    seen = []

    def spy(data, fake, x, t, labels, guidance, lam, *args, **kwargs):
        seen.append(lam)
        return real_eps(data, fake, x, t, labels, guidance, lam, *args, **kwargs)
    monkeypatch.setattr(toy.dmdr, "real_eps", spy)
    data = GaussianMixture()
    cfg = ToyDMDRConfig(steps=1, iters=3, batch=8, total_steps=4)
    train_dmdr(data, EpsMLP(data.num_modes, hidden=16, emb=8), cfg, seed=0)
    assert seen == [pytest.approx(dynadg_scale(i, 0.75, 4)) for i in range(3)] and seen[2] < seen[0]


def test_backward_simulation_sees_the_sampler_states():
    """The trained step at k = K - 1 starts from exactly the state `generate` reaches (same noise draws)."""
    data = GaussianMixture()
    model = pretrain_student(data, steps=300, batch=256, hidden=64)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    labels = torch.arange(32) % data.num_modes
    out = generate(model, z, labels, 4, generator=torch.Generator().manual_seed(7))
    x_K, t_K = backward_simulate(model, z, labels, 4, torch.full((32,), 3), torch.Generator().manual_seed(7))
    assert torch.all(t_K == 249)
    with torch.no_grad():
        torch.testing.assert_close(predict_x0(model, x_K, t_K, labels, AC), out, rtol=0, atol=1e-12)
    assert torch.equal(out, generate(model, z, labels, 4, generator=torch.Generator().manual_seed(7)))


def test_gaussian_fake_starts_as_the_teacher_and_fitted_to_data_is_the_exact_score():
    """The diagnostic oracle of toy/fake_study.py: before any fit it is the data's eps (a zero LoRA); fitted to
    exact data samples it is the data's eps up to the sampling error of the moments (n = 40000: ~1%)."""
    data = GaussianMixture()
    fake = GaussianFake(data)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g, dtype=DTYPE)
    labels = torch.randint(0, data.num_modes, (256,), generator=g)
    t = torch.randint(20, 981, (256,), generator=g)
    assert torch.equal(fake(x, t, labels, AC), data.eps(x, t, labels, AC))
    fake.fit(*data.sample(40000, generator=g))
    delta = fake.delta(x, t, labels, AC)
    assert 0 < delta.abs().max() < 0.05 * data.eps(x, t, labels, AC).abs().max()
    shift = torch.tensor([0.0, 0.3], dtype=DTYPE)  # and it follows the samples: a shifted copy of the data
    shifted, x_data = GaussianFake(data), data.sample(40000, generator=g)
    shifted.fit(x_data[0] + shift, x_data[1])
    exact = GaussianMixture(weights=data.weights, means=data.means + shift, covs=data.covs).eps(x, t, labels, AC)
    error = lambda f: (f(x, t, labels, AC) - exact).abs().mean()
    assert error(shifted) < 0.05 * error(fake)  # the fit to the data is 0.3 off, in eps: 20x further


@pytest.mark.parametrize("samples", ["step", "final"])
def test_fake_samples_selects_which_generator_outputs_the_fake_learns(samples, monkeypatch):
    """fake_samples = final: the fake sees the generator's K-step outputs (SW2 to an independent draw of them at
    the two draws' own level, 0.017 vs 0.016-0.020); step (the method): a mix of every step's x0, here far off
    (this 300-step student's one-step x0 is poor: SW2 1.29)."""
    data = GaussianMixture()
    student = pretrain_student(data, steps=300, batch=256, hidden=64)
    seen, fit = [], GaussianFake.fit
    monkeypatch.setattr(GaussianFake, "fit", lambda self, x, labels: (seen.append((x, labels)), fit(self, x, labels)))
    cfg = ToyDMDRConfig(steps=2, iters=1, batch=2048, lr=0.0, fake="gaussian", fake_samples=samples)
    train_dmdr(data, student, cfg, seed=0)
    (x, labels), = seen
    g = torch.Generator().manual_seed(3)
    reference = generate(student, torch.randn(len(labels), 2, generator=g, dtype=DTYPE), labels, 2, generator=g)
    gap = sliced_w2(x, reference)
    assert gap < 0.04 if samples == "final" else gap > 0.5


def test_per_step_fake_keeps_one_score_per_step_and_dynadg_follows_it():
    """fake_per_step: FakeScore(steps=K) is told the step with the label. Step 0 of it is the plain fake (same
    weights, same numbers), another step is another function, and DynaDG's real score at the fake's own scale is
    the fake score of the step it is given."""
    data = GaussianMixture()
    plain, per_step = FakeScore(data), FakeScore(data, steps=2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        per_step.net[-1].weight.copy_(0.5 * torch.randn(per_step.net[-1].weight.shape, generator=g, dtype=DTYPE))
        plain.net.load_state_dict(per_step.net.state_dict())
        plain.label_emb.weight.copy_(per_step.label_emb.weight[: data.num_modes + 1])
    x = torch.randn(32, 2, generator=g, dtype=DTYPE)
    labels = torch.randint(0, data.num_modes, (32,), generator=g)
    t = torch.randint(20, 981, (32,), generator=g)
    step = torch.randint(0, 2, (32,), generator=g)
    with torch.no_grad():
        assert torch.equal(per_step(x, t, labels, AC, 0), plain(x, t, labels, AC))
        assert (per_step.delta(x, t, labels, AC, 1) - per_step.delta(x, t, labels, AC, 0)).abs().min() > 0
        real = real_eps(data, per_step, x, t, labels, 1.0, per_step.lora_scale, AC, step)
        torch.testing.assert_close(real, per_step(x, t, labels, AC, step), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("override, match", [
    (dict(rl="ppo"), "rl must be one of"), (dict(use_dmd=False), "needs an RL branch"),
    (dict(rl="grpo", batch=4), "no full GRPO group"), (dict(fake="oracle"), "fake must be"),
    (dict(fake_samples="last"), "fake_samples"), (dict(fake_per_step=True, fake="gaussian"), "fake_per_step"),
    (dict(fake_per_step=True, fake_samples="final"), "fake_per_step"),
])
def test_train_dmdr_rejects_bad_config_before_training(override, match):
    with pytest.raises(ValueError, match=match):
        train_dmdr(GaussianMixture(), None, ToyDMDRConfig(**override))


# ---------------------------------------------------------------------------------------------------
# Seeded learning tests (margins: see the numbers over seeds 0-2 in the comments)
# ---------------------------------------------------------------------------------------------------
def test_grpo_and_dpo_groups_share_label_and_state(monkeypatch):
    """The G members of a GRPO group (the 2 of a DPO pair) start from one state, label and time: the first
    batch // G final-step states, each repeated G times in a row."""
    seen, step = [], toy.dmdr.stochastic_x0_step

    def spy(model, x, t, labels, ac, generator=None, prev_sample=None):
        if prev_sample is None:
            seen.append((x.clone(), torch.as_tensor(t).clone(), labels.clone()))
        return step(model, x, t, labels, ac, generator=generator, prev_sample=prev_sample)
    monkeypatch.setattr(toy.dmdr, "stochastic_x0_step", spy)
    data = GaussianMixture()
    model = EpsMLP(data.num_modes).to(DTYPE)
    for rl, group in (("grpo", 4), ("dpo", 2)):
        seen.clear()
        cfg = toy.dmdr.ToyDMDRConfig(rl=rl, batch=8, group_size=4, steps=2)
        g = torch.Generator().manual_seed(0)
        x_K = torch.randn(8, 2, generator=g, dtype=DTYPE)
        t_K = torch.full((8,), 499)
        labels = torch.arange(8) % data.num_modes
        toy.dmdr.rl_loss(cfg, model, copy.deepcopy(model), x_K, t_K, labels, sd_alphas_cumprod(), g)
        xs, ts, ls = seen[0]
        n = 8 // group
        assert torch.equal(xs, x_K[:n].repeat_interleave(group, 0))
        assert torch.equal(ls, labels[:n].repeat_interleave(group, 0))
        assert torch.equal(ts, t_K[:n].repeat_interleave(group, 0))


def test_dpo_loss_is_against_the_reference_policy():
    """Rl_loss's DPO term by hand: sample the stochastic last step with the generator, rank each pair by
    reward, score both samples under the generator and under the reference (a different network)."""
    data = GaussianMixture()
    torch.manual_seed(0)
    model, ref = EpsMLP(data.num_modes).to(DTYPE), EpsMLP(data.num_modes).to(DTYPE)
    ac = sd_alphas_cumprod()
    cfg = toy.dmdr.ToyDMDRConfig(rl="dpo", batch=8, dpo_beta=0.05)
    x_K = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    t_K, labels = torch.full((8,), 249), torch.arange(8) % data.num_modes
    loss = toy.dmdr.rl_loss(cfg, model, ref, x_K, t_K, labels, ac, torch.Generator().manual_seed(2))
    xs, ts, ls = (v[:4].repeat_interleave(2, 0) for v in (x_K, t_K, labels))
    sample, lp = toy.dmdr.stochastic_x0_step(model, xs, ts, ls, ac, generator=torch.Generator().manual_seed(2))
    _, lp_ref = toy.dmdr.stochastic_x0_step(ref, xs, ts, ls, ac, prev_sample=sample)
    order = toy.dmdr.toy_reward(sample).reshape(4, 2).argsort(-1, descending=True)
    ratio = (lp - lp_ref).reshape(4, 2).gather(1, order)
    expected = -torch.nn.functional.logsigmoid(0.05 * (ratio[:, 0] - ratio[:, 1])).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert abs(expected.item() - math.log(2)) > 1e-6  # the reference matters: not the log 2 of a zero log-ratio


def test_fake_delta_is_sqrt_abar_times_the_net():
    """FakeScore.delta = sqrt(abar_t) * net(x, t, c), so its x0 correction -sqrt(1 - abar_t) * delta /
    sqrt(abar_t) is O(net) at every t. With the net's last layer a constant b, delta = sqrt(abar_t) * b."""
    data = GaussianMixture()
    fake = toy.dmdr.FakeScore(data)
    ac = sd_alphas_cumprod()
    with torch.no_grad():
        fake.net[-1].bias.copy_(torch.tensor([0.3, -0.2], dtype=DTYPE))
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    t = torch.tensor([999, 800, 500, 200, 20, 0])
    labels = torch.arange(6) % data.num_modes
    expected = ac[t].sqrt().unsqueeze(-1) * torch.tensor([0.3, -0.2], dtype=DTYPE)
    torch.testing.assert_close(fake.delta(x, t, labels, ac), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fake(x, t, labels, ac), data.eps(x, t, labels, ac) + expected, rtol=1e-12, atol=1e-12)


def test_fake_score_adam_has_no_momentum(monkeypatch):
    """The fake delta's Adam runs with beta1 = 0 (module docstring: momentum only adds lag to a moving
    target). Check the optimiser train_dmdr builds for the FakeScore's parameters."""
    made, Adam = [], torch.optim.Adam

    def spy(params, **kw):
        params = list(params)
        made.append((params, kw))
        return Adam(params, **kw)
    monkeypatch.setattr(torch.optim, "Adam", spy)
    data = GaussianMixture()
    cfg = toy.dmdr.ToyDMDRConfig(steps=1, iters=1, batch=8, fake_updates=1, fake_draws=1)
    toy.dmdr.train_dmdr(data, EpsMLP(data.num_modes).to(DTYPE), cfg)
    fake = [kw for params, kw in made if params[0].shape == (toy.dmdr.FakeScore(data).label_emb.weight.shape)]
    assert len(made) == 2 and len(fake) == 1
    assert fake[0]["lr"] == cfg.fake_lr and tuple(fake[0].get("betas", (0.9, 0.999)))[0] == 0.0


def test_dynars_with_no_horizon_is_uniform_from_the_start():
    """E11 with S = 0 has no cold start: c = 0, so Beta(1, 1) (uniform renoise times) at every step."""
    for step in (0, 1, 50):
        assert toy.dmdr.dynars_beta(step, 4.0, 1.5, 0) == (1.0, 1.0)
    t = toy.dmdr.sample_renoise_timesteps(4000, 0, 4.0, 1.5, 0, generator=torch.Generator().manual_seed(0))
    assert abs(t.double().mean().item() - 500) < 15  # uniform on [20, 980]; Beta(4, 1.5) would give ~718


def test_dynars_reaches_uniform_renoise_times_for_the_fake_loss(monkeypatch):
    """E11 also sets the fake score's renoise times (train_dmdr), and from iteration S = total_steps on they are
    Beta(1, 1): uniform on [20, 980], mean 500 (s.e. ~12 over 512 draws), not Beta(4, 1.5)'s ~718 of iteration 0."""
    data = GaussianMixture()
    student = pretrain_student(data, steps=20, batch=64, hidden=32)
    cfg = toy.dmdr.ToyDMDRConfig(steps=2, iters=3, total_steps=2, batch=64, fake_draws=8, fake_updates=1)
    draws, draw = [], toy.dmdr.sample_renoise_timesteps
    monkeypatch.setattr(toy.dmdr, "sample_renoise_timesteps",
                        lambda n, it, *a, **kw: draws.append((n, it, draw(n, it, *a, **kw))) or draws[-1][2])
    toy.dmdr.train_dmdr(data, student, cfg, seed=0)
    fake = [t.double() for n, _, t in draws if n == cfg.batch * cfg.fake_draws]
    generator = [t.double() for n, _, t in draws if n == cfg.batch]
    assert len(fake) == len(generator) == cfg.iters
    assert fake[0].mean().item() == pytest.approx(20 + 960 * 4 / 5.5, abs=40)  # iteration 0: Beta(4, 1.5)
    assert fake[-1].mean().item() == pytest.approx(500, abs=40)  # iteration S: uniform
    assert generator[-1].mean().item() == pytest.approx(500, abs=100)  # 64 draws: s.e. ~35


def sliced_w2(a, b, num_proj=128):
    theta = torch.linspace(0, math.pi, num_proj + 1, dtype=DTYPE)[:-1]
    dirs = torch.stack([theta.cos(), theta.sin()], -1)  # (P, 2)
    pa, pb = (a @ dirs.T).sort(0).values, (b @ dirs.T).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


@pytest.fixture(scope="module")
def setup():
    data = GaussianMixture()
    student = pretrain_student(data, steps=300, batch=256, hidden=64)  # same args as test_toy_redif: cached
    g = torch.Generator().manual_seed(123)
    x0, labels = data.sample(3000, generator=g)
    z = torch.randn(3000, 2, generator=g, dtype=DTYPE)

    def evaluate(model, steps):
        x = generate(model, z, labels, steps, generator=torch.Generator().manual_seed(5))
        return dict(sw2=sliced_w2(x, x0), reward=toy_reward(x).mean().item(),
                    logp=data.log_prob(x, torch.tensor(1.0, dtype=DTYPE)).mean().item())

    return data, student, evaluate


def test_fake_loss_rows_carry_their_own_samples_label_and_step(monkeypatch):
    """Each fresh generator sample enters the fake loss fake_draws times (x_gen.repeat); every one of
    those rows must carry that sample's label and, with fake_per_step, the step k that produced it."""
    data = GaussianMixture()
    init = pretrain_student(data, steps=20, batch=64)
    B, draws = 8, 4
    cfg = toy.dmdr.ToyDMDRConfig(steps=2, iters=1, batch=B, fake_draws=draws, fake_updates=2, fake_per_step=True)
    sims, noised, deltas = [], [], []
    real_sim, real_noise, real_delta = toy.dmdr.backward_simulate, toy.dmdr.add_noise, toy.dmdr.FakeScore.delta
    monkeypatch.setattr(toy.dmdr, "backward_simulate",
                        lambda model, z, labels, steps, k, g: sims.append((labels.clone(), k.clone()))
                        or real_sim(model, z, labels, steps, k, g))
    monkeypatch.setattr(toy.dmdr, "add_noise", lambda x0, noise, abar: noised.append(out := real_noise(x0, noise, abar))
                        or out)

    def delta(self, x, t, labels, ac, step=0):
        deltas.append((x.detach().clone(), labels.clone(), torch.as_tensor(step).clone()))
        return real_delta(self, x, t, labels, ac, step)
    monkeypatch.setattr(toy.dmdr.FakeScore, "delta", delta)
    toy.dmdr.train_dmdr(data, init, cfg)
    labels, k = sims[0]
    fake_labels, fake_k = labels[B:2 * B], k[B:2 * B]
    x_t = next(v for v in noised if v.shape[0] == B * draws)  # the fake loss's noised samples
    rows = [d for d in deltas if d[0].shape[0] == B * draws // cfg.fake_updates]
    assert len(rows) == cfg.fake_updates
    for x, lab, step in rows:
        idx = torch.stack([(x_t == r).all(-1).nonzero()[0, 0] for r in x]) % B  # which sample each row is
        assert torch.equal(lab, fake_labels[idx]) and torch.equal(step.expand(len(idx)), fake_k[idx])
    assert fake_k.unique().numel() > 1 and fake_labels.unique().numel() > 1


def test_dmd_improves_a_poor_one_step_generator(setup):
    """K = 1 from the pretrained student (its one-step x0: a blurred mean plus 15x-amplified eps errors).
    Seeds 0 / 1 / 2: SW2 2.00 -> 0.45 / 0.56 / 0.48, mean log p_0 -233 -> -30 / -34 / -30."""
    data, student, evaluate = setup
    cfg = ToyDMDRConfig(steps=1, iters=200, batch=64, total_steps=100)
    model, history = train_dmdr(data, student, cfg, seed=0)
    init, trained = evaluate(student, 1), evaluate(model, 1)
    assert trained["sw2"] < 0.4 * init["sw2"]
    assert trained["logp"] > init["logp"] + 100
    assert set(history[0]) == {"dmd_loss", "fake_loss", "rl_loss", "reward", "dynadg_scale", "dynars_mean",
                               "grad_norm"}
    assert history[0]["dynadg_scale"] == 0.75 and history[-1]["dynadg_scale"] == 0.0
    assert history[0]["dynars_mean"] == pytest.approx(4.0 / 5.5) and history[-1]["dynars_mean"] == 0.5
    assert all(math.isfinite(h["dmd_loss"]) and math.isfinite(h["grad_norm"]) for h in history)


K, ITERS = 2, 120
QUICK = dict(steps=K, iters=ITERS, batch=64, rl_start=20, total_steps=20)  # RL weights: 2x the defaults (a
# short run; the defaults are sized for ~300 RL iterations)


@pytest.fixture(scope="module")
def runs(setup):
    """K = 2, seed 0. Seeds 0 / 1 / 2 (init: reward 0.145, SW2 0.138, mean log p_0 -2.6), reward and SW2:
    DMD 0.21 / 0.08 / 0.19, 0.21 / 0.21 / 0.18; ReFL 0.31 / 0.21 / 0.30, 0.23 / 0.20 / 0.20;
    DPO 0.37 / 0.33 / 0.37, 0.26 / 0.23 / 0.23; GRPO 0.32 / 0.26 / 0.31, 0.24 / 0.21 / 0.21;
    RL only 1.73 / 1.74 / 1.73, 1.13 / 1.13 / 1.12 (log p_0 -90 / -89 / -89)."""
    data, student, evaluate = setup
    out = {"init": evaluate(student, K)}
    for name, kw in [("dmd", dict(rl="none")), ("refl", dict(rl="refl", rl_weight=0.12)),
                     ("dpo", dict(rl="dpo", rl_weight=0.5)), ("grpo", dict(rl="grpo", rl_weight=0.01)),
                     ("rl_only", dict(rl="refl", use_dmd=False))]:
        model, _ = train_dmdr(data, student, ToyDMDRConfig(**QUICK, **kw), seed=0)
        out[name] = evaluate(model, K)
    return out


def test_rl_alone_hacks_the_reward_off_the_data(runs):
    init, rl = runs["init"], runs["rl_only"]
    assert rl["reward"] > init["reward"] + 1.0
    assert rl["sw2"] > 4 * init["sw2"] and rl["logp"] < init["logp"] - 40


def test_dmd_alone_stays_at_the_teacher_reward(runs):
    assert abs(runs["dmd"]["reward"] - runs["init"]["reward"]) < 0.15
    assert runs["dmd"]["sw2"] < 2.5 * runs["init"]["sw2"]


@pytest.mark.parametrize("rl", ["refl", "dpo", "grpo"])
def test_dmdr_raises_reward_and_stays_on_the_data(runs, rl):
    dmdr, dmd, rl_only = runs[rl], runs["dmd"], runs["rl_only"]
    assert dmdr["reward"] > dmd["reward"] + 0.05  # gains over seeds 0-2: >= +0.10 (ReFL), +0.16 (DPO), +0.11
    assert dmdr["sw2"] < 0.35 * rl_only["sw2"]
    assert dmdr["sw2"] < 1.6 * dmd["sw2"]
    assert dmdr["logp"] > rl_only["logp"] + 50
