"""Toy ReDiF (E3-E7), its baselines, the benchmark and the fake-score study: properties of the pure functions,
then seeded learning tests on a small pretrained student (margins measured over seeds, kept wide)."""
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from toy import baselines, bench, fake_study
from toy.baselines import (consistency_distillation, consistency_fn, consistency_sample, progressive_distillation,
                           progressive_start_steps)
from toy.diffusion import (DTYPE, EpsMLP, GaussianMixture, add_noise, ddim_sample, pretrain_student, sd_alphas_cumprod,
                           student_sample, teacher_sample, trailing_timesteps)
from toy.dmdr import ToyDMDRConfig, generate, toy_reward, train_dmdr
from toy.redif import (PerPromptStatTracker, ToyReDiFConfig, alignment_error, alignment_reward, behaviour_cloning,
                       clipped_surrogate, gaussian_kl, grpo_advantages, semantic_embed, teacher_grid_steps,
                       teacher_pairs, teacher_states, train_redif)

FAST = settings(max_examples=40, deadline=None)
finite = st.floats(-1e3, 1e3, allow_nan=False)


def groups(min_size=2):
    """Reward arrays (num_groups, G) with values on a grid, so spreads are never rounding-level."""
    return st.integers(1, 6).flatmap(lambda n: st.integers(min_size, 10).flatmap(
        lambda g: st.lists(st.lists(st.integers(-1000, 1000), min_size=g, max_size=g), min_size=n, max_size=n)))


# ---------------------------------------------------------------------------------------------------
# E4: GRPO advantages
# ---------------------------------------------------------------------------------------------------
@FAST
@given(groups(), st.floats(1e-2, 10.0))
def test_grpo_advantages_zero_mean_unit_std_per_group(values, scale):
    rewards = torch.tensor(values, dtype=DTYPE) * scale
    adv = grpo_advantages(rewards)
    spread = rewards.std(1, correction=0)
    assert torch.allclose(adv.mean(1), torch.zeros(len(adv), dtype=DTYPE), atol=1e-9)
    varied = spread > 0
    expected_std = spread / (spread + 1e-4)  # E4's eps: unit std up to eps / std
    assert torch.allclose(adv.std(1, correction=0)[varied], expected_std[varied], atol=1e-9)
    assert (adv[~varied] == 0).all()


@FAST
@given(groups(), st.floats(1e-2, 1e2), st.floats(-1e3, 1e3))
def test_grpo_advantages_invariant_under_positive_affine_maps(values, a, b):
    rewards = torch.tensor(values, dtype=DTYPE)
    exact = grpo_advantages(rewards, eps=0.0)
    assert torch.allclose(grpo_advantages(a * rewards + b, eps=0.0), exact, atol=1e-7)
    # with the default eps the map changes only the factor std / (std + eps)
    spread = (a * rewards + b).std(1, correction=0, keepdim=True)
    assert torch.allclose(grpo_advantages(a * rewards + b), exact * spread / (spread + 1e-4), atol=1e-7)


@FAST
@given(finite, st.integers(1, 16), st.integers(1, 4))
def test_grpo_advantages_exactly_zero_for_equal_rewards(value, group_size, num_groups):
    adv = grpo_advantages(torch.full((num_groups, group_size), value, dtype=DTYPE))
    assert (adv == 0).all() and torch.isfinite(adv).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_grpo_advantages_reject_non_finite_rewards(bad):
    rewards = torch.tensor([[0.1, 0.2, bad]], dtype=DTYPE)
    with pytest.raises(ValueError, match="non-finite rewards"):
        grpo_advantages(rewards)
    with pytest.raises(ValueError, match="non-finite rewards"):
        PerPromptStatTracker().update([0, 0, 0], rewards[0])


def test_grpo_advantages_need_groups():
    with pytest.raises(ValueError, match="num_groups, G"):
        grpo_advantages(torch.zeros(4, dtype=DTYPE))


# ---------------------------------------------------------------------------------------------------
# PPO's per-prompt statistics
# ---------------------------------------------------------------------------------------------------
def test_stat_tracker_uses_batch_stats_until_min_count_then_its_buffer():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    rewards = torch.tensor([1.0, 2.0, 10.0, 20.0], dtype=DTYPE)
    # each key has 2 < 3 rewards: normalised with the batch's mean and std
    adv = tracker.update(["a", "a", "b", "b"], rewards)
    assert torch.allclose(adv, (rewards - rewards.mean()) / (rewards.std(correction=0) + 1e-6))
    # "a" now has 4 rewards (1, 2, 3, 5): its own buffer; "b" gets 1 more (3 in all, = min_count): its buffer
    adv = tracker.update(["a", "a", "b"], torch.tensor([3.0, 5.0, 30.0], dtype=DTYPE))
    buf_a, buf_b = torch.tensor([1.0, 2, 3, 5], dtype=DTYPE), torch.tensor([10.0, 20, 30], dtype=DTYPE)
    expected_a = (torch.tensor([3.0, 5.0], dtype=DTYPE) - buf_a.mean()) / (buf_a.std(correction=0) + 1e-6)
    assert torch.allclose(adv[:2], expected_a)
    assert torch.allclose(adv[2], (30 - buf_b.mean()) / (buf_b.std(correction=0) + 1e-6))
    # the buffer keeps only the last buffer_size rewards
    tracker.update(["a"] * 3, torch.tensor([7.0, 7.0, 7.0], dtype=DTYPE))
    assert list(tracker.stats["a"]) == [5.0, 7.0, 7.0, 7.0]


