"""Both scripts on the SD1.5 architecture (random weights) in several settings, in one command, and one table at
the end: the GPU figures of issues 3-5.

Cases: `unet` measures this machine's per-image costs (bench/unet_rate.py), so the table gives the floor at those
costs beside the scripts' own floor at the H100 costs of issue 5; `redif-*` / `dmdr-*` run --profile (seconds per
iteration, the floor, wall / floor, peak GPU memory); `redif-train` / `dmdr-train` run a few real iterations (BC,
RL, evaluation, checkpoint, saved pipeline), then load the saved pipeline into stock diffusers and sample it in K
steps. Each case runs in its own process (a crash or an out-of-memory ends that case only) with a time limit; all
output goes to <out>/log.txt, the table to <out>/summary.md and the figures to <out>/summary.json.

    python bench/sd_profile.py --out runs/bench                  # the default cases on CUDA
    python bench/sd_profile.py --cases unet,redif-lora-gc,dmdr-lora-compile --out runs/bench
    python bench/sd_profile.py --teacher tiny --out runs/bench-tiny   # every default case on CPU: the code path
"""
import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIN_CASE_SECONDS = 60  # under --budget, a tiny case needs about this long to load its models and warm up;
# an SD-sized one twice that (each case builds ~2B random parameters on the CPU: 45 s on 2 cores, measured)
# issue 5's settings: redif group 8 (prompts_per_iter 8: 64 rollouts an iteration), dmdr batch 4 with ReFL on
BASE = {"redif.py": ["--steps", "5", "--group", "8", "--bc-iters", "0", "--profile", "2"],
        "dmdr.py": ["--steps", "4", "--rl", "refl", "--rl-start", "0", "--batch-size", "4", "--profile", "3"]}
TINY = {"redif.py": ["--device", "cpu", "--teacher-steps", "10", "--prompts-per-iter", "2", "--group", "2",
                     "--train-batch", "2", "--reward", "clip=1,dino=0.5"],
        "dmdr.py": ["--device", "cpu", "--batch-size", "2", "--fake-updates", "2"]}
CASES = {  # name: (script, flags, what it trains with LoRA: the floor's training cost)
    "redif-lora": ("redif.py", [], "lora"),
    "redif-lora-gc": ("redif.py", ["--gradient-checkpointing"], "lora"),
    "redif-lora-compile": ("redif.py", ["--compile"], "lora"),
    "redif-lora-sample64": ("redif.py", ["--sample-batch", "64"], "lora"),  # all rollouts in one sampling batch
    "redif-lora-tb8": ("redif.py", ["--train-batch", "8"], "lora"),  # 16 UNet images a call: the floor's batch
    "redif-full": ("redif.py", ["--finetune", "full"], "full"),
    "redif-full-gc": ("redif.py", ["--finetune", "full", "--gradient-checkpointing"], "full"),
    "dmdr-lora": ("dmdr.py", ["--generator", "lora"], "lora"),
    "dmdr-lora-gc": ("dmdr.py", ["--generator", "lora", "--gradient-checkpointing"], "lora"),
    "dmdr-lora-compile": ("dmdr.py", ["--generator", "lora", "--compile"], "lora"),
    "dmdr-full": ("dmdr.py", ["--generator", "full"], "full"),
    "dmdr-full-gc": ("dmdr.py", ["--generator", "full", "--gradient-checkpointing"], "full"),
}
# A short real run (BC, RL, evaluation, checkpoint, saved pipeline), whose pipeline stock diffusers then samples
TRAIN = {"redif-train": ("redif.py", ["--steps", "5", "--bc-iters", "1", "--iters", "2", "--eval-every", "0",
                                      "--eval-pairs", "4", "--prompts-per-iter", "4", "--group", "4"], "student"),
         "dmdr-train": ("dmdr.py", ["--steps", "4", "--rl", "refl", "--rl-start", "0", "--iters", "2",
                                    "--eval-every", "1", "--num-eval-prompts", "2", "--batch-size", "2",
                                    "--generator", "lora"], "generator")}
TINY_TRAIN = {"redif.py": ["--device", "cpu", "--teacher-steps", "10", "--steps", "2", "--group", "2",
                           "--prompts-per-iter", "2", "--eval-pairs", "2"],
              "dmdr.py": ["--device", "cpu", "--fake-updates", "1", "--eval-teacher-steps", "2"]}
