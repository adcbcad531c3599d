"""`python -m toy.bench [--quick] [--out DIR]`: every method at K in {1, 2, 4, 8} (ReDiF's default K = 5 too).
--quick: K = 2 (and ReDiF's 5), short training.

Prints a markdown table (alignment error with the teacher from the same (label, x_T), sliced W2 and MMD to
exact data samples, mode coverage, the fraction of samples on the data's 99% region, the toy reward,
training seconds), a PPO-vs-GRPO many-epochs experiment (with the E3 reward and with a lossy "proxy" reward
whose optimum is off the teacher's output, so that there is something to over-optimise),
and a "Claims" section that checks the papers' claims against this run's numbers. Saves table.md,
results.json, a scatter grid and the PPO/GRPO curves in --out. Every method starts from the same cached
`pretrain_student` and is scored on the same held-out (label, x_T) set and the same exact teacher outputs.
"""
import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import matplotlib
import torch

from toy.baselines import consistency_distillation, consistency_sample, progressive_distillation
from toy.diffusion import (DTYPE, TEACHER_GUIDANCE, TEACHER_STEPS, EpsMLP, GaussianMixture, add_noise, ddim_sample,
                           pretrain_student, sd_alphas_cumprod, student_sample, teacher_sample, trailing_timesteps)
from toy.dmdr import ToyDMDRConfig, generate, toy_reward, train_dmdr
from toy.redif import ToyReDiFConfig, alignment_error, behaviour_cloning, teacher_pairs, train_redif

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class BenchConfig:
    ks: tuple = (1, 2, 4, 8)
    redif_k: int = 5  # ReDiF's default step count, benchmarked too (with the other distillation baselines)
    pretrain_steps: int = 2000  # pretrain_student's defaults
    pretrain_batch: int = 512
    eval_size: int = 2000  # held-out (label, x_T) pairs, and as many exact data samples
    bc_iters: int = 300  # E7
    pool: int = 4096  # cached teacher trajectories / outputs that BC and RL draw (label, x_T) from
    redif_iters: int = 60  # RL iterations ("epochs"); the K = 5 runs are the many-epochs experiment
    stress_lr: float = 3e-5  # many-epochs experiment, second setting: 10x the lr and 4 inner epochs
    stress_inner_epochs: int = 4
    pd_iters_per_stage: int = 200
    cd_iters: int = 1500
    dmdr: dict = dataclasses.field(default_factory=dict)  # ToyDMDRConfig overrides; {}: its own defaults
    plot_k: int = 2
    mmd_bandwidth: float = 0.5  # our choice: about two mode widths
    coverage_share: float = 0.5  # a mode is covered if it gets >= half its data share of the samples
    seed: int = 0


QUICK = BenchConfig(ks=(2,), redif_k=5, pretrain_steps=300, pretrain_batch=256, eval_size=500, bc_iters=100,
                    pool=1024, redif_iters=10, pd_iters_per_stage=40, cd_iters=200,
                    dmdr=dict(iters=100, rl_start=50, total_steps=50, batch=64))


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------
def sliced_w2(x, y, num_projections=128, seed=0):
    """Sliced Wasserstein-2 between equal-size point sets (N, 2): W2 of sorted 1D projections, RMS over
    random directions."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(2, num_projections, generator=g, dtype=DTYPE), dim=0)
    px, py = (x.to(DTYPE) @ dirs).sort(0).values, (y.to(DTYPE) @ dirs).sort(0).values  # (N, P)
    return ((px - py) ** 2).mean().sqrt().item()


def mmd_rbf(x, y, bandwidth=0.5):
    """MMD with an RBF kernel of fixed bandwidth (biased V-statistic, then sqrt)."""
    k = lambda a, b: torch.exp(-torch.cdist(a, b) ** 2 / (2 * bandwidth**2)).mean()
    return (k(x, x) + k(y, y) - 2 * k(x, y)).clamp(min=0).sqrt().item()


def mode_coverage(data, x, share=0.5):
    """Fraction of modes receiving at least `share` times their data weight of the samples."""
    counts = torch.bincount(data.mode_of(x), minlength=data.num_modes).to(DTYPE) / len(x)
    return (counts >= share * data.weights).double().mean().item()


def support_threshold(data, x_data, mass=0.99):
    """log p_0 level above which `mass` of the exact data lies (estimated on x_data)."""
    return torch.quantile(data.log_prob(x_data, torch.ones(len(x_data), dtype=DTYPE)), 1 - mass).item()


def on_support(data, x, threshold):
    """Fraction of samples inside the data's 99% region: "on the data", which a reward that prefers part
    of each mode can keep while SW2 / MMD must grow (any reward gain moves mass)."""
    return (data.log_prob(x, torch.ones(len(x), dtype=DTYPE)) >= threshold).double().mean().item()


def metrics(data, x, x_teacher, x_data, cfg):
    """reward_diff_se: s.e. of the mean reward difference to the teacher, per (label, x_T) pair. The pairs share
    their label, which holds most of the reward's variance, so this is ~10x below an unpaired s.e."""
    diff = toy_reward(x) - toy_reward(x_teacher)
    return dict(align_err=alignment_error(x, x_teacher), sw2=sliced_w2(x, x_data),
                mmd=mmd_rbf(x, x_data, cfg.mmd_bandwidth), coverage=mode_coverage(data, x, cfg.coverage_share),
                on_support=on_support(data, x, support_threshold(data, x_data)),
                reward=toy_reward(x).mean().item(), reward_diff_se=(diff.std() / math.sqrt(len(x))).item())