def test_stat_tracker_accepts_tensor_keys_like_lists():
    rewards = torch.randn(32, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    labels = torch.arange(32) % 3
    a = PerPromptStatTracker(min_count=4).update(labels, rewards)
    b = PerPromptStatTracker(min_count=4).update(labels.tolist(), rewards)
    assert torch.equal(a, b)
    for k in range(3):  # enough rewards per key: zero mean within each key
        assert abs(a[labels == k].mean().item()) < 1e-9


# ---------------------------------------------------------------------------------------------------
# E5: the clipped surrogate; E6: the closed-form KL
# ---------------------------------------------------------------------------------------------------
@FAST
@given(st.lists(st.tuples(st.floats(-0.95, 0.95), st.floats(-5, 5)), min_size=1, max_size=16),
       st.floats(0.01, 0.5))
def test_clipped_surrogate_is_minus_r_a_inside_the_clip_range(pairs, clip):
    u, adv = (torch.tensor(v, dtype=DTYPE) for v in zip(*pairs))
    ratio = 1 + u * clip  # strictly inside (1 - clip, 1 + clip)
    old = torch.randn(len(u), generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    log_prob = (old + ratio.log()).requires_grad_()
    loss = clipped_surrogate(log_prob, old, adv, clip)
    assert torch.allclose(loss, -(ratio * adv).mean(), atol=1e-12)
    loss.backward()
    assert torch.allclose(log_prob.grad, -ratio * adv / len(u), atol=1e-12)  # d(-rA)/dlogp = -rA


@FAST
@given(st.floats(0.01, 0.5), st.floats(1.05, 3.0), st.floats(0.1, 5.0))
def test_clipped_surrogate_has_zero_gradient_where_clipped(clip, factor, a):
    old = torch.zeros(4, dtype=DTYPE)
    # ratio above 1 + e with A > 0, or below 1 - e with A < 0: the clipped branch is the min, gradient 0
    high, low = (1 + clip) * factor, (1 - clip) / factor
    ratio = torch.tensor([high, low, high, low], dtype=DTYPE)
    adv = torch.tensor([a, -a, -a, a], dtype=DTYPE)
    log_prob = ratio.log().requires_grad_()
    clipped_surrogate(log_prob, old, adv, clip).backward()
    assert log_prob.grad[0] == 0 and log_prob.grad[1] == 0
    # ...but not where clipping would help: ratio too high with A < 0, too low with A > 0 (pessimistic bound)
    assert torch.allclose(log_prob.grad[2:], -ratio[2:] * adv[2:] / 4)


@FAST
@given(st.integers(1, 8), st.integers(1, 3), st.floats(1e-3, 2.0), st.integers(0, 1000))
def test_gaussian_kl_equals_torch(batch, dims, std_scale, seed):
    g = torch.Generator().manual_seed(seed)
    mean, ref = torch.randn(2, batch, dims, generator=g, dtype=DTYPE)
    std = std_scale * (0.5 + torch.rand(batch, 1, generator=g, dtype=DTYPE))  # per sample, like E1's sigma_k
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std.expand_as(mean)),
                                                 torch.distributions.Normal(ref, std.expand_as(ref))).mean(-1)
    assert torch.allclose(gaussian_kl(mean, ref, std), expected, rtol=1e-10)
    scalar = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std_scale),
                                               torch.distributions.Normal(ref, std_scale)).mean(-1)
    assert torch.allclose(gaussian_kl(mean, ref, std_scale), scalar, rtol=1e-10)  # a float std (an int t) too


def test_gaussian_kl_rejects_zero_std():
    with pytest.raises(ValueError, match="std > 0"):
        gaussian_kl(torch.zeros(2, 2, dtype=DTYPE), torch.ones(2, 2, dtype=DTYPE), torch.tensor([[1.0], [0.0]]))


# ---------------------------------------------------------------------------------------------------
# E3: rewards; the teacher's outputs and trajectories
# ---------------------------------------------------------------------------------------------------
def test_alignment_rewards():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g, dtype=DTYPE)
    direction = torch.nn.functional.normalize(torch.randn(256, 2, generator=g, dtype=DTYPE), dim=-1)
    assert torch.allclose(alignment_reward(x, x), torch.ones(256, dtype=DTYPE))  # unit-norm embeddings
    assert torch.equal(semantic_embed(x), semantic_embed(x.clone()))  # a fixed embedding
    previous = torch.ones(256, dtype=DTYPE)
    for d in (0.1, 0.3, 0.6):  # random Fourier features: cos ~ exp(-d^2 / (2 h^2)), h = 0.5
        r = alignment_reward(x + d * direction, x)
        assert (r < previous).float().mean() > 0.95 and abs(r.mean() - math.exp(-d**2 / 0.5)) < 0.05
        previous = r
    assert torch.allclose(alignment_reward(x + 0.3 * direction, x, "distance"), torch.full((256,), -0.3, dtype=DTYPE))
    with pytest.raises(ValueError, match="semantic"):
        alignment_reward(x, x, "clip")


def test_proxy_reward_peaks_off_the_teachers_output():
    """The lossy proxy's maximum is the teacher's point pulled toward its mode's centre, not the point itself:
    something for RL to over-optimise. Checked on a grid around each teacher point (a property of the reward)."""
    data = GaussianMixture()
    x_teacher, _ = data.sample(6, generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(-0.3, 0.3, 41, dtype=DTYPE)
    offsets = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)  # 0.015 spacing
    candidates = x_teacher[:, None] + offsets  # (6, 1681, 2)
    rewards = alignment_reward(candidates.reshape(-1, 2), x_teacher.repeat_interleave(len(offsets), 0), "proxy",
                               data.means).reshape(6, -1)
    best = candidates[torch.arange(6), rewards.argmax(1)]
    centres = data.means[torch.cdist(x_teacher, data.means).argmin(-1)]
    off = (x_teacher - centres).norm(dim=-1)
    assert ((best - x_teacher).norm(dim=-1) > 0.3 * off).all()  # the teacher's own point is not the optimum
    assert torch.allclose(best, x_teacher + 0.5 * (centres - x_teacher), atol=0.016)  # the pulled point is
    assert (rewards.max(1).values > alignment_reward(x_teacher, x_teacher, "proxy", data.means)).all()
    with pytest.raises(ValueError, match="prototypes"):
        alignment_reward(x_teacher, x_teacher, "proxy")