# the stock-diffusers checks (the *-train cases) early: a tight --budget skips the last cases, not them
DEFAULT_CASES = "unet,redif-lora,dmdr-lora,redif-train,dmdr-train,dmdr-full,redif-full,redif-lora-sample64"
SAMPLE_SAVED = """import json, sys, torch
from diffusers import StableDiffusionPipeline
folder, steps, guidance, device = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
pipe = StableDiffusionPipeline.from_pretrained(folder).to(device)
image = pipe("a photo of a cat", num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
             generator=torch.Generator(device).manual_seed(0)).images
assert torch.isfinite(image).all(), "non-finite image"
print(json.dumps(dict(sampled=list(image.shape), steps=len(pipe.scheduler.timesteps),
                      timesteps=pipe.scheduler.timesteps.tolist())))
"""


def case_command(case, teacher, out):
    """-> (script, its arguments) of a case."""
    if case in TRAIN:
        script, flags, _ = TRAIN[case]
        return script, ["--teacher", teacher, *flags, *(TINY_TRAIN[script] if teacher == "tiny" else []),
                        "--out", str(out)]
    script, flags, _ = CASES[case]
    return script, ["--teacher", teacher, *BASE[script], *(TINY[script] if teacher == "tiny" else []), *flags,
                    "--out", str(out)]


def run(cmd, log, timeout):
    """Run cmd, appending its output to log -> (return code or 'timeout', seconds)."""
    clock = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return code, time.perf_counter() - clock


def sample_saved(case, run_dir, code, seconds, args, log, timeout):
    """After a TRAIN case: its last evaluation line, and stock diffusers sampling the saved pipeline in K steps."""
    script, _, folder = TRAIN[case]
    result = dict(case=case, status=f"failed ({code})", seconds=seconds)
    if code != 0:
        return result
    config = json.loads((run_dir / "config.json").read_text())
    guidance = config.get("student_guidance", 0.0)  # dmdr's generator samples without CFG
    device = "cpu" if args.teacher == "tiny" else "cuda"
    cmd = [sys.executable, "-c", SAMPLE_SAVED, str(run_dir / folder), str(config["steps"]), str(guidance), device]
    code, more = run(cmd, log, timeout)
    rows = read_metrics(run_dir)
    result.update(seconds=seconds + more, eval=train_summary(rows),
                  status=f"ok: trained, evaluated, saved; stock pipeline sampled in {config['steps']} steps"
                  if code == 0 else f"trained and saved, but stock sampling failed ({code})")
    return result


def read_metrics(run_dir):
    """metrics.jsonl's lines, without a last one cut short by a killed process."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def train_summary(rows):
    """A TRAIN case's metrics lines -> its last evaluation, plus redif's worst first-minibatch |ratio - 1| (before
    any update: sampling and training kernels disagree by that much; near --clip-range it clips the update)."""
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]  # redif: "eval" lines; dmdr: in iteration lines
    return {**(evals[-1] if evals else {}), **first_ratio_checks(rows)} or None


def first_ratio_checks(rows):
    """redif's RL lines -> the worst clipfrac_first and ratio_err_first (null where a line's value was not finite)."""
    return {f"check_{k}": max(values) for k in ("clipfrac_first", "ratio_err_first")
            if (values := [r[k] for r in rows if r.get(k) is not None])}


def image_counts(script, row):
    """The profile line's images by cost: {"forward", "train", "train lora", "vae decode"} -> count."""
    if script == "redif.py":
        return {"forward": row["unet_forward"], "train": row["unet_forward_backward"], "train lora": 0,
                "vae decode": row["vae_decode"]}
    counts = {"forward": 0, "train": 0, "train lora": 0, "vae decode": 0, "vae decode with grad": 0}
    for key, n in row["evals"].items():
        kind, grad = key.rsplit(" ", 1)
        if kind == "vae decode":  # a decode with grad (ReFL) counts as 3 decodes, as dmdr.py's floor
            counts["vae decode"] += n * (3 if grad == "fwd+bwd" else 1)
            counts["vae decode with grad"] += n * (grad == "fwd+bwd")
        elif not kind.startswith("reward"):
            counts["forward" if grad == "fwd" else "train lora" if kind == "fake score" else "train"] += n
    return counts


