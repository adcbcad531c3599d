"""Why the toy's DMD ends no closer to the data than it started at K >= 2: its fake score, measured.

DMD's gradient (E8) is only as good as the fake score: at equilibrium it must be the score of the generator's
own outputs. This runs DMD (no RL, the bench's defaults) with five fake scores, on several seeds:
- learned / step: the method (FakeScore, trained on the trained step's x0, as DMD2's backward simulation and
  DMDR's SDXL code feed it: a mix of every step's outputs);
- gaussian / step: the exact score of per-label Gaussians fitted to those same samples (no lag, no fit error);
- gaussian / final: the same fit to the generator's final outputs only, the distribution DMD should match;
- learned / final: FakeScore trained on final outputs only;
- learned, per step / step: FakeScore told the step k too (fake_per_step, ours): one score per step's outputs.
The bench's eval pairs and metrics; reward, SW2 and MMD as mean and spread over the seeds.

    python -m toy.fake_study --ks 2 --seeds 0,1,2 --out toy_fake_study
"""
import argparse
import json
import os
import statistics
import time

import torch

from toy.bench import BenchConfig, cached_student_init, eval_references, metrics, seeded
from toy.diffusion import GaussianMixture
from toy.dmdr import ToyDMDRConfig, generate, train_dmdr

VARIANTS = [  # (fake score, the outputs it learns from, ToyDMDRConfig overrides)
    ("learned", "step", {}), ("gaussian oracle", "step", dict(fake="gaussian")),
    ("gaussian oracle", "final", dict(fake="gaussian", fake_samples="final")),
    ("learned", "final", dict(fake_samples="final")), ("learned, per step", "step", dict(fake_per_step=True)),
]
KEYS = ("reward", "sw2", "mmd")


def run(ks, seeds, out, cfg=BenchConfig(), log=print):
    """-> rows: data and init references, then one per (K, fake, samples) with a list of values per metric.
    cfg.dmdr: ToyDMDRConfig overrides, as in the bench."""
    os.makedirs(out, exist_ok=True)
    data = GaussianMixture()
    init, _ = cached_student_init(data, cfg, out)
    labels, x_T, x_teacher, x_data, x_data2 = eval_references(data, cfg)
    evaluate = lambda x: {k: v for k, v in metrics(data, x, x_teacher, x_data, cfg).items() if k in KEYS}
    rows = [dict(K=0, fake="data (2nd draw)", samples="", **{k: [v] for k, v in evaluate(x_data2).items()})]
    for K in ks:
        x = generate(init, x_T, labels, K, generator=seeded())
        rows.append(dict(K=K, fake="init", samples="", **{k: [v] for k, v in evaluate(x).items()}))
        for fake, samples, overrides in VARIANTS[:2] if K == 1 else VARIANTS:  # K = 1: one step, the final one
            row = dict(K=K, fake=fake, samples=samples, **{k: [] for k in KEYS})
            for seed in seeds:
                start = time.time()
                dcfg = ToyDMDRConfig(steps=K, **overrides, **cfg.dmdr)
                model, _ = train_dmdr(data, init, dcfg, seed=seed)
                for k, v in evaluate(generate(model, x_T, labels, K, generator=seeded())).items():
                    row[k].append(v)
                log(f"K={K} {fake}/{samples} seed {seed}: " + ", ".join(f"{k} {row[k][-1]:.4f}" for k in KEYS)
                    + f" ({time.time() - start:.0f}s)")
            rows.append(row)
    return rows


def format_table(rows):
    def cell(v):
        return f"{v[0]:.3f}" if len(v) == 1 else f"{statistics.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})"
    lines = ["| K | fake score | trained on | reward | SW2 to data | MMD to data |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['K']} | {r['fake']} | {r['samples']} | " + " | ".join(cell(r[k]) for k in KEYS) + " |"
              for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", default="2", help="step counts, comma-separated (default: 2)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated; cells give mean (min-max)")
    p.add_argument("--out", default="toy_fake_study", help="folder for table.md, results.json, the init cache")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as toy/bench.py: tiny tensors, and a second thread's spin-waits cost wall time
    ks, seeds = [int(k) for k in args.ks.split(",")], [int(s) for s in args.seeds.split(",")]
    rows = run(ks, seeds, args.out, log=lambda line: print(line, flush=True))
    table = format_table(rows)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(ks=ks, seeds=seeds, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