def test_teacher_states_lie_on_the_teacher_trajectory(data):
    labels, x_T, x0 = teacher_pairs(data, 64, 5)
    five = teacher_states(data, 64, 5, 5)  # 5 divides 50: the teacher's own run
    assert five.shape == (6, 64, 2) and torch.equal(five[0], x_T) and torch.equal(five[-1], x0)
    _, traj = teacher_sample(data, x_T, labels, return_trajectory=True)
    assert torch.equal(five[2], traj[20])  # t = 599 is the 20th state of the 50-step run
    four = teacher_states(data, 64, 5, 4)  # a 52-step run that contains 999, 749, 499, 249
    assert four.shape == (5, 64, 2) and alignment_error(four[-1], x0) < 0.01


# ---------------------------------------------------------------------------------------------------
# Learning: behaviour cloning, ReDiF, PD, CD (seeded, small student, wide margins)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    return GaussianMixture()


@pytest.fixture(scope="module")
def student(data):
    return pretrain_student(data, steps=300, batch=256, hidden=64)


@pytest.fixture(scope="module")
def held_out(data):
    return teacher_pairs(data, 256, 4321)


def error_of(sample_fn, held_out, steps):
    labels, x_T, x0 = held_out
    return alignment_error(sample_fn(x_T, labels, steps), x0)


def test_behaviour_cloning_lowers_alignment_error(data, student, held_out):
    before = error_of(lambda x, l, K: student_sample(student, x, l, K), held_out, 2)
    bc = behaviour_cloning(data, student, 2, iters=60, pool=1024)
    assert error_of(lambda x, l, K: student_sample(bc, x, l, K), held_out, 2) < 0.25 * before  # seeds 0-2: 0.08x


def test_redif_rl_alone_lowers_alignment_error(data, student, held_out):
    """GRPO without BC, so the gain is RL's own (E3-E6). This small student is far off (error ~2.7), where
    the semantic reward is flat, so the test uses the distance reward (E3's second kind); seeds 0-2 give
    0.67-0.78x the initial error after 30 iterations."""
    cfg = ToyReDiFConfig(steps=2, iters=30, lr=3e-4, eta=0.3, reward="distance", bc_iters=0, groups=16, pool=1024,
                         eval_size=128)
    before = error_of(lambda x, l, K: student_sample(student, x, l, K), held_out, 2)
    model, history = train_redif(data, student, cfg, seed=0)
    after = error_of(lambda x, l, K: student_sample(model, x, l, K), held_out, 2)
    assert after < 0.85 * before
    assert [h["iter"] for h in history] == list(range(31))
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert history[0]["heldout_align_err"] > history[-1]["heldout_align_err"]  # iter 0: the RL start
    first, last = (sum(h["reward_mean"] for h in part) / 5 for part in (history[1:6], history[-5:]))
    assert last > first + 0.2


def test_redif_quick_config_beats_init(data, student, held_out):
    cfg = ToyReDiFConfig(steps=2, iters=3, bc_iters=60, pool=1024, eval_size=128, algo="ppo")
    before = error_of(lambda x, l, K: student_sample(student, x, l, K), held_out, 2)
    model, _ = train_redif(data, student, cfg, seed=0)
    assert error_of(lambda x, l, K: student_sample(model, x, l, K), held_out, 2) < 0.25 * before  # seeds 0-2: 0.08x


def test_progressive_distillation_beats_the_untrained_student(data, student, held_out):
    assert progressive_start_steps(1) == 32 and progressive_start_steps(5) == 40 and progressive_start_steps(64) == 64
    before = error_of(lambda x, l, K: student_sample(student, x, l, K), held_out, 2)
    pd = progressive_distillation(data, student, 2, iters_per_stage=40)
    assert error_of(lambda x, l, K: student_sample(pd, x, l, K), held_out, 2) < 0.25 * before  # seeds 0-2: 0.07x


def test_consistency_distillation_beats_the_untrained_student(data, student, held_out):
    x = torch.randn(8, 2, dtype=DTYPE)
    assert torch.allclose(consistency_fn(student, x, -1, torch.zeros(8, dtype=torch.long)), x)  # f(x, end) = x
    sample = lambda m: (lambda x, l, K: consistency_sample(m, x, l, K, torch.Generator().manual_seed(1)))
    before = error_of(sample(student), held_out, 1)
    cd = consistency_distillation(data, student, iters=200)
    assert error_of(sample(cd), held_out, 1) < 0.5 * before  # seeds 0-2: 0.32x


# ---------------------------------------------------------------------------------------------------
# The benchmark, on tiny settings
# ---------------------------------------------------------------------------------------------------
def test_sliced_w2_is_zero_for_a_permutation_and_the_shift_for_a_translate():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g, dtype=DTYPE)
    assert bench.sliced_w2(x, x[torch.randperm(400, generator=g)]) == pytest.approx(0.0, abs=1e-12)
    d = torch.tensor([3.0, -4.0], dtype=DTYPE)  # each projection shifts by d.u: SW2 = sqrt(E_u (d.u)^2) ~ |d|/sqrt 2
    assert bench.sliced_w2(x, (x + d)[torch.randperm(400, generator=g)]) == pytest.approx(5 / math.sqrt(2), rel=0.15)