def floor_here(counts, costs, trains, checkpointing=False):
    """Seconds at this machine's measured eager per-image costs (bench/unet_rate.py). Gradient checkpointing
    reruns each trained forward in the backward (the VAE's too: dmdr's ReFL decode), as the scripts' floors count."""
    train = costs["train lora" if trains == "lora" else "train full"]
    trained, decodes_with_grad = counts["train"] + counts["train lora"], counts.get("vae decode with grad", 0)
    return (counts["forward"] * costs["forward"] + counts["train"] * train
            + counts["train lora"] * costs["train lora"] + counts["vae decode"] * costs["vae decode"]
            + checkpointing * (trained * costs["forward"] + decodes_with_grad * costs["vae decode"]))


def table(results, costs):
    number = lambda v, digits=2: "-" if v is None else f"{v:.{digits}f}"  # the scripts log non-finite as null
    lines = ["| case | status | s / iter | floor s / iter (H100 costs) | wall / floor | floor s / iter (here) | "
             "wall / floor here | peak GiB | UNet fwd / fwd+bwd images per iter | phases (s / iter) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "row" not in r:
            evals = ", ".join(f"{k} {v:.4g}" for k, v in (r.get("eval") or {}).items()
                              if k.startswith(("eval_", "check_")) and isinstance(v, (int, float)))
            lines.append(f"| {r['case']} | {r['status']} ({r['seconds']:.0f} s) |" + " |" * 7 + f" {evals} |")
            continue
        row, n = r["row"], r["row"]["iters"]
        here = floor_here(r["counts"], costs, r["trains"], r.get("checkpointing", False)) / n if costs else None
        phases = ", ".join([f"{k[4:]} {v / n:.2f}" for k, v in row.items() if k.startswith("sec_")]
                           + [f"{k} {v:.3g}" for k, v in r.get("checks", {}).items()])
        wall = row["wall_s"] / n
        floor = None if row["floor_s"] is None else row["floor_s"] / n
        cells = [f"{r['status']} ({r['seconds']:.0f} s)", f"{wall:.2f}", number(floor), number(row["wall_over_floor"]),
                 number(here), number(None if here is None else wall / here), number(row.get("peak_gib"), 1),
                 f"{r['counts']['forward'] // n} / {(r['counts']['train'] + r['counts']['train lora']) // n}",
                 phases]
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help=f"comma-separated, run in order: unet, {', '.join(TRAIN)}, {', '.join(CASES)}")
    parser.add_argument("--teacher", default="sd15-random", choices=["sd15-random", "tiny"],
                        help="tiny: small settings on CPU, to check the code path")
    parser.add_argument("--out", default="runs/bench", help="folder of the runs, log.txt and summary.{json,md}")
    parser.add_argument("--case-timeout", type=int, default=300, help="seconds before a case is stopped")
    parser.add_argument("--budget", type=int, default=0, help="stop every case by this many seconds from the start, "
                        f"and start none with under {MIN_CASE_SECONDS} s left, {2 * MIN_CASE_SECONDS} for "
                        "sd15-random (0: no limit)")
    parser.add_argument("--compile-unet", action="store_true", help="the unet case also times torch.compile")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c != "unet" and c not in CASES and c not in TRAIN]
    if unknown:
        raise SystemExit(f"error: unknown case {', '.join(unknown)} "
                         f"(fix: choose from unet, {', '.join(TRAIN)}, {', '.join(CASES)})")
    if args.teacher != "tiny":
        import torch  # asks the driver only: no CUDA context in this process, the cases need the memory
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA GPU here, so each sd15-random case would run on the CPU until its time "
                             "limit (fix: run it on a GPU, or --teacher tiny to check the code path on the CPU)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log, started, results, costs = out / "log.txt", time.perf_counter(), [], None
    min_left = MIN_CASE_SECONDS * (1 if args.teacher == "tiny" else 2)
    for case in cases:
        left = args.budget - (time.perf_counter() - started) if args.budget else float("inf")
        if left < min_left:
            results.append(dict(case=case, status="skipped: over --budget", seconds=0.0))
            continue
        print(f"[{time.perf_counter() - started:6.0f} s] {case} ...", flush=True)
        log_start = log.stat().st_size if log.exists() else 0
        clock = time.perf_counter()
        try:
            result = run_case(case, args, out, log, deadline=clock + min(args.case_timeout, left))
        except Exception as error:  # one case's broken output ends that case's row, not the table
            result = dict(case=case, status=f"bench error: {error!r}"[:200], seconds=time.perf_counter() - clock)
        costs = result.pop("costs", costs)
        results.append(result)
        print(f"         {result['status']} in {result['seconds']:.0f} s", flush=True)
        if not result["status"].startswith("ok") and log.exists():  # its error, here rather than only in the log
            with open(log, "rb") as fh:
                fh.seek(log_start)
                print("         " + "\n         ".join(fh.read().decode(errors="replace").splitlines()[-12:]))
        write_summary(out, results, costs)  # after every case: a run stopped early keeps what it measured
    summary = write_summary(out, results, costs)
    print(f"\n## sd_profile ({args.teacher}; {time.perf_counter() - started:.0f} s; full output in {log})\n")
    print(summary)
    return results