# ---------------------------------------------------------------------------------------------------
# Training every method
# ---------------------------------------------------------------------------------------------------
def cached_student_init(data, cfg, out):
    """pretrain_student is the slowest piece (minutes on a busy CPU): cache it in --out."""
    path = os.path.join(out, f"student_init_steps{cfg.pretrain_steps}_batch{cfg.pretrain_batch}_seed{cfg.seed}.pt")
    if os.path.exists(path):
        model = EpsMLP(data.num_modes)
        model.load_state_dict(torch.load(path))
        return model.requires_grad_(False).eval(), 0.0
    start = time.time()
    model = pretrain_student(data, steps=cfg.pretrain_steps, batch=cfg.pretrain_batch, seed=cfg.seed)
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return model, time.time() - start


def timed(fn, *args, **kwargs):
    start = time.time()
    result = fn(*args, **kwargs)
    return result, time.time() - start


def seeded(seed=1):
    return torch.Generator().manual_seed(seed)  # fresh noise of stochastic samplers, same for every method


def teacher_consistency_sample(data, x_T, labels, steps, generator):
    """consistency_sample's loop with a perfect consistency model: the teacher's own ODE (its DDIM from t down its
    grid) as f. Its fresh renoising noise takes it off the teacher's output from the same x_T at K >= 2: the floor
    of CD's alignment error on that sampler, whatever the distillation (0 at K = 1)."""
    ac, teacher_grid = sd_alphas_cumprod(), trailing_timesteps(TEACHER_STEPS)

    def f(x, t):
        grid = torch.cat([teacher_grid.new_tensor([t]), teacher_grid[teacher_grid < t]])
        return ddim_sample(lambda z, s: data.guided_eps(z, s, labels, TEACHER_GUIDANCE, ac), x, grid, ac)
    grid = trailing_timesteps(steps).tolist()
    x = f(x_T, grid[0])
    for t in grid[1:]:
        x = f(add_noise(x, torch.randn(x.shape, generator=generator, dtype=x.dtype), ac[t]), t)
    return x