def test_mmd_is_zero_on_equal_sets_and_closed_form_on_two_points():
    x = torch.randn(50, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    assert bench.mmd_rbf(x, x.flip(0)) == pytest.approx(0.0, abs=1e-6)
    a, b, h = torch.zeros(3, 2, dtype=DTYPE), torch.ones(3, 2, dtype=DTYPE), 0.7  # point masses |a - b|^2 = 2 apart
    assert bench.mmd_rbf(a, b, h) == pytest.approx(math.sqrt(2 - 2 * math.exp(-2 / (2 * h**2))), rel=1e-9)


def test_mode_coverage_counts_modes_holding_share_of_their_own_weight():
    """A mode is covered when it holds at least `share` x its own data weight of the samples (the weights are not
    uniform, so a uniform share would count others): here modes 0-3 hold just above half their weight, 4-7 just
    below, and mode 0 takes the rest."""
    data, n = GaussianMixture(), 10_000
    assert data.mode_of(data.means).tolist() == list(range(data.num_modes))  # a mode's mean is its own
    counts = [math.floor(0.5 * w * n) + (5 if i < 4 else -5) for i, w in enumerate(data.weights.tolist())]
    counts[0] += n - sum(counts)
    x = data.means.repeat_interleave(torch.tensor(counts), dim=0)
    assert bench.mode_coverage(data, x, share=0.5) == 0.5
    assert bench.mode_coverage(data, x, share=0.4) == 1.0
    assert bench.mode_coverage(data, data.means[:1].expand(n, 2), share=0.5) == 1 / data.num_modes


def test_on_support_of_the_data_it_was_fitted_on_is_its_mass():
    data = GaussianMixture()
    x, _ = data.sample(4000, generator=torch.Generator().manual_seed(0))
    threshold = bench.support_threshold(data, x)
    assert bench.on_support(data, x, threshold) == pytest.approx(0.99, abs=2e-3)
    assert bench.on_support(data, torch.full((10, 2), 50.0, dtype=DTYPE), threshold) == 0.0


def untrained_student():
    torch.manual_seed(0)
    return EpsMLP(GaussianMixture().num_modes)


def test_progressive_distillation_student_lands_where_two_teacher_steps_land(monkeypatch):
    """Every PD loss: the teacher steps t -> t_mid -> t_next on the 2n grid, the student t -> t_next on the n grid."""
    calls, step = [], baselines.ddim_step
    monkeypatch.setattr(baselines, "ddim_step", lambda eps, t, t_prev, x: calls.append(
        (torch.as_tensor(t).clone(), torch.as_tensor(t_prev).clone())) or step(eps, t, t_prev, x))
    progressive_distillation(GaussianMixture(), untrained_student(), 2, iters_per_stage=1, batch=16, min_start=8)
    assert len(calls) == 3 * 2  # stages 8 -> 4 -> 2, one loss each, three steps per loss
    for stage, n in enumerate((4, 2)):
        (t1, m1), (t2, m2), (ts, ns) = calls[3 * stage:3 * stage + 3]
        fine = torch.cat([trailing_timesteps(2 * n), torch.tensor([-1])]).tolist()
        assert torch.equal(m1, t2) and torch.equal(ts, t1) and torch.equal(ns, m2)  # student: t -> t_next
        for a, b, c in zip(t1.tolist(), m1.tolist(), m2.tolist()):
            i = fine.index(a)
            assert i % 2 == 0 and fine[i + 1] == b and fine[i + 2] == c  # a step of the n grid = two of the 2n grid


def test_consistency_distillation_target_is_the_ema_of_the_student():
    """After one iteration Adam's first step has moved each weight with a gradient by lr, so the EMA target has
    moved by (1 - mu) lr (mu = 0.95), not mu lr."""
    init, lr, ema = untrained_student(), 5e-4, 0.95
    target = consistency_distillation(GaussianMixture(), init, iters=1, batch=64, lr=lr, ema=ema)
    moved = torch.cat([(a - b).abs().flatten() for a, b in zip(target.parameters(), init.parameters())])
    assert moved.max().item() == pytest.approx((1 - ema) * lr, rel=2e-2)


def test_consistency_sampling_applies_f_at_each_grid_time(monkeypatch):
    seen, f = [], baselines.consistency_fn
    monkeypatch.setattr(baselines, "consistency_fn", lambda model, x, t, labels, guidance=None: seen.append(
        int(torch.as_tensor(t).reshape(-1)[0])) or f(model, x, t, labels, guidance))
    x_T = torch.randn(4, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    consistency_sample(untrained_student(), x_T, torch.zeros(4, dtype=torch.long), 4, torch.Generator())
    assert seen == [999, 749, 499, 249]


def test_redif_held_out_error_is_the_eta0_students():
    """train_redif's heldout_align_err is the deterministic (eta 0) student's error on its held-out pairs, the
    student as deployed; training's eta would make it noisy."""
    data = GaussianMixture()
    torch.manual_seed(0)
    cfg = ToyReDiFConfig(steps=2, iters=2, bc_iters=0, groups=4, group_size=2, pool=64, eval_size=32, eta=1.0)
    init = EpsMLP(data.num_modes)
    model, history = train_redif(data, init, cfg, seed=0)
    labels, x_T, teacher = teacher_pairs(data, cfg.eval_size, 30_000)
    for h, m in ((history[0], init), (history[-1], model)):  # iter 0: the RL start, which the model moved from
        x = student_sample(m, x_T, labels, cfg.steps, cfg.guidance)
        assert h["heldout_align_err"] == pytest.approx(alignment_error(x, teacher), rel=1e-12)
    assert history[0]["heldout_align_err"] != history[-1]["heldout_align_err"]


def test_redif_kl_reference_is_the_student_as_rl_started():
    """E6's reference is the student as RL starts, fixed for the run, not the policy at each iteration's start.
    With one minibatch per iteration the KL is logged before that iteration's step: 0 in iteration 0 (the policy
    is the reference), > 0 in iteration 1 (the policy moved in iteration 0, the reference did not)."""
    data = GaussianMixture()
    torch.manual_seed(0)
    cfg = ToyReDiFConfig(steps=2, iters=2, bc_iters=0, groups=4, group_size=2, pool=64, eval_size=16, eta=1.0,
                         inner_epochs=1, minibatches=1, lr=1e-3, beta=0.01)
    _, history = train_redif(data, EpsMLP(data.num_modes), cfg, seed=0)
    assert history[1]["kl"] == 0 and history[2]["kl"] > 0  # history[0]: the RL start's held-out metrics


def bench_rows(ks, values):
    """Synthetic bench rows for check_claims: every method at every K, metrics from values[(method, K)] or base."""
    methods = ["teacher K-step DDIM", "student init", "PD", "CD", "CD floor (teacher as f)", "ReDiF BC only (E7)",
               "ReDiF-GRPO", "ReDiF-PPO", "DMD init (no CFG)", "DMD (no RL)", "RL only (ReFL)", "DMDR (DMD+ReFL)"]
    base = dict(align_err=0.5, sw2=0.5, mmd=0.5, coverage=1.0, on_support=0.9, reward=0.1, reward_diff_se=0.01,
                train_s=0.0)
    rows = [dict(method="data (2nd draw)", K=0, **base), dict(method="teacher 50-step", K=50, **base)]
    return rows + [dict(base, method=m, K=K, **values.get((m, K), {})) for m in methods for K in ks]


def claims_of(values, K=2):
    """check_claims on bench_rows(values) at K, with the same held-out histories for every ReDiF run."""
    cfg = bench.BenchConfig(ks=(K,), redif_k=K)
    hist = [dict(heldout_align_err=e, heldout_reward=r) for e, r in ((0.3, 0.1), (0.2, 0.2), (0.25, 0.3))]
    histories = {(a + s, K): hist for a in ("grpo", "ppo") for s in ("", "-stress", "-proxy", "-proxy-stress")}
    claims = bench.check_claims(bench_rows((K,), values), histories, cfg)
    return {c.split(" (")[0].split(",")[0]: v for c, v, _ in claims}


def test_bench_compares_cd_on_alignment_at_k1_only():
    """CD's multistep sampler renoises with fresh noise, so from K = 2 its alignment error has a floor no CD model
    beats: ReDiF losing to CD there does not count, losing at K = 1 does; losing to PD counts at every K."""
    claim = "ReDiF beats progressive distillation at the same K"
    for K, cd, pd, verdict in ((2, 0.1, 0.5, "REPRODUCED"), (1, 0.1, 0.5, "NOT REPRODUCED"),
                               (2, 0.5, 0.1, "NOT REPRODUCED"), (1, 0.5, 0.4, "REPRODUCED")):
        claims = claims_of({("ReDiF-GRPO", K): dict(align_err=0.3), ("CD", K): dict(align_err=cd),
                            ("PD", K): dict(align_err=pd)}, K)
        assert claims[claim] == f"{verdict} ({int(verdict == 'REPRODUCED')}/1 K)", (K, cd, pd)


def test_the_cd_floor_is_the_teacher_at_one_step_and_renoises_after():
    """teacher_consistency_sample: a perfect consistency model (the teacher's ODE from t down its own grid) gives
    the 50-step teacher's output exactly at K = 1; at K = 2 it is the teacher's ODE from 499 applied to the K = 1
    output renoised with the generator's first draw."""
    data = GaussianMixture()
    labels, x_T, x_teacher = teacher_pairs(data, 64, 5)
    torch.testing.assert_close(bench.teacher_consistency_sample(data, x_T, labels, 1, torch.Generator()), x_teacher,
                               rtol=0, atol=0)
    ac, grid = sd_alphas_cumprod(), trailing_timesteps(50)
    noise = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    x_499 = add_noise(x_teacher, noise, ac[499])
    want = ddim_sample(lambda z, s: data.guided_eps(z, s, labels, 2.0, ac), x_499,
                       torch.cat([grid.new_tensor([499]), grid[grid < 499]]), ac)
    got = bench.teacher_consistency_sample(data, x_T, labels, 2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert alignment_error(got, x_teacher) > 0.01


def test_bench_claims_read_their_rules_the_right_way_round():
    """check_claims' verdicts follow their stated rules: RL lowering the error below its BC init is "YES"; RL alone
    0.4 below DMD's on-support fraction is "REPRODUCED" drift."""
    claims = claims_of({("ReDiF-GRPO", 2): dict(align_err=0.1), ("ReDiF BC only (E7)", 2): dict(align_err=0.2),
                        ("RL only (ReFL)", 2): dict(on_support=0.5)})
    assert claims["RL adds to behaviour cloning"] == "YES"
    assert claims["RL alone drifts off the data"].startswith("REPRODUCED")


def test_bench_epochs_summary_in_closed_form():
    hist = [dict(heldout_align_err=e) for e in (0.3, 0.1, 0.2)]
    assert bench.epochs_summary(hist) == dict(first=0.3, best=0.1, best_iter=1, final=0.2, jitter=pytest.approx(0.15))


def test_bench_dmd_claims_follow_their_stated_rules():
    """Teacher reward 0.1 and 2 paired s.e. = 0.02 in every row:
    - DMD at 0.11 is within teacher + 2 s.e.: "capped" REPRODUCED; at 0.13 it is not;
    - DMD's MMD 0.3 below its init's 0.5: "closer" YES; above: NO;
    - DMDR reward 0.2 > 0.12 with on-support 0.85 >= DMD's 0.9 - 0.1: REPRODUCED; at 0.75 it is not."""
    good = claims_of({("DMD (no RL)", 2): dict(reward=0.11, mmd=0.3),
                      ("DMDR (DMD+ReFL)", 2): dict(reward=0.2, on_support=0.85)})
    assert good["Distillation alone"].startswith("REPRODUCED")
    assert good["DMD brings its generator closer to the data than where it started"].startswith("YES")
    assert good["DMDR raises the reward above the teacher's while staying on the data"].startswith("REPRODUCED")
    bad = claims_of({("DMD (no RL)", 2): dict(reward=0.13, mmd=0.7),
                     ("DMDR (DMD+ReFL)", 2): dict(reward=0.2, on_support=0.75)})
    assert bad["Distillation alone"].startswith("NOT REPRODUCED")
    assert bad["DMD brings its generator closer to the data than where it started"].startswith("NO")
    assert bad["DMDR raises the reward above the teacher's while staying on the data"].startswith("NOT REPRODUCED")


def test_bench_proxy_summary_in_closed_form():
    """Over-optimised = the proxy rose AND the final error is > 1.2x the best; either alone is not."""
    hist = lambda errs, proxy: [dict(heldout_align_err=e, heldout_reward=r) for e, r in zip(errs, proxy)]
    up_but_stable = bench.proxy_summary(hist((0.3, 0.1, 0.11), (0.1, 0.2, 0.3)))
    assert up_but_stable["degrade"] == pytest.approx(0.1) and up_but_stable["onset"] is None
    assert up_but_stable["over"] is False
    down_but_degraded = bench.proxy_summary(hist((0.3, 0.1, 0.2), (0.3, 0.2, 0.1)))
    assert down_but_degraded["degrade"] == pytest.approx(1.0) and down_but_degraded["onset"] == 2  # [0]: the start
    assert down_but_degraded["over"] is False
    assert bench.proxy_summary(hist((0.3, 0.1, 0.2), (0.1, 0.2, 0.3)))["over"] is True


def test_bench_reward_diff_se_is_the_paired_standard_error():
    """Reward_diff_se = std(R(x) - R(x_teacher)) / sqrt(N), the paired s.e. the claims' tolerance uses."""
    data, cfg = GaussianMixture(), bench.BenchConfig()
    g = torch.Generator().manual_seed(0)
    x_teacher, _ = data.sample(400, generator=g)
    shift = 0.1 * torch.randn(400, generator=g, dtype=DTYPE)
    x = x_teacher + torch.stack([torch.zeros_like(shift), shift], -1)  # the toy reward is the height y
    m = bench.metrics(data, x, x_teacher, x_teacher, cfg)
    assert m["reward_diff_se"] == pytest.approx(shift.std().item() / math.sqrt(400), rel=1e-9)
    assert m["reward"] - toy_reward(x_teacher).mean().item() == pytest.approx(shift.mean().item())


def _proxy_hist(errs, proxy):
    return [dict(heldout_align_err=e, heldout_reward=p) for e, p in zip(errs, proxy)]


def test_bench_proxy_claim_needs_ppos_onset_five_epochs_before_grpos():
    """Both over-optimise by the same amount; PPO's onset comes 2 epochs AFTER GRPO's, so PPO is not worse:
    the claim is not reproduced in either setting."""
    cfg = bench.BenchConfig(redif_k=5, redif_iters=6)
    grpo = _proxy_hist((0.3, 0.1, 0.2, 0.2, 0.2, 0.2), (0.1, 0.2, 0.3, 0.3, 0.3, 0.3))  # onset 2 ([0]: the start)
    ppo = _proxy_hist((0.3, 0.1, 0.1, 0.1, 0.2, 0.2), (0.1, 0.2, 0.3, 0.3, 0.3, 0.3))  # onset 4
    assert bench.proxy_summary(grpo)["onset"] == 2 and bench.proxy_summary(ppo)["onset"] == 4
    histories = {(a + s, 5): h for a, h in (("grpo", grpo), ("ppo", ppo)) for s in ("-proxy", "-proxy-stress")}
    _, verdict, _ = bench.proxy_claim(histories, cfg)
    assert verdict.startswith("NOT REPRODUCED") and "both over-optimise" in verdict
    early = _proxy_hist((0.3, 0.1, 0.2, 0.2, 0.2, 0.2), (0.1, 0.2, 0.3, 0.3, 0.3, 0.3))
    late = _proxy_hist((0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2), (0.1,) + (0.3,) * 8)  # onset 8 = 2 + 6
    histories = {(a + s, 5): h for a, h in (("grpo", late), ("ppo", early)) for s in ("-proxy", "-proxy-stress")}
    assert bench.proxy_claim(histories, cfg)[1] == "REPRODUCED"


def test_bench_data_reference_has_the_eval_pairs_labels():
    """The data reference x_data (SW2 / MMD / support threshold of every row) is drawn with the held-out pairs'
    labels, as x_data2 is: a label count of its own adds the same mismatch to every method's SW2 and MMD."""
    cfg = dataclasses.replace(bench.QUICK, eval_size=256)
    data = GaussianMixture()
    labels, _, _, x_data, _ = bench.eval_references(data, cfg)
    assert (data.mode_of(x_data) == labels).float().mean() > 0.95


def test_bench_trains_redif_rl_from_the_bc_student(monkeypatch):
    """The bench's ReDiF rows are BC (E7) then RL: train_redif runs with bc_iters=0 from the behaviour-cloned
    model, not from the pretrained init (which would be RL alone). Every trainer stubbed: seconds."""
    init, bc_model, calls = object(), object(), []
    monkeypatch.setattr(bench, "consistency_distillation", lambda *a, **k: "cd")
    monkeypatch.setattr(bench, "progressive_distillation", lambda *a, **k: "pd")
    monkeypatch.setattr(bench, "behaviour_cloning", lambda data, start, K, *a, **k: bc_model)
    monkeypatch.setattr(bench, "train_redif",
                        lambda data, start, rcfg, seed=0: calls.append((start, rcfg)) or ("m", []))
    monkeypatch.setattr(bench, "train_dmdr", lambda *a, **k: ("m", []))
    cfg = bench.BenchConfig(ks=(2,), redif_k=2)
    bench.train_all(GaussianMixture(), init, cfg, log=lambda *a: None)
    assert calls and all(start is bc_model and rcfg.bc_iters == 0 for start, rcfg in calls)


def test_bench_second_data_draw_is_independent_of_the_first():
    """The "data (2nd draw)" row is the noise floor of SW2 / MMD between two exact draws with the pairs'
    labels: a draw of its own (SW2 > 0), each point in its pair's mode."""
    cfg = dataclasses.replace(bench.QUICK, eval_size=256)
    data = GaussianMixture()
    labels, _, _, x_data, x_data2 = bench.eval_references(data, cfg)
    assert not torch.equal(x_data, x_data2)
    assert bench.sliced_w2(x_data, x_data2) > 0.01
    assert (data.mode_of(x_data2) == labels).float().mean() > 0.95


def test_teacher_grid_contains_the_students_and_has_at_least_50_steps():
    """Teacher_grid_steps(K) = K * ceil(50 / K): 50 where K divides 50, else the next multiple (K=4: 52,
    K=8: 56, K=3: 51), never fewer than the teacher's 50 steps; the student's grid lies inside it."""
    for k, n in ((1, 50), (2, 50), (5, 50), (4, 52), (8, 56), (3, 51), (7, 56)):
        assert teacher_grid_steps(k) == n
        assert set(trailing_timesteps(k).tolist()) <= set(trailing_timesteps(n).tolist())


def test_cd_target_is_f_ema_at_the_next_grid_time(monkeypatch):
    """CD compares f_theta(x_{t_n}, t_n) with f_ema(x_hat_{t_{n+1}}, t_{n+1}); record both calls' times."""
    calls, f = [], baselines.consistency_fn

    def spy(model, x, t, labels, guidance=None):
        calls.append((model, torch.as_tensor(t).expand(x.shape[0]).clone()))
        return f(model, x, t, labels, guidance)
    monkeypatch.setattr(baselines, "consistency_fn", spy)
    init = EpsMLP(GaussianMixture().num_modes)
    target = baselines.consistency_distillation(GaussianMixture(), init, iters=2, batch=16)
    grid = torch.cat([trailing_timesteps(50), torch.tensor([-1])]).tolist()
    assert len(calls) == 4
    for (m_target, t_target), (m_model, t_model) in zip(calls[0::2], calls[1::2]):
        assert m_target is target and m_model is not target
        for a, b in zip(t_model.tolist(), t_target.tolist()):
            assert b == grid[grid.index(a) + 1]  # the target sits one grid step later


def test_pd_each_stage_distils_a_frozen_copy_of_the_previous_student(monkeypatch):
    """From stage 2 on, the teacher is the previous stage's student, frozen: another module than the one
    being trained, with weights that do not move during the stage."""
    seen, eps = [], baselines.student_eps

    def spy(model, x, t, labels, guidance=None):
        seen.append((id(model), torch.is_grad_enabled(), next(model.parameters()).detach().clone()))
        return eps(model, x, t, labels, guidance)
    monkeypatch.setattr(baselines, "student_eps", spy)
    data = GaussianMixture()
    baselines.progressive_distillation(data, EpsMLP(data.num_modes), 8, iters_per_stage=3, batch=8, min_start=32)
    trained = [s for s in seen if s[1]]
    teacher = [s for s in seen if not s[1]]  # stage 1 (n=16) distils the exact eps: no student_eps call there
    assert len(trained) == 2 * 3 and len(teacher) == 2 * 3  # stage 2 (n=8): two teacher steps per iteration
    assert {i for i, _, _ in teacher}.isdisjoint({i for i, _, _ in trained[3:]})
    assert all(torch.equal(w, teacher[0][2]) for _, _, w in teacher)  # frozen through the stage
    assert not torch.equal(trained[3][2], trained[-1][2])  # while the student it teaches moves


def test_pd_trains_every_student_step_of_each_stage(monkeypatch):
    """Each PD stage trains the student on every step of its n-step grid, the last one (down to the end)
    included: the student steps' start times drawn in a stage cover trailing_timesteps(n)."""
    seen, eps = [], baselines.student_eps
    monkeypatch.setattr(baselines, "student_eps", lambda model, x, t, labels, guidance=None: seen.append(
        (torch.is_grad_enabled(), torch.as_tensor(t).clone())) or eps(model, x, t, labels, guidance))
    data = GaussianMixture()
    baselines.progressive_distillation(data, EpsMLP(data.num_modes), 4, iters_per_stage=2, batch=64, min_start=8)
    trained = torch.cat([t for grad, t in seen if grad]).unique().tolist()  # one stage, n = 4 (8 -> 4)
    assert sorted(trained) == sorted(trailing_timesteps(4).tolist())


def test_pd_teachers_second_step_starts_from_its_first_steps_landing(monkeypatch):
    """The PD target is two teacher DDIM steps, t -> t_mid from x_t, then t_mid -> t_next from x_mid, the first
    step's landing: the second step's epsilon is evaluated at x_mid, not again at x_t."""
    data, eps_inputs, landings = GaussianMixture(), [], []
    real_eps, real_step = data.guided_eps, baselines.ddim_step
    monkeypatch.setattr(data, "guided_eps", lambda x, t, labels, w, ac=None: eps_inputs.append(x.clone())
                        or real_eps(x, t, labels, w, ac))
    monkeypatch.setattr(baselines, "ddim_step",
                        lambda eps, t, t_prev, x: landings.append(out := real_step(eps, t, t_prev, x)) or out)
    torch.manual_seed(0)
    baselines.progressive_distillation(data, EpsMLP(data.num_modes), 4, iters_per_stage=1, batch=16, min_start=8)
    assert len(eps_inputs) == 2 and len(landings) == 3  # one stage (8 -> 4): teacher x_t, teacher x_mid, student
    x_t, x_mid = eps_inputs
    assert torch.equal(x_mid, landings[0]) and not torch.equal(x_mid, x_t)


def test_bc_pairs_each_teacher_trajectory_with_its_own_label(monkeypatch):
    """Behaviour cloning's transitions are the teacher's trajectory from (label, x_T) with that label: every
    row's x_T (its first state) and label are one teacher_pairs draw of the BC pool."""
    from toy import redif as toy_redif
    data, seen, real = GaussianMixture(), [], toy_redif.bc_loss
    monkeypatch.setattr(toy_redif, "bc_loss", lambda model, states, labels, *a, **k: seen.append((states, labels))
                        or real(model, states, labels, *a, **k))
    toy_redif.behaviour_cloning(data, pretrain_student(data, steps=20, batch=64), 2, iters=2, transitions=32, pool=64)
    pool_labels, pool_x_T, pool_x0 = toy_redif.teacher_pairs(data, 64, 10_000)
    for states, labels in seen:
        match = (states[0].unsqueeze(1) == pool_x_T.unsqueeze(0)).all(-1)  # (rows, pool)
        assert match.any(1).all()  # every x_T is one of the pool's
        idx = match.double().argmax(1)
        assert torch.equal(labels, pool_labels[idx])
        torch.testing.assert_close(states[-1], pool_x0[idx])


def test_the_surrogate_gets_each_rollouts_group_advantage_at_every_step(monkeypatch):
    """E4-E5 in train_redif. The surrogate's advantages, laid
    out (K, b) like the log-probs, hold rollout b's advantage at every step k, and that advantage is its reward
    normalised within its own group of G consecutive rollouts (same label and x_T), by hand."""
    from toy import redif as toy_redif
    data = GaussianMixture()
    student = pretrain_student(data, steps=20, batch=64, hidden=32)
    cfg = toy_redif.ToyReDiFConfig(steps=3, iters=1, groups=4, group_size=4, inner_epochs=1, minibatches=1,
                                   bc_iters=0, pool=64, eval_size=8, reward="distance", eta=0.3)
    rewards, advs, reward = [], [], toy_redif.alignment_reward
    surrogate = toy_redif.clipped_surrogate
    monkeypatch.setattr(toy_redif, "alignment_reward", lambda *a, **kw: rewards.append(reward(*a, **kw)) or rewards[-1])
    monkeypatch.setattr(toy_redif, "clipped_surrogate",
                        lambda lp, old, adv, clip: advs.append(adv.clone()) or surrogate(lp, old, adv, clip))
    toy_redif.train_redif(data, student, cfg, seed=0)
    R = rewards[1].reshape(cfg.groups, cfg.group_size)  # [0]: the RL start's held-out eval; [1]: the rollouts'
    expected = ((R - R.mean(1, keepdim=True)) / (R.std(1, unbiased=False, keepdim=True) + 1e-4)).flatten()
    adv = advs[0].reshape(cfg.steps, -1)  # (K, b): minibatches = 1, so b = all 16 rollouts, shuffled
    assert R.std(1).min() > 0  # eta > 0: the rewards differ within every group
    for k in range(1, cfg.steps):
        torch.testing.assert_close(adv[k], adv[0])  # the same rollout's advantage at every step
    torch.testing.assert_close(adv[0].sort().values, expected.sort().values.to(adv.dtype), rtol=1e-5, atol=1e-6)


def test_bench_smoke(tmp_path):
    cfg = dataclasses.replace(bench.QUICK, ks=(2,), redif_k=2, pretrain_steps=60, eval_size=128, bc_iters=10,
                              redif_iters=2, pd_iters_per_stage=5, cd_iters=10,
                              dmdr=dict(iters=6, rl_start=3, total_steps=3, batch=32))
    rows, claims, report = bench.run(cfg, str(tmp_path), log=lambda *a: None)
    methods = {r["method"] for r in rows}
    assert methods >= {"teacher K-step DDIM", "student init", "PD", "CD", "ReDiF BC only (E7)", "ReDiF-GRPO",
                       "ReDiF-PPO", "DMD init (no CFG)", "DMD (no RL)", "RL only (ReFL)", "DMDR (DMD+ReFL)",
                       "teacher 50-step"}
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("align_err", "sw2", "mmd", "coverage", "reward", "train_s")), r
    assert len(claims) == 10 and all(v.split()[0] in {"REPRODUCED", "PARTLY", "NOT", "YES", "NO", "MIXED"}
                                    for _, v, _ in claims)
    assert "## Claims" in report and (tmp_path / "table.md").exists() and (tmp_path / "scatter_K2.png").exists()
    assert [r for r in rows if r["method"] == "teacher 50-step"][0]["align_err"] == 0


def test_fake_study_runs_the_benchs_dmd_with_each_fake(tmp_path):
    """toy/fake_study.py: its learned / step row is the bench's DMD run (same init, config and eval pairs), and
    each variant row holds one value per seed."""
    cfg = dataclasses.replace(bench.QUICK, pretrain_steps=60, eval_size=128, dmdr=dict(iters=6, total_steps=3,
                                                                                   batch=32))
    rows = fake_study.run([2], [0, 1], str(tmp_path), cfg, log=lambda *a: None)
    assert [(r["K"], r["fake"], r["samples"]) for r in rows] == [(0, "data (2nd draw)", ""), (2, "init", "")] + [
        (2, f, s) for f, s, _ in fake_study.VARIANTS]
    assert all(len(r["sw2"]) == 2 for r in rows[2:])
    data = GaussianMixture()
    init, _ = bench.cached_student_init(data, cfg, str(tmp_path))
    labels, x_T, x_teacher, x_data, _ = bench.eval_references(data, cfg)
    model, _ = train_dmdr(data, init, ToyDMDRConfig(steps=2, **cfg.dmdr), seed=1)
    x = generate(model, x_T, labels, 2, generator=bench.seeded())
    assert rows[2]["sw2"][1] == bench.metrics(data, x, x_teacher, x_data, cfg)["sw2"]
    assert rows[2]["sw2"] != rows[4]["sw2"]  # the oracle fake on final outputs trains another generator
    assert "| 2 | learned | step |" in fake_study.format_table(rows)