def run_case(case, args, out, log, deadline):
    """One case in its own process, stopped at `deadline` (perf_counter) -> its result (for `unet`, with the
    measured costs)."""
    tiny, timeout = args.teacher == "tiny", lambda: max(1.0, deadline - time.perf_counter())
    if case == "unet":
        cmd = [sys.executable, "bench/unet_rate.py", "--teacher", args.teacher, "--json", str(out / "costs.json")]
        cmd += (["--device", "cpu", "--batch", "2", "--small-batches", "1", "--reps", "2"] if tiny else [])
        cmd += ["--compile"] if args.compile_unet else []
        code, seconds = run(cmd, log, timeout())
        result = dict(case=case, status="ok" if code == 0 else f"failed ({code})", seconds=seconds)
        if code == 0:
            report = json.loads((out / "costs.json").read_text())
            result.update(costs=report["eager"], by_batch=report["by_batch"])
        return result
    run_dir = out / case
    for name in ("metrics.jsonl", "checkpoint.pt"):  # a fresh run each time: the scripts never overwrite one
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "teacher_cache", ignore_errors=True)  # cached teachers would leave the timed window
    script, script_args = case_command(case, args.teacher, run_dir)
    code, seconds = run([sys.executable, script, *script_args], log, timeout())
    if case in TRAIN:
        return sample_saved(case, run_dir, code, seconds, args, log, timeout())
    rows = read_metrics(run_dir)
    profile = [r for r in rows if r.get("phase") == "profile"]
    result = dict(case=case, status="ok" if code == 0 and profile else f"failed ({code})", seconds=seconds,
                  trains=CASES[case][2], checkpointing="--gradient-checkpointing" in CASES[case][1])
    if profile:
        result.update(row=profile[-1], counts=image_counts(script, profile[-1]), checks=first_ratio_checks(rows))
    return result


@functools.lru_cache(maxsize=1)
def machine():
    """'<GPU> (driver ...), torch ..., diffusers ..., <date>', without touching CUDA in this process (the cases
    need the GPU)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        gpus = []
    gpu = next((f"{name} (driver {driver})" for name, _, driver in (g.partition(", ") for g in gpus) if driver),
               "no GPU")

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:  # the cases then fail with the import error, each in its log
            return "not installed"
    return f"{gpu}, torch {installed('torch')}, diffusers {installed('diffusers')}, {time.strftime('%Y-%m-%d')}"


def write_summary(out, results, costs):
    summary = f"{machine()}\n\n" + table(results, costs)
    if costs:
        summary += ("\n\nmeasured eager costs here, ms per image: " +
                    ", ".join(f"{k} {v * 1000:.2f}" for k, v in costs.items()))
    for r in results:
        if r.get("by_batch"):  # above the largest batch's figure at the scripts' call sizes: launch-bound there
            summary += ("\n\neager ms per image by batch (images per call): " + "; ".join(
                f"{case} " + ", ".join(f"{b}: {v * 1000:.2f}" for b, v in sizes.items())
                for case, sizes in r["by_batch"].items()))
    (out / "summary.md").write_text(summary + "\n")
    (out / "summary.json").write_text(json.dumps(dict(costs=costs, results=results), indent=1))
    return summary


if __name__ == "__main__":
    main()
