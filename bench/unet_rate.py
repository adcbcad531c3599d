"""Per-image costs of the SD1.5 UNet and VAE on this machine: the figures behind --profile's floor.

Random-weight SD1.5 architecture (redif.py's `sd15-random`), 512 px, bf16 autocast over bf16 frozen weights (as
both scripts run on CUDA). For each variant (eager; channels_last; with --compile, torch.compile of the forward):
    forward        no grad, bf16 weights (the teacher, the real score, rollouts)
    train full     forward + backward + AdamW step, fp32 weights under autocast (--finetune/--generator full)
    train lora     forward + backward + AdamW step of a rank-8 LoRA on bf16 weights (--finetune lora)
and the VAE decode; then eager forward and LoRA training again at --small-batches, the scripts' own call sizes
(more per image there than at --batch: the GPU waits on the CPU's kernel launches). Times are CUDA-event medians
after warm-up; TFLOP/s counts 803 GFLOP per UNet forward image
and 3x that for a forward + backward (issue 5's figures).

    python bench/unet_rate.py                 # eager and channels_last, about a minute on an H100
    python bench/unet_rate.py --compile --json costs.json
    python bench/unet_rate.py --teacher tiny --device cpu --batch 2 --small-batches 1 --reps 2   # code path, CPU
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import redif  # noqa: E402  (build_offline_pipeline: the SD1.5 shapes with random weights)

GFLOP_FORWARD = 803  # per 512 px image, SD1.5 UNet (issue 5)


def timed(fn, reps, device):
    """Median seconds of fn() over reps after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            clock = time.perf_counter()
            fn()
            times.append(time.perf_counter() - clock)
    return statistics.median(times)


def unet_case(name, unet, batch, latent, device, dtype, lora_rank=8):
    """-> (fn, module) of one case on its own copy of the UNet; fresh random inputs each call (never zeros)."""
    dim = unet.config.cross_attention_dim

    def inputs():
        x = torch.randn(batch, 4, latent, latent, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        return x, t, torch.randn(batch, 77, dim, device=device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype == torch.bfloat16)

    if name == "forward":  # frozen bf16 weights, no grad
        model = copy.deepcopy(unet).to(device, dtype).requires_grad_(False).eval()

        @torch.no_grad()
        def forward():
            with autocast():
                model(*inputs()).sample.float()
        return forward, model
    if name == "train full":  # fp32 weights under autocast, as --finetune / --generator full
        model = copy.deepcopy(unet).to(device, torch.float32).requires_grad_(True).train()
    else:  # a LoRA over bf16 weights, as --finetune lora (redif.py's LoRA config)
        from peft import LoraConfig
        model = copy.deepcopy(unet).to(device, dtype).requires_grad_(False).train()
        model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-12)

    def step():
        with autocast():
            out = model(*inputs()).sample.float()
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="sd15-random", choices=["sd15-random", "tiny"],
                        help="the UNet and VAE shapes (random weights): SD1.5's, or the tests' tiny ones")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda: bf16 autocast over bf16 frozen weights, as the scripts; cpu: float32")
    parser.add_argument("--batch", type=int, default=16, help="UNet images per call (issue 5: 16)")
    parser.add_argument("--vae-batch", type=int, default=8, help="VAE decodes per call (issue 5: 8)")
    parser.add_argument("--small-batches", default="4,8", help="also time eager forward and LoRA training at these "
                        "batches, the scripts' own call sizes (dmdr's generator 4 images, CFG calls on 4 rollouts 8): "
                        "a per-image cost above --batch's there means the GPU waits on kernel launches ('': none)")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per case (median)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) of each forward")
    parser.add_argument("--json", help="write {variant: {case: seconds per image}, "
                        "by_batch: {case: {batch: seconds per image}}} here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available (fix: --device cpu)")
    parts = [b.strip() for b in args.small_batches.split(",") if b.strip()]
    if not all(b.isdigit() and int(b) > 0 for b in parts):
        raise SystemExit(f"error: --small-batches '{args.small_batches}' is not a list of positive integers "
                         "(fix: e.g. 4,8)")
    small_batches = [int(b) for b in parts]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    pipe = redif.build_offline_pipeline(args.teacher)
    latent = pipe.unet.config.sample_size
    pipe.vae.to(device, dtype).requires_grad_(False)
    variants = ["eager", "channels_last"] + (["compile"] if args.compile else [])
    rows = []

    def measure(name, batch, variant):
        """Seconds per image of one case; appends its table row."""
        fn, module = unet_case(name, pipe.unet, batch, latent, device, dtype)
        if variant != "eager":
            module.to(memory_format=torch.channels_last)
        if variant == "compile":
            module.forward = torch.compile(type(module).forward.__get__(module))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        clock = time.perf_counter()
        sec = timed(fn, args.reps, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        flops = GFLOP_FORWARD * (3 if name.startswith("train") else 1) if args.teacher == "sd15-random" \
            else float("nan")  # the FLOP count is SD1.5's at 512 px
        rows.append((variant, name, batch, sec * 1000, sec / batch * 1000, flops * batch / sec / 1000, peak,
                     time.perf_counter() - clock))
        del fn, module  # each case's copy (and optimiser) is freed before the next is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return sec / batch

    results = {variant: {name: measure(name, args.batch, variant) for name in ("forward", "train full", "train lora")}
               for variant in variants}
    # the scripts' own call sizes: where a small batch costs more per image than --batch, the GPU waits on the
    # CPU launching kernels one by one (eager), and no script reaches a floor priced at --batch there
    by_batch = {name: {**{b: measure(name, b, "eager") for b in small_batches}, args.batch: results["eager"][name]}
                for name in ("forward", "train lora") if small_batches}

    @torch.no_grad()
    def vae_decode():
        z = torch.randn(args.vae_batch, 4, latent, latent, device=device, dtype=dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype == torch.bfloat16):
            pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.float()

    sec = timed(vae_decode, args.reps, device)
    for variant in variants:
        results[variant]["vae decode"] = sec / args.vae_batch
    rows.append(("eager", "vae decode", args.vae_batch, sec * 1000, sec / args.vae_batch * 1000, float("nan"),
                 float("nan"), 0.0))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    pixels = latent * 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # each VAE block halves the image
    print(f"\n## UNet and VAE per-image costs: {args.teacher}, {pixels} px, {dtype}, {name}, torch "
          f"{torch.__version__}\n\n"
          "| variant | case | batch | ms / call | ms / image | TFLOP/s | peak GiB | s to measure |"
          "\n|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.0f} | {r[6]:.1f} | {r[7]:.0f} |")
    report = dict(device=name, batch=args.batch, **results, by_batch=by_batch)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return report


if __name__ == "__main__":
    main()