def train_all(data, init, cfg, log=print):
    """-> samplers {(method, K): (sample_fn(x_T, labels) -> x0, train_seconds)}, ReDiF histories {(algo, K)}."""
    samplers, histories = {}, {}
    cd, cd_s = timed(consistency_distillation, data, init, iters=cfg.cd_iters, seed=cfg.seed)
    log(f"  CD trained once for every K ({cd_s:.1f}s)")
    for K in sorted(set(cfg.ks) | {cfg.redif_k}):
        samplers["teacher K-step DDIM", K] = (lambda x, l, K=K: teacher_sample(data, x, l, steps=K), 0.0)
        samplers["student init", K] = (lambda x, l, K=K: student_sample(init, x, l, K), 0.0)
        pd, pd_s = timed(progressive_distillation, data, init, K, cfg.pd_iters_per_stage, seed=cfg.seed)
        samplers["PD", K] = (lambda x, l, m=pd, K=K: student_sample(m, x, l, K), pd_s)
        samplers["CD", K] = (lambda x, l, K=K: consistency_sample(cd, x, l, K, seeded()), cd_s)
        samplers["CD floor (teacher as f)", K] = (lambda x, l, K=K: teacher_consistency_sample(data, x, l, K, seeded()),
                                                  0.0)  # the same renoising noise as CD's row
        bc, bc_s = timed(behaviour_cloning, data, init, K, cfg.bc_iters, pool=cfg.pool, seed=cfg.seed)
        samplers["ReDiF BC only (E7)", K] = (lambda x, l, m=bc, K=K: student_sample(m, x, l, K), bc_s)
        for algo in ("grpo", "ppo"):
            rcfg = ToyReDiFConfig(steps=K, algo=algo, iters=cfg.redif_iters, bc_iters=0, pool=cfg.pool)  # from bc
            (model, hist), rl_s = timed(train_redif, data, bc, rcfg, seed=cfg.seed)
            samplers[f"ReDiF-{algo.upper()}", K] = (lambda x, l, m=model, K=K: student_sample(m, x, l, K), bc_s + rl_s)
            histories[algo, K] = hist
            if K == cfg.redif_k:  # the many-epochs experiment's stress setting (not in the table)
                scfg = dataclasses.replace(rcfg, lr=cfg.stress_lr, inner_epochs=cfg.stress_inner_epochs)
                histories[algo + "-stress", K] = train_redif(data, bc, scfg, seed=cfg.seed)[1]
                for suffix, c in (("-proxy", rcfg), ("-proxy-stress", scfg)):  # the same, on the lossy proxy
                    pcfg = dataclasses.replace(c, reward="proxy")
                    histories[algo + suffix, K] = train_redif(data, bc, pcfg, seed=cfg.seed)[1]
        if K in cfg.ks:  # DMD's own starting point: the init run with the generator's sampler, unguided
            samplers["DMD init (no CFG)", K] = (lambda x, l, K=K: generate(init, x, l, K, generator=seeded()), 0.0)
            for name, rl, use_dmd in (("DMD (no RL)", "none", True), ("RL only (ReFL)", "refl", False),
                                      ("DMDR (DMD+ReFL)", "refl", True)):
                dcfg = ToyDMDRConfig(steps=K, rl=rl, use_dmd=use_dmd, **cfg.dmdr)
                (model, _), s = timed(train_dmdr, data, init, dcfg, seed=cfg.seed)
                samplers[name, K] = (lambda x, l, m=model, K=K: generate(m, x, l, K, generator=seeded()), s)
        log(f"  K={K} trained")
    return samplers, histories


def eval_references(data, cfg):
    """The held-out (label, x_T) pairs, the teacher's outputs for them, and two exact data draws with the pairs'
    labels: a label count of their own would add the same mismatch to every method's SW2 and MMD (data vs data
    SW2 0.086 +- 0.035 over 12 unmatched draws). -> labels, x_T, x_teacher, x_data, x_data2."""
    labels, x_T, x_teacher = teacher_pairs(data, cfg.eval_size, 777)
    x_data, _ = data.sample(cfg.eval_size, labels=labels, generator=seeded(778))
    x_data2, _ = data.sample(cfg.eval_size, labels=labels, generator=seeded(779))
    return labels, x_T, x_teacher, x_data, x_data2


def evaluate(data, samplers, cfg):
    """One row per (method, K), all on the same held-out pairs and the same exact teacher outputs."""
    labels, x_T, x_teacher, x_data, x_data2 = eval_references(data, cfg)
    rows = [dict(method="data (2nd draw)", K=0, train_s=0.0, **metrics(data, x_data2, x_teacher, x_data, cfg)),
            dict(method="teacher 50-step", K=50, train_s=0.0, **metrics(data, x_teacher, x_teacher, x_data, cfg))]
    samples = {}
    for (method, K), (sample_fn, seconds) in samplers.items():
        samples[method, K] = x = sample_fn(x_T, labels)
        rows.append(dict(method=method, K=K, train_s=seconds, **metrics(data, x, x_teacher, x_data, cfg)))
    return rows, samples, (labels, x_teacher, x_data)


# ---------------------------------------------------------------------------------------------------
# Report: table, claims, pictures
# ---------------------------------------------------------------------------------------------------
def format_table(rows):
    lines = ["| K | method | align err | SW2 | MMD | coverage | on support | toy reward | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["K"] if r["K"] > 0 else -1)):
        align = "-" if r["method"].startswith("data") else f"{r['align_err']:.4f}"  # no x_T behind data samples
        lines.append(f"| {r['K'] if r['K'] else '-'} | {r['method']} | {align} | {r['sw2']:.4f} | {r['mmd']:.4f} | "
                     f"{r['coverage']:.2f} | {r['on_support']:.2f} | {r['reward']:+.3f} | {r['train_s']:.1f} |")
    return "\n".join(lines)


def epochs_summary(hist):
    errs = [h["heldout_align_err"] for h in hist]
    best = min(range(len(errs)), key=errs.__getitem__)
    jitter = sum(abs(b - a) for a, b in zip(errs, errs[1:])) / max(len(errs) - 1, 1)  # mean |change| per epoch
    return dict(first=errs[0], best=errs[best], best_iter=best, final=errs[-1], jitter=jitter)  # [0]: the RL start


def proxy_summary(hist, rule=0.2):
    """Over-optimisation of the proxy: its held-out value ends above its start while the held-out alignment
    error ends > (1 + rule) x its best; onset = first epoch whose error exceeds (1 + rule) x the best so far
    (epoch 0, the RL start, included)."""
    errs, proxy = [h["heldout_align_err"] for h in hist], [h["heldout_reward"] for h in hist]
    best = [min(errs[: i + 1]) for i in range(len(errs))]
    onset = next((i for i, (e, b) in enumerate(zip(errs, best)) if e > (1 + rule) * b), None)
    degrade = (errs[-1] - best[-1]) / best[-1]
    return dict(proxy_first=proxy[0], proxy_final=proxy[-1], err_first=errs[0], err_best=best[-1],
                err_final=errs[-1], degrade=degrade, onset=onset, over=proxy[-1] > proxy[0] and degrade > rule)


def proxy_claim(histories, cfg):
    """PPO over-optimises more (error growth > 1.5x GRPO's) or earlier (onset >= 5 epochs before) than GRPO
    on the lossy proxy reward, in each setting."""
    K, verdicts, evidence = cfg.redif_k, [], []
    for setting, suffix in (("default", "-proxy"), ("stress", "-proxy-stress")):
        s = {a: proxy_summary(histories[a + suffix, K]) for a in ("grpo", "ppo")}
        g, p = s["grpo"], s["ppo"]
        earlier = p["onset"] is not None and (g["onset"] is None or p["onset"] <= g["onset"] - 5)
        worse = p["over"] and (not g["over"] or p["degrade"] > 1.5 * g["degrade"] or earlier)
        verdicts.append("PPO worse" if worse else ("both over-optimise" if p["over"] and g["over"] else
                                                   "GRPO only" if g["over"] else "neither"))
        evidence.append(f"{setting}: " + ", ".join(
            f"{a.upper()} proxy {v['proxy_first']:.5f} -> {v['proxy_final']:.5f}, align err {v['err_first']:.4f} "
            f"-> best {v['err_best']:.4f} -> final {v['err_final']:.4f} ({100 * v['degrade']:+.0f}% vs best, onset "
            f"epoch {v['onset'] or '-'})" for a, v in s.items()))
    n = verdicts.count("PPO worse")
    verdict = "REPRODUCED" if n == 2 else "PARTLY" if n else f"NOT REPRODUCED ({' / '.join(verdicts)})"
    return (f"... and with a lossy proxy reward (optimum off the teacher's output), PPO over-optimises more or earlier "
            f"than GRPO over {cfg.redif_iters} epochs (K={K}; rule: proxy up, final error > 1.2x best; PPO's growth "
            f"> 1.5x GRPO's or onset >= 5 epochs earlier)", verdict, "; ".join(evidence))


def check_claims(rows, histories, cfg):
    """Each claim: (claim, verdict, evidence), verdicts computed from this run's numbers."""
    row = {(r["method"], r["K"]): r for r in rows}
    claims = []

    ks = sorted(set(cfg.ks) | {cfg.redif_k})
    # CD's multistep sampler renoises with fresh noise: from K = 2 on even a perfect CD model (the floor row) is off
    # the teacher's output from the same x_T, so only K = 1 measures CD's distillation on this metric
    rivals = {K: ("PD", "CD") if K == 1 else ("PD",) for K in ks}
    wins = {K: [row["ReDiF-GRPO", K]["align_err"] < row[b, K]["align_err"] for b in rivals[K]] for K in ks}
    evidence = "; ".join(f"K={K}: ReDiF-GRPO {row['ReDiF-GRPO', K]['align_err']:.4f} (BC only "
                         f"{row['ReDiF BC only (E7)', K]['align_err']:.4f}) vs PD {row['PD', K]['align_err']:.4f}, "
                         f"CD {row['CD', K]['align_err']:.4f} (its floor "
                         f"{row['CD floor (teacher as f)', K]['align_err']:.4f})"
                         for K in ks)
    n_win = sum(all(w) for w in wins.values())
    verdict = "REPRODUCED" if n_win == len(ks) else ("PARTLY" if n_win else "NOT REPRODUCED")
    claims.append(("ReDiF beats progressive distillation at the same K, and consistency distillation at K = 1 "
                   "(alignment error; CD's sampler renoises, so from K = 2 a perfect CD model scores its floor)",
                   f"{verdict} ({n_win}/{len(ks)} K)", evidence))

    sw2_wins = sum(row["ReDiF-GRPO", K]["sw2"] < min(row["PD", K]["sw2"], row["CD", K]["sw2"]) for K in ks)
    evidence = "; ".join(f"K={K}: {row['ReDiF-GRPO', K]['sw2']:.3f} vs PD {row['PD', K]['sw2']:.3f}, "
                         f"CD {row['CD', K]['sw2']:.3f}" for K in ks)
    evidence += (f" (a perfect copy of the guided teacher scores the teacher's "
                 f"{row['teacher 50-step', 50]['sw2']:.3f}, exact data {row['data (2nd draw)', 0]['sw2']:.3f})")
    claims.append(("... and on the FID analogue (sliced W2 to the data)",
                   f"{'REPRODUCED' if sw2_wins == len(ks) else 'PARTLY' if sw2_wins else 'NOT REPRODUCED'} "
                   f"({sw2_wins}/{len(ks)} K)", evidence))

    rl_gain = [row["ReDiF BC only (E7)", K]["align_err"] - row["ReDiF-GRPO", K]["align_err"] for K in ks]
    claims.append(("RL adds to behaviour cloning (ReDiF-GRPO vs its own BC init)",
                   "YES" if all(d > 0 for d in rl_gain) else ("MIXED" if any(d > 0 for d in rl_gain) else "NO"),
                   "; ".join(f"K={K}: {d:+.4f}" for K, d in zip(ks, rl_gain)) + " (positive: RL lowered the error)"))

    K = cfg.redif_k
    for setting, suffix in (("default", ""), ("stress: lr x10, 4 inner epochs", "-stress")):
        s = {algo: epochs_summary(histories[algo + suffix, K]) for algo in ("grpo", "ppo")}
        degrade = {a: (v["final"] - v["best"]) / v["best"] for a, v in s.items()}
        over = {a: degrade[a] > 0.2 for a in s}  # our rule: final held-out error > 1.2x its best = over-optimised
        verdict = {(True, False): "REPRODUCED", (True, True): "NOT REPRODUCED (both degrade)",
                   (False, True): "NOT REPRODUCED (GRPO degrades, PPO does not)",
                   (False, False): "NOT REPRODUCED (neither degrades by the rule)"}[over["ppo"], over["grpo"]]
        evidence = "; ".join(f"{a.upper()}: held-out align err {v['first']:.4f} -> best {v['best']:.4f} (epoch "
                             f"{v['best_iter']}) -> final {v['final']:.4f} ({100 * degrade[a]:+.0f}% vs best; "
                             f"mean |change| per epoch {v['jitter']:.4f})"
                             for a, v in s.items())
        claims.append((f"GRPO stays stable where PPO over-optimises over {cfg.redif_iters} epochs (K={K}, {setting}; "
                       "rule: final > 1.2x best)", verdict, evidence))

    claims.append(proxy_claim(histories, cfg))

    teacher = row["teacher 50-step", 50]
    tol = lambda r: 2 * r["reward_diff_se"]  # 2 s.e. of the paired difference to the teacher
    capped = [row["DMD (no RL)", K]["reward"] <= teacher["reward"] + tol(row["DMD (no RL)", K]) for K in cfg.ks]
    claims.append(("Distillation alone (DMD) is capped by the teacher's reward (rule: DMD <= teacher + 2 paired "
                   "s.e.)", f"{'REPRODUCED' if all(capped) else 'NOT REPRODUCED'} ({sum(capped)}/{len(capped)} K)",
                   f"teacher {teacher['reward']:+.3f} (DMD's own target, the unguided data: "
                   f"{row['data (2nd draw)', 0]['reward']:+.3f}); DMD " + ", ".join(
                       f"K={K} {row['DMD (no RL)', K]['reward']:+.3f} (2 s.e. {tol(row['DMD (no RL)', K]):.3f})"
                       for K in cfg.ks)))

    dmd, rl_only, dmdr = ({K: row[m, K] for K in cfg.ks} for m in ("DMD (no RL)", "RL only (ReFL)", "DMDR (DMD+ReFL)"))
    closer = [dmd[K]["mmd"] < row["DMD init (no CFG)", K]["mmd"] for K in cfg.ks]
    claims.append(("DMD brings its generator closer to the data than where it started (rule: MMD below the init's, "
                   "both on the generator's sampler without CFG)",
                   f"{'YES' if all(closer) else 'MIXED' if any(closer) else 'NO'} ({sum(closer)}/{len(closer)} K)",
                   "; ".join(f"K={K}: MMD {dmd[K]['mmd']:.4f} vs init {row['DMD init (no CFG)', K]['mmd']:.4f} "
                             f"(SW2 {dmd[K]['sw2']:.3f} vs {row['DMD init (no CFG)', K]['sw2']:.3f})"
                             for K in cfg.ks)))
    drift = [rl_only[K]["on_support"] <= dmd[K]["on_support"] - 0.2 for K in cfg.ks]
    claims.append(("RL alone drifts off the data (rule: on-support fraction >= 0.2 below DMD's)",
                   f"{'REPRODUCED' if all(drift) else 'PARTLY' if any(drift) else 'NOT REPRODUCED'} "
                   f"({sum(drift)}/{len(drift)} K)",
                   "; ".join(f"K={K}: on support RL-only {rl_only[K]['on_support']:.2f} vs DMD "
                             f"{dmd[K]['on_support']:.2f} (SW2 {rl_only[K]['sw2']:.3f} vs {dmd[K]['sw2']:.3f})"
                             for K in cfg.ks)))

    ok = [dmdr[K]["reward"] > teacher["reward"] + tol(dmdr[K]) and dmdr[K]["on_support"] >= dmd[K]["on_support"] - 0.1
          for K in cfg.ks]
    claims.append(("DMDR raises the reward above the teacher's while staying on the data (rule: reward > "
                   "teacher + 2 paired s.e., on-support fraction within 0.1 of DMD's)",
                   f"{'REPRODUCED' if all(ok) else 'PARTLY' if any(ok) else 'NOT REPRODUCED'} ({sum(ok)}/{len(ok)} K)",
                   f"teacher reward {teacher['reward']:+.3f}; " + "; ".join(
                       f"K={K}: reward {dmdr[K]['reward']:+.3f} (2 s.e. {tol(dmdr[K]):.3f}), on support "
                       f"{dmdr[K]['on_support']:.2f} vs DMD {dmd[K]['on_support']:.2f} (SW2 {dmdr[K]['sw2']:.3f} vs "
                       f"{dmd[K]['sw2']:.3f})" for K in cfg.ks)))
    return claims


def plot_scatter(data, samples, reference, cfg, path):
    labels, x_teacher, x_data = reference
    panels = [("data", x_data, data.mode_of(x_data)), ("teacher 50-step", x_teacher, labels)]
    panels += [(f"{m} (K={K})", x, labels) for (m, K), x in samples.items() if K == cfg.plot_k]
    cols, rows = 4, math.ceil(len(panels) / 4)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (title, x, c) in zip(axes.flat, panels):
        ax.scatter(x[:, 0], x[:, 1], c=c, s=2, cmap="tab10", vmin=0, vmax=9)
        ax.set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal", title=title)
        ax.title.set_fontsize(8)
        ax.set_axis_on()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_curves(histories, K, path):
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4))
    for row, (tag, reward) in enumerate((("", "E3 reward"), ("-proxy", "lossy proxy reward"))):
        for key, style in (("grpo", "C0-"), ("ppo", "C1-"), ("grpo-stress", "C0:"), ("ppo-stress", "C1:")):
            hist = histories[key.replace("-", tag + "-") if "-" in key else key + tag, K]
            axes[row, 0].plot([h["heldout_align_err"] for h in hist], style, label=key.upper())
            axes[row, 1].plot([h["heldout_reward"] for h in hist], style, label=key.upper())
        axes[row, 0].set(xlabel="epoch (0: the RL start)", ylabel="held-out alignment error", title=f"K={K}, {reward}")
        axes[row, 1].set(xlabel="epoch (0: the RL start)", ylabel=f"held-out {reward}")
        axes[row, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def epochs_table(histories, K):
    keys = ("grpo", "ppo", "grpo-stress", "ppo-stress")
    lines = ["| epoch | " + " | ".join(f"{k.upper()} align err" for k in keys) + " |", "|---" * 5 + "|"]
    n = len(histories["grpo", K])
    for i in sorted({0, 1, *range(10, n, 10), n - 1}):  # epoch 0: the RL start (the BC student)
        errs = [f"{histories[k, K][i]['heldout_align_err']:.4f}" for k in keys]
        lines.append(f"| {i} | " + " | ".join(errs) + " |")
    return "\n".join(lines)


def proxy_epochs_table(histories, K):
    keys = ("grpo-proxy", "ppo-proxy", "grpo-proxy-stress", "ppo-proxy-stress")
    lines = ["| epoch | " + " | ".join(f"{k.upper()} proxy / align err" for k in keys) + " |", "|---" * 5 + "|"]
    n = len(histories["grpo-proxy", K])
    for i in sorted({0, 1, *range(10, n, 10), n - 1}):  # epoch 0: the RL start (the BC student)
        cells = [f"{histories[k, K][i]['heldout_reward']:.5f} / {histories[k, K][i]['heldout_align_err']:.4f}"
                 for k in keys]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(cfg, out, log=print):
    """The whole benchmark; returns (rows, claims, markdown report)."""
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    data = GaussianMixture()
    start = time.time()
    init, pretrain_s = cached_student_init(data, cfg, out)
    log(f"student init: {'pretrained in %.1fs' % pretrain_s if pretrain_s else 'loaded from cache'}")
    samplers, histories = train_all(data, init, cfg, log)
    rows, samples, reference = evaluate(data, samplers, cfg)
    claims = check_claims(rows, histories, cfg)
    report = [format_table(rows), "", f"## PPO vs GRPO over {cfg.redif_iters} epochs (K={cfg.redif_k}, from the same "
              f"BC init; held-out alignment error)", "", epochs_table(histories, cfg.redif_k), "",
              "### ... with a lossy proxy reward (optimum pulled halfway to the mode's centre; held-out proxy / "
              "alignment error)", "", proxy_epochs_table(histories, cfg.redif_k)]
    report += ["", "## Claims", ""] + [f"- **{c}**: {v}. {e}." for c, v, e in claims]
    report.append(f"\n(total {time.time() - start:.0f}s, of which pretraining {pretrain_s:.0f}s)")
    report = "\n".join(report)
    plot_scatter(data, samples, reference, cfg, os.path.join(out, f"scatter_K{cfg.plot_k}.png"))
    plot_curves(histories, cfg.redif_k, os.path.join(out, "ppo_vs_grpo.png"))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), rows=rows, claims=claims,
                       histories={f"{a}_K{k}": h for (a, k), h in histories.items()}), f, indent=1)
    return rows, claims, report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="reduced run (K = 2, and 5 for ReDiF; short training), < 1 min")
    parser.add_argument("--out", default="runs/toy_bench", help="output folder (table.md, results.json, PNGs, cache)")
    args = parser.parse_args(argv)
    # The toy's tensors are tiny: a second thread buys nothing and, on a busy machine, its spin-waits cost
    # up to 10x wall time.
    torch.set_num_threads(1)
    cfg = QUICK if args.quick else BenchConfig()
    _, _, report = run(cfg, args.out)
    print(report)


if __name__ == "__main__":
    main()
