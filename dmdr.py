"""DMDR on Stable Diffusion: Distribution Matching Distillation meets Reinforcement Learning, in one file.

Distils an SD1.x/2.x teacher into a K-step generator (K in 1, 2, 4) from prompts alone (no images):
the DMD gradient (E8) from a frozen real score (the teacher with CFG) and a fake score (the teacher plus a
trainable LoRA, E9), the DMDR cold start (DynaDG E10, DynaRS E11) and an RL branch (ReFL / DPO / GRPO, E12).
Equation tags refer to docs/METHOD.md sections 5-6.

    python dmdr.py --teacher sd15 --steps 4                       # DMD + ReFL (RL from step 20k), CUDA
    python dmdr.py --teacher sd15 --steps 1 --rl none             # distillation only
    python dmdr.py --teacher tiny --iters 20 --rl grpo --rl-start 0 --device cpu   # offline smoke run
    python dmdr.py --out runs/dmdr --resume         # continue a run exactly, with the settings of its config.json
    python dmdr.py --teacher sd15-random --rl-start 0 --profile 5 --out runs/prof # speed and memory table

The generator is saved as a complete diffusers pipeline (LCMScheduler set to the generator's grid):

    pipe = StableDiffusionPipeline.from_pretrained("runs/dmdr/generator")
    image = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=0).images[0]  # t = 999,749,499,249

Outputs in --out: config.json, prompts.txt, metrics.jsonl (per iteration: dmd_loss, grad_norm = RMS of the DMD
gradient g, fake_loss, rl_loss (GRPO's is 0 on-policy, its gradient is not), reward, dynadg_scale, dynars_mean,
sec_generator/sec_fake/sec_rl, and eval_* every --eval-every), samples_NNNNNN.png (held-out prompts: generator
row above teacher row), checkpoint.pt (atomic; --resume continues exactly; Ctrl-C or SIGTERM finishes the
iteration and checkpoints), generator/ (diffusers pipeline).

Precision (--precision, default bf16 on CUDA): the frozen parts are bf16 under a bf16 autocast, the trainable
parts (LoRAs, a full generator) and AdamW fp32; this path is tested on CPU, the CUDA kernels were not run in
development. Attention is torch SDPA (diffusers' default processor); --gradient-checkpointing for the UNets and
the VAE; --compile (torch.compile, channels_last).

Memory layout: ONE UNet holds the teacher's weights (frozen). The fake score is a peft LoRA adapter "fake" on
it and a LoRA generator is a second adapter "generator" on it; the real score is the same UNet with adapters
off (or, under DynaDG, with "fake" at a smaller scale on both CFG branches). A full generator
(`--generator full`, DMD2's choice) is necessarily a second, trainable copy.
"""
import argparse
import collections
import contextlib
import copy
import errno
import functools
import gzip
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


def drop_empty_fp32_notice(record):
    """diffusers 0.42 logs "modules ... should be kept in float32: []" on every dtype cast, even when the list is
    empty (SD's UNet and VAE keep none): drop that record; keep it when it names modules."""
    return "kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(drop_empty_fp32_notice)

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SUPPORTED_STEPS = (1, 2, 4)  # our choice: trailing grids that divide 1000
TEACHER_ALIASES = ("sd15", "tiny", "sd15-random")
REWARD_TERMS = ("clip_text", "aesthetic")  # image-free rewards of the generator's image (and its prompt)
DEFAULT_PROMPTS = [
    "a photo of a cat sitting on a windowsill", "a red vintage car parked on a cobblestone street",
    "an astronaut riding a horse on the moon", "a bowl of ramen with a soft boiled egg",
    "a lighthouse on a cliff at sunset", "a watercolor painting of a fox in a snowy forest",
    "a cozy wooden cabin in the mountains", "a close-up portrait of an old fisherman",
    "a futuristic city skyline at night with neon lights", "a teddy bear reading a book in a library",
    "a field of sunflowers under a blue sky", "a steaming cup of coffee on a wooden table",
    "a corgi wearing sunglasses on the beach", "an oil painting of a sailing ship in a storm",
    "a plate of fresh sushi", "a medieval castle surrounded by fog", "a hummingbird drinking from a flower",
    "a bicycle leaning against a brick wall", "a snowy owl perched on a branch", "a glass of orange juice with ice",
    "a tiger walking through tall grass", "a robot painting a portrait", "a stack of pancakes with blueberries",
    "a koala sleeping in a tree",
]


# ---------------------------------------------------------------------------------------------------
# Config (every flag; defaults from the papers unless marked "our choice")
# ---------------------------------------------------------------------------------------------------
def flag(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    teacher: str = flag("sd15", "sd15 (hub stable-diffusion-v1-5), a hub id owner/name, a local diffusers folder "
                        "(SD1.x/2.x, epsilon), or offline random weights: tiny | sd15-random")
    steps: int = flag(4, f"generator steps K, one of {SUPPORTED_STEPS}; trailing grid (K=4: 999,749,499,249)")
    generator: str = flag("full", "train the full UNet (DMD2; a second UNet copy) or a LoRA adapter on the shared "
                          "UNet", choices=["full", "lora"])
    generator_lora_rank: int = flag(64, "rank of the generator LoRA on attention q,k,v,out (our choice)")
    lr: float = flag(None, "generator AdamW lr (default: 1e-5 full as DMD2, 1e-4 LoRA, our choice)")
    fake_lr: float = flag(1e-5, "fake-score LoRA lr (DMD2: 1e-5)")
    fake_updates: int = flag(5, "fake-score updates per generator update (two time-scale; DMDR 5, DMD2 10)")
    fake_lora_rank: int = flag(32, "fake-score LoRA rank on attention q/v (DMDR: 32)")
    fake_lora_scale: float = flag(2.0, "fake-score LoRA scale alpha/rank (DMDR: 2.0)")
    real_guidance: float = flag(1.75, "CFG of the real score (DMD2 on SD1.5: 1.75; higher for aesthetics)")
    dynadg: bool = flag(True, "DynaDG (E10: the fake LoRA inside the real score at a decaying scale); "
                        "--no-dynadg: off")
    dynadg_lambda0: float = flag(0.75, "DynaDG start scale lambda_0 of the fake LoRA inside the real score, in "
                                 "--fake-lora-scale's units (E10; official demo: 0.75 against the fake's 2.0)")
    dynadg_steps: int = flag(10000, "DynaDG horizon S in generator steps (E10)")
    dynars: bool = flag(True, "DynaRS (E11: Beta-scheduled renoise times); --no-dynars: uniform in [20, 980]")
    dynars_a0: float = flag(4.0, "DynaRS Beta a at step 0 (E11)")
    dynars_b0: float = flag(1.5, "DynaRS Beta b at step 0 (E11)")
    dynars_steps: int = flag(10000, "DynaRS horizon S in generator steps (E11)")
    rl: str = flag("refl", "RL branch (E12): ReFL, Diffusion-DPO on reward-ranked pairs, GRPO, or none",
                   choices=["none", "refl", "dpo", "grpo"])
    rl_weight: float = flag(None, "lambda_rl in L = L_dmd + lambda_rl L_rl (default 0.05: the official demo's, for "
                            "ReFL; DPO's and GRPO's losses have other scales: tune it); needs --rl")
    rl_start: int = flag(20000, "generator step at which the RL branch starts (cold start; official demo 20k)")
    reward: str = flag("clip_text=1", "reward terms name=weight,...; clip_text: open_clip text-image cosine; "
                       "aesthetic: LAION's aesthetic predictor (~1-10: a weight ~0.05 puts it on clip_text's scale)")
    reward_weights: str = flag(None, "reward model weights (default: random for tiny/sd15-random, else pretrained)",
                               choices=["pretrained", "random"])
    clip_model: str = flag("ViT-H-14", "open_clip architecture of the reward and the eval features")
    clip_pretrained: str = flag("laion2b_s32b_b79k", "open_clip pretrained tag")
    aesthetic_model: str = flag("trl-lib/ddpo-aesthetic-predictor", "the aesthetic reward's MLP head (on open_clip "
                                "ViT-L-14/openai embeddings, as DDPO): a hub repo with aesthetic-model.pth, or a .pth")
    dpo_beta: float = flag(5000.0, "Diffusion-DPO beta (Diffusion-DPO on SD1.5: 5000)")
    grpo_group: int = flag(4, "GRPO group size G per prompt (E4)")
    grpo_eta: float = flag(1.0, "eta of the stochastic last generator step for GRPO (E1)")
    grpo_clip: float = flag(1e-4, "clip range of the GRPO surrogate (E5; DDPO's value); with one on-policy update "
                            "per sample the ratio is exactly 1, so the clip never binds")
    prompts: str = flag(None, "text file, one prompt a line (default: built-in); the last --num-eval-prompts "
                        "are held out")
    num_eval_prompts: int = flag(4, "held-out prompts for evaluation (>= 2; the CLIP Frechet distance of so few is "
                                 "a trend, not an FID)")
    batch_size: int = flag(4, "prompts per generator update (our choice for one GPU; DMD2 used 2048 on 64 GPUs)")
    iters: int = flag(40000, "generator updates (DMD2 SD1.5: ~40k)")
    eval_every: int = flag(1000, "evaluate on the held-out prompts every N iterations (and at the end)")
    eval_teacher_steps: int = flag(25, "DDIM steps of the teacher's reference images")
    eval_teacher_guidance: float = flag(7.5, "CFG of the teacher's reference images")
    save_every: int = flag(500, "checkpoint every N iterations (atomic; also at the end and on Ctrl-C)")
    max_grad_norm: float = flag(10.0, "gradient clipping for both optimisers (DMD2: 10)")
    gradient_checkpointing: bool = flag(False, "recompute activations of the UNets and the VAE in backward")
    compile: bool = flag(False, "torch.compile the UNets' forward (inductor) with channels_last weights; the first "
                         "iterations compile a few graphs (off until measured on a GPU; with DynaDG: torch >= 2.6)")
    out: str = flag("runs/dmdr", "output folder")
    device: str = flag("auto", "auto (CUDA if present), cuda or cpu", choices=["auto", "cuda", "cpu"])
    precision: str = flag("auto", "auto: bf16 on CUDA, fp32 on CPU; bf16: frozen weights bf16 under bf16 autocast, "
                          "trainable weights and optimisers fp32 (also runs on CPU, slowly); fp32: all float32 "
                          "(on CUDA, TF32 matmuls and convolutions)", choices=["auto", "bf16", "fp32"])
    resume: bool = flag(False, "continue the run in --out exactly, from its checkpoint.pt; settings not given "
                          "come from its config.json")
    seed: int = flag(0, "seed of all sampling")
    profile: int = flag(0, "time N training iterations after warm-up (1, 3 with --compile), print (and append to "
                        "metrics.jsonl) seconds per phase, evaluations, floor, peak memory; then exit (no saving)")


def build_parser(defaults=True):
    """Every Config field a flag; a switch has its --no- form too (so a --resume can turn it off). Without
    defaults, parsing yields only the flags given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Config):
        name, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        default = f.default if defaults else argparse.SUPPRESS
        if f.type in (bool, "bool") and f.name == "resume":
            parser.add_argument(name, action="store_true", default=default, help=help)
        elif f.type in (bool, "bool"):
            help += f" (default: {'on' if f.default else 'off'})"
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help)
        else:
            if f.default is not None:  # a None default's help says what None means
                help += " (default: %(default)s)"
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), f.type)
            parser.add_argument(name, type=kind, default=default, help=help, choices=f.metadata.get("choices"))
    return parser


def parse_args(argv=None):
    return Config(**vars(build_parser().parse_args(argv)))


def given_flags(argv=None):
    """The names of the settings given on the command line (a --resume takes the others from config.json)."""
    return set(vars(build_parser(defaults=False).parse_args(argv)))


def fail(message, fix):
    """User mistakes end in one line that names the fix."""
    raise SystemExit(f"error: {message} (fix: {fix})")


def check_teacher(name):
    """An alias, an existing diffusers folder or a hub id owner/name; anything else fails before loading."""
    if name in TEACHER_ALIASES:
        return
    folder = os.path.expanduser(name)
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            fail(f"teacher folder '{name}' has no model_index.json",
                 "pass a diffusers pipeline folder (save_pretrained)")
    elif name.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        fail(f"unknown teacher '{name}'",
             f"use {', '.join(TEACHER_ALIASES)}, a hub id owner/name or an existing folder")


def validate(cfg):
    """Every user mistake visible before loading a model -> one line. Returns (train_prompts, eval_prompts)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but CUDA is not available", "use --device cpu or auto, or install a CUDA build of torch")
    check_teacher(cfg.teacher)
    if cfg.steps not in SUPPORTED_STEPS:
        fail(f"--steps {cfg.steps} is not supported", f"use one of {', '.join(map(str, SUPPORTED_STEPS))}")
    if cfg.rl == "none" and cfg.rl_weight is not None:
        fail("--rl-weight given but --rl is none", "choose --rl refl|dpo|grpo, or drop --rl-weight")
    if cfg.rl != "none" and cfg.rl_weight is None:
        cfg.rl_weight = 0.05  # official demo
    if cfg.lr is None:
        cfg.lr = 1e-5 if cfg.generator == "full" else 1e-4  # DMD2 / our choice
    specializes_floats = getattr(torch._dynamo.config, "specialize_float", False)  # True before torch 2.6
    if cfg.compile and cfg.dynadg and cfg.dynadg_lambda0 > 0 and specializes_floats:
        fail(f"--compile with DynaDG needs torch >= 2.6 (this is {torch.__version__}): older dynamo compiles the "
             "UNet again for every new DynaDG scale, i.e. every iteration",
             "upgrade torch, drop --compile or pass --no-dynadg")
    if cfg.rl == "grpo" and cfg.grpo_group < 2:
        fail(f"--grpo-group {cfg.grpo_group}: GRPO normalises within a group", "use --grpo-group 4")
    if cfg.rl == "grpo" and not 0 < cfg.grpo_eta <= 1:
        fail(f"--grpo-eta {cfg.grpo_eta} is not in (0, 1]: an eta-0 step has no log-probability, so GRPO would not "
             "move, and above 1 the step is no longer DDIM's", "use --grpo-eta 1.0")
    positive = ("iters", "batch_size", "eval_every", "save_every", "eval_teacher_steps", "dynadg_steps",
                "dynars_steps", "generator_lora_rank", "fake_lora_rank", "fake_lora_scale", "dynars_a0", "dynars_b0",
                "dpo_beta", "grpo_clip", "max_grad_norm")  # max_grad_norm <= 0 would reverse or zero the step
    non_negative = ("lr", "fake_lr", "fake_updates", "rl_weight", "rl_start", "dynadg_lambda0", "profile")
    for f in fields(Config):
        name, value = "--" + f.name.replace("_", "-"), getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{name} {value} is not a finite number", "pass a finite value")
        if value is not None and (f.name in positive and value <= 0 or f.name in non_negative and value < 0):
            kind = "positive" if f.name in positive else "non-negative"
            fail(f"{name} {value} must be {kind}", f"pass a {kind} number")
        if isinstance(value, int) and f.name != "seed" and value >= 2 ** 31:
            fail(f"{name} {value} is too large", "pass a value below 2**31")
    if not 0 <= cfg.seed < 2 ** 32:
        fail(f"--seed {cfg.seed} is out of range", "pass a seed in [0, 2**32)")
    if len(trailing_timesteps(cfg.eval_teacher_steps)) != cfg.eval_teacher_steps or cfg.eval_teacher_steps > 1000:
        fail(f"--eval-teacher-steps {cfg.eval_teacher_steps}: its trailing grid does not have that many timesteps "
             "(diffusers' float arange gives one more for some counts)", "use --eval-teacher-steps 25")
    if cfg.num_eval_prompts < 2:
        fail("--num-eval-prompts must be >= 2 (the Frechet distance needs a covariance)", "e.g. --num-eval-prompts 4")
    parse_reward(cfg.reward)
    if cfg.prompts is None:
        prompts = list(DEFAULT_PROMPTS)
    elif not os.path.isfile(cfg.prompts):
        fail(f"prompt file '{cfg.prompts}' not found", "pass an existing text file, one prompt a line")
    else:
        try:
            prompts = [ln.strip() for ln in Path(cfg.prompts).read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            fail(f"prompt file '{cfg.prompts}' is not UTF-8 text", "save it as UTF-8, one prompt a line")
    if not prompts:
        fail(f"prompt file '{cfg.prompts}' is empty", "write one prompt a line, or leave out --prompts")
    if len(prompts) <= cfg.num_eval_prompts:
        fail(f"{len(prompts)} prompts but {cfg.num_eval_prompts} are held out for evaluation",
             "give more prompts or lower --num-eval-prompts")
    return prompts[:-cfg.num_eval_prompts], prompts[-cfg.num_eval_prompts:]


def check_out_dir(cfg, out):
    """Never overwrite a run: a checkpoint or a generator marks one. A folder whose run stopped before its first
    checkpoint (a crash in iteration 1, a --profile) holds nothing to resume: a fresh run starts over in it."""
    if not cfg.out:
        fail("--out is empty", "pass a folder, e.g. --out runs/dmdr")
    for part in (out, *out.parents):  # a file where a folder must go fails now, not after loading the models
        if part.exists() and not part.is_dir():
            fail(f"--out {out}: {part} is a file", "pass a folder (it is created if missing)")
    if cfg.resume and not (out / "checkpoint.pt").is_file():
        fail(f"--resume but {out} holds no checkpoint.pt", "run without --resume to start afresh there, or point "
             "--out at the run")
    if not cfg.resume and ((out / "checkpoint.pt").exists() or (out / "generator").exists()):
        fail(f"{out} already holds a run", "pass --resume to continue it, or choose another --out")
    if not cfg.resume and (out / "metrics.jsonl").exists():
        print(f"note: {out} holds no checkpoint (its run stopped before the first): starting afresh there")


def lock_run_folder(out, held):
    """One process per run folder: a second run there (a --resume while the first still runs, a job resubmitted
    too soon) would interleave checkpoints and metrics. A POSIX lock: the OS releases it however the process ends.
    The lock file's descriptor goes on `held`, which main closes when the run ends (a raw one: nothing to warn of
    if it is not)."""
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): no lock
        return
    try:
        lock = os.open(out / ".lock", os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only folder
        write_failed(out / ".lock", e)
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:  # else a file system without locks (some NFS): run unlocked
        if e.errno in (errno.EACCES, errno.EAGAIN):
            os.close(lock)
            fail(f"another process is running in {out}", "wait for it to end (or stop it), or choose another --out")
    held.append(lock)


# settings a resumed run may change: they leave what was already trained alone (the lrs: the fix of a non-finite
# loss); prompts: the file may move, its prompts are compared with the run's prompts.txt
RESUME_FREE = {"iters", "eval_every", "save_every", "compile", "gradient_checkpointing", "lr", "fake_lr",
               "max_grad_norm", "prompts"}
THIS_PROCESS = {"out", "device", "profile", "resume"}  # where and how this process runs: never from config.json


def fits(value, f):
    """Whether a value read from config.json is one the flag could have given."""
    if value is None or isinstance(value, bool) != (f.type is bool):
        return value is None and f.default is None
    ok = isinstance(value, (int, float)) if f.type is float else isinstance(value, f.type)
    return ok and value in f.metadata.get("choices", [value])


def resume_config(cfg, given, out):
    """--resume: the run's config.json, overridden by the settings given on this command line. Changing one
    outside RESUME_FREE would not continue the same run; a setting the file lacks (added to the script since
    the run) counts at its default."""
    path, flags = out / "config.json", {f.name: f for f in fields(Config)}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        fail(f"{path} is missing or unreadable", "point --out at a dmdr.py run folder")
    if not isinstance(saved, dict) or set(saved) - set(flags):
        fail(f"{path} is not a dmdr.py config" + (f" ({', '.join(sorted(set(saved) - set(flags)))} unknown)"
                                                  if isinstance(saved, dict) else ""), "point --out at a dmdr.py run")
    if bad := [f"{k}={v!r}" for k, v in saved.items() if not fits(v, flags[k])]:
        fail(f"{path} holds values no flag gives: {', '.join(bad)}", "restore the run's config.json")
    saved = {**{k: f.default for k, f in flags.items()}, **saved}
    if "prompts" not in given and (out / "prompts.txt").exists():
        saved["prompts"] = str(out / "prompts.txt")  # the run's own copy: the folder moves with its prompts
    cfg = replace(cfg, **{k: v for k, v in saved.items() if k not in given | THIS_PROCESS})
    changed = sorted(k for k in given - THIS_PROCESS if saved[k] != getattr(cfg, k))
    if refused := [k for k in changed if k not in RESUME_FREE]:
        fail(f"--resume with different settings: {', '.join(refused)}",
             "leave them out to keep the run's (config.json), or start a new --out")
    for k in changed:
        print(f"resume: {k} {saved[k]} -> {getattr(cfg, k)}")
    return cfg


def check_same_prompts(out, prompts):
    """A run trains and evaluates on the prompts it started with (its prompts.txt), not on an edited file."""
    path = out / "prompts.txt"
    try:
        theirs = path.read_text(encoding="utf-8").splitlines() if path.exists() else list(prompts)
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text", "restore it, or resume with --prompts and the run's prompt file")
    if theirs != list(prompts):
        fail(f"the prompts differ from those the run started with ({path})",
             f"resume with --prompts {path}, or start a new --out")


def parse_reward(spec):
    """'clip_text=1' -> {'clip_text': 1.0}."""
    weights = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            fail(f"bad --reward term '{part}'", "write name=weight, e.g. --reward clip_text=1")
        if name.strip() not in REWARD_TERMS:
            fail(f"unknown reward '{name.strip()}'", f"use {', '.join(REWARD_TERMS)}")
        if not math.isfinite(weights[name.strip()]):
            fail(f"--reward weight {part} is not finite", "write a finite weight, e.g. --reward clip_text=1")
    if not any(weights.values()):
        fail("--reward has no non-zero weight", "e.g. --reward clip_text=1")
    return weights


# ---------------------------------------------------------------------------------------------------
# Teachers: sd15 / hub id / local folder, and the offline random-weight aliases tiny and sd15-random
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def offline_clip_tokenizer():
    """SD's CLIP tokenizer built from the BPE file open_clip ships (no hub): byte table, then merges."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # 49408 tokens
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
        Path(d, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(d, "vocab.json")), str(Path(d, "merges.txt")), model_max_length=77)


def random_teacher(name):
    """tiny: diffusers' test-sized SD; sd15-random: SD1.5's architecture. Random weights, seeded per component."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    tiny = name == "tiny"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ) if tiny else UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    torch.manual_seed(0)
    channels = [32, 64] if tiny else [128, 256, 512, 512]
    vae = AutoencoderKL(block_out_channels=channels, latent_channels=4, layers_per_block=1 if tiny else 2,
                        down_block_types=["DownEncoderBlock2D"] * len(channels),
                        up_block_types=["UpDecoderBlock2D"] * len(channels), sample_size=32 if tiny else 512)
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37) if tiny else \
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             hidden_act="quick_gelu", projection_dim=768)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                                eos_token_id=49407, pad_token_id=49407, **text))
    return unet, vae, text_encoder, offline_clip_tokenizer()


def sd_scheduler():
    """SD's DDIM config; only its alphas_cumprod is used for training (the math is ours)."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def load_teacher(name):
    """-> unet, vae, text_encoder, tokenizer (float32, CPU)."""
    if name in ("tiny", "sd15-random"):
        return random_teacher(name)
    from diffusers import StableDiffusionPipeline
    repo = SD15 if name == "sd15" else os.path.expanduser(name)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(repo, torch_dtype=torch.float32, safety_checker=None)
    except Exception as e:  # noqa: BLE001 - hub offline, gated repo, not an SD pipeline ...
        fail(f"could not load teacher '{name}': {str(e).splitlines()[0][:500]}",
             "check the hub id / network, or pass a local folder")
    if pipe.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        fail(f"teacher '{name}' is {pipe.scheduler.config.prediction_type}-prediction",
             "use an epsilon model, e.g. SD1.5 or SD2-base")
    return pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer


@dataclass
class Models:
    unet: torch.nn.Module  # the ONE copy of the teacher's weights (frozen) + adapter "fake" (+ "generator")
    gen_unet: torch.nn.Module  # is `unet` for a LoRA generator, a trainable copy for a full one
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    clip: torch.nn.Module  # open_clip model: the reward and the eval features
    clip_tokenizer: object
    aesthetic: tuple  # (open_clip ViT-L-14, MLP head) of the aesthetic reward, or None when unweighted
    alphas_cumprod: torch.Tensor  # (1000,) float32
    timesteps: torch.Tensor  # (K,) the generator's grid
    device: torch.device
    ctx: object  # () -> a fresh bf16 autocast context (--precision bf16, the default on CUDA) or nullcontext
    lora_generator: bool
    uncond: torch.Tensor = None  # (1, 77, D) embedding of "" for CFG
    dpo_ref: dict = None  # --rl dpo: the generator's trainable weights as RL started (DPO's reference)


def lora_params(unet, adapter):
    return [p for n, p in unet.named_parameters() if f".{adapter}." in n]


def generator_lora_config(cfg):
    from peft import LoraConfig
    return LoraConfig(r=cfg.generator_lora_rank, lora_alpha=cfg.generator_lora_rank,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def frozen_dtype(cfg, device):
    """The one precision decision: bf16 frozen weights + bf16 autocast, or float32 throughout."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def run_summary(cfg, device):
    """The line a run starts with, and a warning when a Stable Diffusion-sized teacher runs on the CPU (with
    --device auto and no GPU it would run, hours an iteration, rather than stop)."""
    dtype = str(frozen_dtype(cfg, device)).removeprefix("torch.")
    line = (f"dmdr: teacher {cfg.teacher} on {device.type} ({dtype}), {cfg.generator} generator, {cfg.steps} steps, "
            f"rl {cfg.rl}, {cfg.iters} iterations, out {cfg.out}")
    if device.type == "cpu" and cfg.teacher != "tiny":
        line += (f"\nwarning: no GPU in use; a teacher of Stable Diffusion's size ({cfg.teacher}) takes hours per "
                 "iteration on a CPU (--device cuda stops with an error when CUDA is missing)")
    if cfg.rl != "none" and cfg.rl_start >= cfg.iters:
        line += (f"\nwarning: --rl-start {cfg.rl_start} >= --iters {cfg.iters}: RL ({cfg.rl}) never starts, this run "
                 "is DMD alone (lower --rl-start for RL now, or --resume with more --iters later)")
    return line


def build_models(cfg, device):
    from peft import LoraConfig
    dtype = frozen_dtype(cfg, device)
    unet, vae, text_encoder, tokenizer = load_teacher(cfg.teacher)
    unet.requires_grad_(False)
    gen_unet = None
    if cfg.generator == "full":  # the generator starts as the teacher: a second (fp32, trainable) copy
        gen_unet = copy.deepcopy(unet).requires_grad_(True).to(device)
    unet.to(device, dtype)
    # E9: fake score = teacher + LoRA on attention q/v, scale alpha/r = fake_lora_scale (DMDR: rank 32, 2.0)
    unet.add_adapter(LoraConfig(r=cfg.fake_lora_rank, lora_alpha=cfg.fake_lora_scale * cfg.fake_lora_rank,
                                target_modules=["to_q", "to_v"], init_lora_weights=True), adapter_name="fake")
    if cfg.generator == "lora":  # B = 0 at init, so the generator starts exactly as the teacher
        with warnings.catch_warnings():  # peft warns of a second adapter on one model: here that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            unet.add_adapter(generator_lora_config(cfg), adapter_name="generator")
        gen_unet = unet
    for p in lora_params(unet, "fake") + lora_params(unet, "generator"):
        p.data = p.data.float()  # trainable adapters stay fp32 over bf16 base weights
    if cfg.gradient_checkpointing:
        for model in (unet, gen_unet, vae):
            model.enable_gradient_checkpointing()
    if cfg.compile:
        compile_unets(unet, None if gen_unet is unet else gen_unet)
    vae.requires_grad_(False).to(device, dtype)
    text_encoder.requires_grad_(False).to(device, dtype)
    clip, clip_tokenizer = load_clip(cfg, device, dtype)
    aesthetic = load_aesthetic(cfg, device, dtype) if parse_reward(cfg.reward).get("aesthetic") else None
    return Models(unet, gen_unet, vae, text_encoder, tokenizer, clip, clip_tokenizer, aesthetic,
                  sd_scheduler().alphas_cumprod.float().to(device), trailing_timesteps(cfg.steps).to(device), device,
                  functools.partial(torch.autocast, device.type, dtype=dtype) if dtype == torch.bfloat16
                  else contextlib.nullcontext,
                  cfg.generator == "lora")


COMPILE_BACKEND = "inductor"  # the tests trace with "eager": same guards and graphs, no code generation


def compile_unets(*unets):
    """--compile: channels_last weights and torch.compile of each UNet's forward, not of the module's __call__,
    so forward hooks (--profile's counters) stay outside the graph. The adapter switches and grad mode are
    guarded; the second DynaDG scale met makes the scale a dynamic float, the second batch size a dynamic
    dimension: a few graphs in the first iterations, then no recompilation (tested)."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    for unet in unets:
        if unet is not None:
            unet.to(memory_format=torch.channels_last)
            unet.forward = torch.compile(type(unet).forward.__get__(unet), backend=COMPILE_BACKEND)


def use_adapter(unet, name=None, scale=1.0):
    """Switch the shared UNet: None = the plain teacher; "fake"/"generator" at `scale` x its alpha/r.
    (peft also flips requires_grad: only the active adapter is trainable.) A no-op when the UNet is already so:
    diffusers' switch walks every module (30 ms on SD1.5 on the 2-core CI host), and most calls (a K-step rollout
    asks K times) find it already switched; every switch of the scripts' UNets goes through here."""
    state = None if name is None or scale == 0 else (name, scale)
    if getattr(unet, "_adapter_state", "unknown") == state:
        return
    unet._adapter_state = "unknown"  # until the switch completes: an error (Ctrl-C) inside it leaves a mixed UNet
    if state is None:
        unet.disable_adapters()
    else:
        unet.enable_adapters()
        unet.set_adapters([name], weights=[scale])
    unet._adapter_state = state


def generator_params(m):
    """name -> the generator's trainable parameters: its LoRA on the shared UNet, or the whole copy."""
    if m.lora_generator:
        return {n: p for n, p in m.unet.named_parameters() if ".generator." in n}
    return dict(m.gen_unet.named_parameters())


def snapshot_generator(m):
    """A frozen copy of the generator's weights: matrices and kernels in the frozen parts' dtype (autocast casts
    them to it anyway, bit for bit), vectors (norms, biases: KBs) as they are, since CUDA's autocast runs the
    norms in float32, where a bf16 copy would move DPO's reference off the policy it was taken from."""
    dtype = next(m.vae.parameters()).dtype  # frozen_dtype
    return {n: p.detach().to(dtype if p.dim() > 1 else p.dtype, copy=True) for n, p in generator_params(m).items()}


@contextlib.contextmanager
def dpo_reference(m):
    """The generator with DPO's reference weights (m.dpo_ref) swapped in by pointer for the block. Each UNet call
    enters its own autocast (unet_eps), whose cache of weight casts (keyed by parameter, not by its data) is
    cleared on exit, so the reference is never served the generator's cached casts."""
    params = generator_params(m)

    def swap():
        for n, ref in m.dpo_ref.items():
            params[n].data, ref.data = ref.data, params[n].data
    swap()
    try:
        yield
    finally:
        swap()


# ---------------------------------------------------------------------------------------------------
# Shared pure functions (same names and semantics as toy/, cross-checked by the tests)
# ---------------------------------------------------------------------------------------------------
def trailing_timesteps(num_steps, num_train_timesteps=1000):
    """Evenly spaced "trailing" grid t_1 > ... > t_K (K=4: 999, 749, 499, 249; K=1: 999)."""
    grid = torch.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps, dtype=torch.float64)
    return (grid.round() - 1).long()


def _expand(v, like):
    """(B,) or scalar -> broadcastable against `like` (B, ...)."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim())) if v.dim() > 0 else v


def _abar(alphas_cumprod, t):
    """abar_t; t < 0 = after the last step -> alphas_cumprod[0] (SD's set_alpha_to_one=False)."""
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    return torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], alphas_cumprod[0])


def x0_from_eps(x_t, eps, abar_t):
    abar_t = _expand(abar_t, x_t)
    return (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def add_noise(x0, noise, abar_t):
    abar_t = _expand(abar_t, x0)
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise


def ddim_step_with_logprob(eps, t, t_prev, sample, alphas_cumprod, eta=1.0, prev_sample=None, generator=None):
    """DDIM step as a Gaussian policy (E1) and the log-density of the action averaged over dims (E2).
    eps, sample: (B, C, H, W). Returns prev_sample, log_prob (B,), mean, std."""
    abar_t = _expand(_abar(alphas_cumprod, t).to(sample.dtype), sample)
    abar_prev = _expand(_abar(alphas_cumprod, t_prev).to(sample.dtype), sample)
    x0_hat = (sample - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    std = eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()  # E1
    mean = abar_prev.sqrt() * x0_hat + (1 - abar_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype, device=sample.device)
        prev_sample = mean + std * noise
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * safe_std**2)
                - torch.log(safe_std) - 0.5 * math.log(2 * math.pi))
    log_prob = torch.where(std > 0, log_prob, torch.zeros_like(log_prob))  # E2 (0 where deterministic)
    return prev_sample, log_prob.mean(dim=tuple(range(1, sample.dim()))), mean, std


def dmd_loss(x, x0_real, x0_fake):
    """E8. x: generator output (B, ...) with grad; x0_real/x0_fake: the scores' x0 estimates at its renoised copy.
    d loss / d x = g / numel: descending moves x toward x0_real and away from x0_fake."""
    p_real = x - x0_real
    p_fake = x - x0_fake
    # per-sample normaliser; + 1e-8 as the official code, so x == x0_real gives a finite g, not +-inf
    g = (p_real - p_fake) / (p_real.abs().mean(dim=tuple(range(1, x.dim())), keepdim=True) + 1e-8)
    g = torch.nan_to_num(g.detach())
    return 0.5 * F.mse_loss(x, (x - g).detach())


def dynadg_scale(step, lambda0=0.75, total_steps=10000):
    """E10: scale of the fake LoRA inside the real score, cosine-decayed to 0 at total_steps."""
    return lambda0 * 0.5 * (1 + math.cos(math.pi * step / total_steps)) if step < total_steps else 0.0


def dynars_beta(step, a0=4.0, b0=1.5, total_steps=10000):
    """E11: Beta(a, b) of the renoise time; biased to high noise early, uniform (1, 1) from total_steps on."""
    c = 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0)))
    return 1 + (a0 - 1) * c, 1 + (b0 - 1) * c


def sample_renoise_timesteps(batch_size, step, a0=4.0, b0=1.5, total_steps=10000, t_min=20, t_max=980,
                             generator=None, dynamic=True):
    """E11: t = round(t_min + u (t_max - t_min)), u ~ Beta(a(s), b(s)) (dynamic=False: Beta(1, 1) = uniform).
    Beta takes no generator: draw a seed from `generator` and sample in a forked RNG. -> LongTensor (B,)."""
    a, b = dynars_beta(step, a0, b0, total_steps) if dynamic else (1.0, 1.0)
    beta = torch.distributions.Beta(torch.tensor(float(a)), torch.tensor(float(b)))
    if generator is None:
        u = beta.sample((batch_size,))
    else:
        seed = torch.randint(2**62, (1,), generator=generator).item()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would reseed CUDA too
            u = beta.sample((batch_size,))
    return torch.round(t_min + u * (t_max - t_min)).long()


def grpo_advantages(rewards, eps=1e-4):
    """E4: rewards (num_groups, G) -> (R - mean_g) / (std_g + eps), population std; equal groups -> exactly 0."""
    if not torch.isfinite(rewards).all():  # NonFinite: main() stops with one line naming the checkpoint
        raise NonFinite(f"non-finite rewards in GRPO: {rewards.tolist()}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    adv = (rewards - mean) / (std + eps)
    return torch.where((rewards == rewards[:, :1]).all(dim=1, keepdim=True), torch.zeros_like(adv), adv)


def clipped_surrogate(log_prob, old_log_prob, advantages, clip_range):
    """E5: -mean(min(r A, clip(r, 1-e, 1+e) A)), r = exp(log_prob - old_log_prob); all (B,)."""
    ratio = torch.exp(log_prob - old_log_prob)
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip_range, 1 + clip_range) * advantages).mean()


# ---------------------------------------------------------------------------------------------------
# Scores and the generator (latents: (B, 4, h, w); emb: (B, 77, D); t: (B,) long)
# ---------------------------------------------------------------------------------------------------
def encode_prompts(m, prompts):
    ids = m.tokenizer(prompts, padding="max_length", max_length=m.tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(m.device)
    with torch.no_grad(), m.ctx():
        return m.text_encoder(ids)[0]  # (B, 77, D), as StableDiffusionPipeline encodes


def unet_eps(m, unet, x, t, emb):
    with m.ctx():
        return unet(x, t.expand(x.shape[0]), encoder_hidden_states=emb).sample.float()


def real_x0(m, x_t, t, emb, uncond, guidance, dynadg=0.0):
    """Real score: the teacher with CFG. Under DynaDG (E10) the fake LoRA is switched into both CFG branches at
    LoRA scale `dynadg`, in the units of the fake's own scale (alpha/r, 2.0), as the official code's lora_scale:
    its demo starts the real score at 0.75 against the fake's 2.0, so with 37.5% of the fake's LoRA update."""
    fake = m.unet.peft_config["fake"]
    use_adapter(m.unet, "fake", dynadg * fake.r / fake.lora_alpha)  # peft multiplies the weight by alpha/r
    eps_u, eps_c = unet_eps(m, m.unet, torch.cat([x_t, x_t]), torch.cat([t, t]),
                            torch.cat([uncond.expand_as(emb), emb])).chunk(2)
    return x0_from_eps(x_t, eps_u + guidance * (eps_c - eps_u), m.alphas_cumprod[t])


def fake_x0(m, x_t, t, emb):
    """Fake score: teacher + fake LoRA at full scale, conditional, no CFG."""
    use_adapter(m.unet, "fake")
    return x0_from_eps(x_t, unet_eps(m, m.unet, x_t, t, emb), m.alphas_cumprod[t])


def generator_eps(m, x, t, emb):
    if m.lora_generator:
        use_adapter(m.unet, "generator")
    return unet_eps(m, m.gen_unet, x, t, emb)


def generator_x0(m, x, t, emb):
    """One generator step's x0 prediction from x_t at grid timestep t (no CFG)."""
    return x0_from_eps(x, generator_eps(m, x, t, emb), m.alphas_cumprod[t])


def generator_rollout(m, z, emb, num_steps, generator=None):
    """Run the first `num_steps` generator steps from z (LCM-like: predict x0, renoise to the next grid
    timestep with fresh noise) -> x at t_{num_steps}."""
    x, ts = z, m.timesteps
    for k in range(num_steps):
        x0 = generator_x0(m, x, ts[k], emb)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x = add_noise(x0, noise, m.alphas_cumprod[ts[k + 1]])
    return x


@torch.no_grad()
def sample_generator(m, z, emb, generator=None):
    """All K steps -> x0 (B, 4, h, w); what the saved pipeline (LCMScheduler) computes."""
    K = len(m.timesteps)
    return generator_x0(m, generator_rollout(m, z, emb, K - 1, generator), m.timesteps[K - 1], emb)


def backward_simulation(m, z, emb, k):
    """DMD2's backward simulation: sample i runs the generator's first k[i] steps from z (B, 4, h, w) without
    grad, and its x0 at step k[i] is returned, with grad if grad is enabled. The samples still running share one
    UNet call per step, so a stack of batches costs K calls, not K per batch. A call in which some sample stops
    runs with grad (if enabled) for all it holds: a batch trained with grad takes one k (DMD2 draws one per batch)."""
    ts, grad = m.timesteps, torch.is_grad_enabled()
    x, alive, parts = z, torch.arange(len(z)), []
    for j in range(int(k.max()) + 1):
        noise = torch.randn_like(z)  # drawn for all B, so a sample's noise does not depend on the others' k
        stop = k[alive] == j
        with torch.set_grad_enabled(grad and bool(stop.any())):
            x0 = generator_x0(m, x, ts[j], emb[alive])
        parts.append((alive[stop], x0[stop]))
        alive = alive[~stop]
        x = add_noise(x0[~stop].detach(), noise[alive], m.alphas_cumprod[ts[j + 1]]) if len(alive) else None
    order = torch.cat([i for i, _ in parts]).argsort()
    return torch.cat([x0 for _, x0 in parts])[order]


@torch.no_grad()
def teacher_sample(m, z, emb, uncond, steps, guidance):
    """The teacher's own sampler (DDIM, eta 0, CFG) on a trailing grid -> x0 latents. Draws no random numbers,
    so evaluating never shifts the training RNG (exact --resume)."""
    use_adapter(m.unet, None)
    ts, x = trailing_timesteps(steps).to(m.device), z
    for k in range(steps):
        t_prev = ts[k + 1] if k + 1 < steps else torch.tensor(-1, device=m.device)
        eps_u, eps_c = unet_eps(m, m.unet, torch.cat([x, x]), ts[k], torch.cat([uncond.expand_as(emb), emb])).chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        x = ddim_step_with_logprob(eps, ts[k], t_prev, x, m.alphas_cumprod, eta=0.0, prev_sample=x)[2]  # the mean
    return x


def decode(m, latents, chunk=8):
    """(B, 4, h, w) -> images (B, 3, H, W) in [-1, 1], differentiable (ReFL backpropagates through it); in chunks,
    as the VAE's activations at 512 px are large (DPO and GRPO decode 2B and B*G images for their rewards)."""
    with m.ctx():
        return torch.cat([m.vae.decode(z / m.vae.config.scaling_factor).sample.float() for z in latents.split(chunk)])


# ---------------------------------------------------------------------------------------------------
# Rewards: CLIP text-image score and LAION aesthetic score (open_clip), differentiable (resize and
# normalise in torch)
# ---------------------------------------------------------------------------------------------------
def reward_pretrained(cfg):
    offline = cfg.teacher in ("tiny", "sd15-random")
    return (cfg.reward_weights or ("random" if offline else "pretrained")) == "pretrained"


def create_clip(cfg, arch, tag):
    """An open_clip model: `arch` with `tag`'s weights, random with --reward-weights random, tiny for tiny."""
    import open_clip
    torch.manual_seed(0)
    if cfg.teacher == "tiny" and not reward_pretrained(cfg):  # a tiny random CLIP for 32 px images (as redif.py's)
        return open_clip.model.CLIP(embed_dim=32, vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=2, width=32, head_width=16, patch_size=8, image_size=32),
            text_cfg=open_clip.model.CLIPTextCfg(width=32, heads=2, layers=2))
    quick_gelu = bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu"))  # OpenAI's tags: the arch says GELU
    try:
        return open_clip.create_model(arch, pretrained=tag if reward_pretrained(cfg) else None,
                                      force_quick_gelu=quick_gelu)
    except Exception as e:  # noqa: BLE001 - offline, unknown tag ...
        fail(f"could not load reward model {arch}/{tag}: {str(e).splitlines()[0][:500]}",
             "check the network, or --reward-weights random")


def load_clip(cfg, device, dtype):
    import open_clip
    model = create_clip(cfg, cfg.clip_model, cfg.clip_pretrained)
    return model.requires_grad_(False).eval().to(device, dtype), open_clip.get_tokenizer(cfg.clip_model)


def aesthetic_head(dim):
    """LAION's improved aesthetic predictor: a linear stack (no activations, as it was trained) on unit CLIP
    ViT-L/14 image embeddings -> a score of about 1-10."""
    nn = torch.nn
    return nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def load_aesthetic(cfg, device, dtype):
    clip = create_clip(cfg, "ViT-L-14", "openai")
    head = aesthetic_head(clip.visual.output_dim)
    if reward_pretrained(cfg):
        path = cfg.aesthetic_model
        try:
            if not os.path.isfile(path):
                from huggingface_hub import hf_hub_download
                path = hf_hub_download(cfg.aesthetic_model, "aesthetic-model.pth")
            state = torch.load(path, map_location="cpu", weights_only=True)
            head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
        except Exception as e:  # noqa: BLE001 - offline, not the predictor's checkpoint ...
            fail(f"could not load the aesthetic head '{cfg.aesthetic_model}': {str(e).splitlines()[0][:500]}",
                 "pass --aesthetic-model FILE.pth, or --reward-weights random")
    return tuple(model.requires_grad_(False).eval().to(device, dtype) for model in (clip, head))


def clip_features(m, images, clip=None):
    """images (B, 3, H, W) in [-1, 1] -> unit CLIP image embeddings (B, E) of `clip` (default: m.clip)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    clip = m.clip if clip is None else clip
    size = clip.visual.image_size
    x = F.interpolate((images + 1) / 2, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    with m.ctx():
        return F.normalize(clip.encode_image((x - mean) / std).float(), dim=-1)


def aesthetic_score(m, images):
    """LAION aesthetic score (B,)."""
    clip, head = m.aesthetic
    feats = clip_features(m, images, clip)
    with m.ctx():
        return head(feats).float().squeeze(-1)


def clip_score(m, images, prompts):
    """CLIP text-image cosine (B,)."""
    with torch.no_grad(), m.ctx():
        text = F.normalize(m.clip.encode_text(m.clip_tokenizer(prompts).to(m.device)).float(), dim=-1)
    return (clip_features(m, images) * text).sum(-1)


def reward_fn(m, cfg, images, prompts):
    """R = sum_j w_j R_j over the --reward terms -> (B,)."""
    weights = parse_reward(cfg.reward)
    terms = {"clip_text": lambda: clip_score(m, images, prompts), "aesthetic": lambda: aesthetic_score(m, images)}
    return sum(w * terms[name]() for name, w in weights.items() if w)


# ---------------------------------------------------------------------------------------------------
# Losses: fake score (E9), RL branch (E12)
# ---------------------------------------------------------------------------------------------------
def fake_score_loss(m, x0, emb, t, noise):
    """E9: epsilon loss of the fake score on detached generator samples x0 (B, 4, h, w)."""
    use_adapter(m.unet, "fake")
    return F.mse_loss(unet_eps(m, m.unet, add_noise(x0, noise, m.alphas_cumprod[t]), t, emb), noise)


def refl_loss(m, cfg, emb, prompts):
    """E12 ReFL: L_rl = -R(decode(G(z)), c), backpropagated through the VAE decoder and CLIP, on the generator's
    output: its K steps from fresh noise, the last with grad (the image a user gets, as for DPO and GRPO; not
    backward simulation's x0 of a random step, whose early, blurrier estimates the toy saw climb the reward
    while the final samples did not)."""
    z = torch.randn(len(prompts), *latent_shape(m), device=m.device)
    x0 = backward_simulation(m, z, emb, torch.full((len(prompts),), len(m.timesteps) - 1))
    return reward_surrogate(m, cfg, x0, prompts)


def reward_surrogate(m, cfg, x0, prompts):
    """-R(decode(x0), prompts) as a loss in x0 (B, 4, h, w) -> (loss, rewards (B,)).

    The decoder's activations for that backward are the largest of the run (about 2.8 GiB per 512 px image in
    bf16, against 0.9 for the UNet's), so dL_rl/dx0 is computed here image by image, each image's decoder graph
    freed after its backward, and L_rl enters the generator's loss as x0 . stopgrad(dL_rl/dx0): the same value
    and the same gradient w.r.t. the generator (tested), one image's decoder activations at a time."""
    x0_leaf = x0.detach().requires_grad_(True)
    rewards = []
    for i in range(len(prompts)):
        r = reward_fn(m, cfg, decode(m, x0_leaf[i:i + 1]), prompts[i:i + 1])
        (-r.sum() / len(prompts)).backward()  # accumulates dL_rl/dx0 into x0_leaf.grad
        rewards.append(r.detach())
    r = torch.cat(rewards)
    surrogate = (x0 * x0_leaf.grad).sum()
    return surrogate - surrogate.detach() - r.mean(), r


def dpo_loss(m, cfg, emb, prompts):
    """E12 DPO: two generator samples per prompt ranked by reward; Diffusion-DPO loss against the generator as
    RL started (as in toy/; Diffusion-DPO's reference is the model before DPO) at a random grid timestep (our
    choice)."""
    B = len(prompts)
    z = torch.randn(2 * B, *latent_shape(m), device=m.device)
    with torch.no_grad():
        x0 = sample_generator(m, z, torch.cat([emb, emb]))
        r = reward_fn(m, cfg, decode(m, x0), prompts + prompts)
    if not torch.isfinite(r).all():  # a NaN ranks as a loser: the loss would stay finite and the run go on
        raise NonFinite(f"non-finite rewards in DPO: {r.tolist()}")
    win = (r[:B] >= r[B:]).view(B, 1, 1, 1)
    x_w, x_l = torch.where(win, x0[:B], x0[B:]), torch.where(win, x0[B:], x0[:B])
    t = m.timesteps[torch.randint(len(m.timesteps), (B,), device=m.device)]
    noise = torch.randn_like(x_w)
    x_t = add_noise(torch.cat([x_w, x_l]), torch.cat([noise, noise]), m.alphas_cumprod[torch.cat([t, t])])
    t2, emb2 = torch.cat([t, t]), torch.cat([emb, emb])
    with torch.no_grad(), dpo_reference(m):
        err_ref = (generator_eps(m, x_t, t2, emb2) - noise.repeat(2, 1, 1, 1)).pow(2).mean(dim=(1, 2, 3))
    err = (generator_eps(m, x_t, t2, emb2) - noise.repeat(2, 1, 1, 1)).pow(2).mean(dim=(1, 2, 3))
    diff = (err[:B] - err_ref[:B]) - (err[B:] - err_ref[B:])  # (B,) winner's gain minus loser's
    return -F.logsigmoid(-0.5 * cfg.dpo_beta * diff).mean(), r.detach()


def grpo_loss(m, cfg, emb, prompts):
    """E12 GRPO: G episodes per prompt share prompt and state (METHOD section 3); they differ in the eta-noise
    of the stochastic last generator step (E1, E2); group-normalised advantages (E4), clipped surrogate (E5).
    One update per sample (on-policy), so old_log_prob = log_prob.detach() and the ratio is 1. The G episodes
    of a group share the state, hence the policy's mean: one UNet call per prompt (B images with grad, not B*G)."""
    B, G, K = len(prompts), cfg.grpo_group, len(m.timesteps)
    z = torch.randn(B, *latent_shape(m), device=m.device)
    with torch.no_grad():
        x = generator_rollout(m, z, emb, K - 1)  # (B, 4, h, w): the state at the last grid timestep
    t = m.timesteps[K - 1]
    eps = generator_eps(m, x, t, emb).repeat_interleave(G, 0)  # (B*G, 4, h, w)
    sample, log_prob, _, _ = ddim_step_with_logprob(eps, t, -1, x.repeat_interleave(G, 0), m.alphas_cumprod,
                                                    eta=cfg.grpo_eta)
    with torch.no_grad():
        r = reward_fn(m, cfg, decode(m, sample.detach()), [p for p in prompts for _ in range(G)])
    adv = grpo_advantages(r.view(B, G)).view(-1)  # E4
    return clipped_surrogate(log_prob, log_prob.detach(), adv, cfg.grpo_clip), r


def latent_shape(m):
    return (m.unet.config.in_channels, m.unet.config.sample_size, m.unet.config.sample_size)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
class NonFinite(ValueError):
    """A NaN/inf score, loss, reward or gradient: main() stops with one line naming the checkpoint to resume."""


def check_finite(name, value, it):
    if not torch.isfinite(torch.as_tensor(value)).all():
        raise NonFinite(f"non-finite {name} at iteration {it}")


def generator_update(m, cfg, opt_g, step, prompts):
    """One generator update: DMD (E8) at a DynaRS time (E11) against the DynaDG real score (E10), + RL (E12).
    L_dmd is backpropagated before the RL branch builds its graph: the same gradient as backpropagating their
    sum, with the peak memory of the larger graph rather than of both."""
    t0 = time.perf_counter()
    emb, uncond = encode_prompts(m, prompts), m.uncond
    z = torch.randn(len(prompts), *latent_shape(m), device=m.device)
    k = torch.randint(len(m.timesteps), (1,)).expand(len(prompts))
    x0 = backward_simulation(m, z, emb, k)  # (B, 4, h, w), with grad
    lam = dynadg_scale(step, cfg.dynadg_lambda0, cfg.dynadg_steps) if cfg.dynadg else 0.0  # E10
    t = sample_renoise_timesteps(len(prompts), step, cfg.dynars_a0, cfg.dynars_b0, cfg.dynars_steps,
                                 dynamic=cfg.dynars).to(m.device)  # E11
    with torch.no_grad():
        x_t = add_noise(x0.detach(), torch.randn_like(x0), m.alphas_cumprod[t])
        x0_real = real_x0(m, x_t, t, emb, uncond, cfg.real_guidance, lam)
        x0_fake = fake_x0(m, x_t, t, emb)
    for name, x0_score in (("real score", x0_real), ("fake score", x0_fake)):  # nan_to_num in E8 would hide a NaN
        check_finite(name, x0_score, step + 1)
    loss_dmd = dmd_loss(x0, x0_real, x0_fake)  # E8
    check_finite("DMD loss", loss_dmd, step + 1)
    opt_g.zero_grad(set_to_none=True)
    generator_backward(m, loss_dmd)
    rl, reward, sec_rl = None, None, 0.0
    if cfg.rl != "none" and step >= cfg.rl_start:
        t1 = time.perf_counter()
        if cfg.rl == "dpo" and m.dpo_ref is None:
            m.dpo_ref = snapshot_generator(m)
        rl, reward = {"refl": refl_loss, "dpo": dpo_loss, "grpo": grpo_loss}[cfg.rl](m, cfg, emb, prompts)
        check_finite("RL loss", rl, step + 1)
        generator_backward(m, cfg.rl_weight * rl)  # E12: L = L_dmd + lambda_rl L_rl
        sec_rl = time.perf_counter() - t1
    params = [p for g in opt_g.param_groups for p in g["params"]]
    check_finite("generator gradient", torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm), step + 1)
    opt_g.step()
    return {"dmd_loss": loss_dmd.item(), "grad_norm": math.sqrt(2 * loss_dmd.item()),  # RMS of g = sqrt(2 L_dmd)
            "rl_loss": None if rl is None else rl.item(), "reward": None if reward is None else reward.mean().item(),
            "dynadg_scale": lam, "dynars_mean": beta_mean(cfg, step), "lr": opt_g.param_groups[0]["lr"],
            "sec_generator": time.perf_counter() - t0 - sec_rl, "sec_rl": sec_rl}


def generator_backward(m, loss):
    if m.lora_generator:
        use_adapter(m.unet, "generator")  # its weights must require grad while the graph is backpropagated
    loss.backward()


def beta_mean(cfg, step):
    a, b = dynars_beta(step, cfg.dynars_a0, cfg.dynars_b0, cfg.dynars_steps) if cfg.dynars else (1.0, 1.0)
    return a / (a + b)  # mean of u: renoise at t ~ 20 + 960 * this on average


def fake_updates(m, cfg, opt_f, step, train_prompts):
    """`fake_updates` steps of the fake score (E9) on fresh detached generator samples (two time-scale). The
    generator does not change across them, so one backward simulation (a k per sample, as in toy/) draws the
    samples of all of them: UNet calls of fake_updates x batch_size images instead of batch_size. Without grad
    their activations are smaller than those of the generator update's batch with grad."""
    t0, losses, n, B = time.perf_counter(), [], cfg.fake_updates, cfg.batch_size
    if n:
        prompts = pick_prompts(train_prompts, n * B)
        emb = encode_prompts(m, prompts)
        z = torch.randn(n * B, *latent_shape(m), device=m.device)
        with torch.no_grad():
            x0 = backward_simulation(m, z, emb, torch.randint(len(m.timesteps), (n * B,)))
    for i in range(n):
        batch = slice(i * B, (i + 1) * B)
        t = sample_renoise_timesteps(B, step, cfg.dynars_a0, cfg.dynars_b0, cfg.dynars_steps,
                                     dynamic=cfg.dynars).to(m.device)  # E11 also for the fake loss
        loss = fake_score_loss(m, x0[batch], emb[batch], t, torch.randn_like(x0[batch]))
        check_finite("fake-score loss", loss, step + 1)
        opt_f.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(opt_f.param_groups[0]["params"], cfg.max_grad_norm)
        check_finite("fake gradient", grad_norm, step + 1)
        opt_f.step()
        losses.append(loss.item())
    return {"fake_loss": sum(losses) / max(len(losses), 1), "sec_fake": time.perf_counter() - t0}


def pick_prompts(prompts, n):
    return [prompts[i] for i in torch.randint(len(prompts), (n,)).tolist()]


# ---------------------------------------------------------------------------------------------------
# Profiling (--profile N): seconds per phase, model evaluations by kind, the floor they imply, peak memory
# ---------------------------------------------------------------------------------------------------
# Per-image costs measured on the lent H100 (issue 5): random-weight SD1.5 UNet, 512 px, bf16, eager PyTorch.
# Forward 52 ms / 16 images; forward+backward+AdamW 180 ms / 16; VAE decode 100 ms / 8. A decode with grad (ReFL)
# is counted as 3 decodes (forward + a backward of about twice its cost), not measured.
H100_SD15_MS = {"unet fwd": 52 / 16, "unet fwd+bwd": 180 / 16, "vae fwd": 100 / 8, "vae fwd+bwd": 3 * 100 / 8}
SD15_UNET_PARAMS = 859_520_964
UNET_CALLERS = {"real_x0": "real score", "fake_x0": "fake score", "fake_score_loss": "fake score",
                "generator_eps": "generator"}  # the function of this file that calls the UNet names the kind
RL_LOSSES = {"refl_loss", "dpo_loss", "grpo_loss"}  # they call the generator too: RL wins


def unet_caller():
    names = {frame.f_code.co_name for frame, _ in traceback.walk_stack(None)}
    return "rl" if names & RL_LOSSES else next(UNET_CALLERS[n] for n in UNET_CALLERS if n in names)


def count_evaluations(counts, module, kind):
    """Forward hook: counts["<kind> fwd" or "<kind> fwd+bwd"] += images in the call (a CFG call on b images = 2b).
    Grad enabled means a backward follows (every grad-enabled call in the loop is backpropagated)."""
    def hook(mod, args, output):
        name = unet_caller() if kind == "unet" else kind
        counts[f"{name} {'fwd+bwd' if torch.is_grad_enabled() else 'fwd'}"] += args[0].shape[0]
    return module.register_forward_hook(hook)


def floor_seconds(m, counts, checkpointing=False):
    """Evaluations x H100 SD1.5 cost, scaled by latent area (latent/64)^2 and UNet size; no reward model. Gradient
    checkpointing reruns each forward with grad in the backward: one forward more."""
    params = sum(p.numel() for n, p in m.unet.named_parameters() if "lora_" not in n)
    scale = (m.unet.config.sample_size / 64) ** 2 * params / SD15_UNET_PARAMS

    def cost(model, grad):
        extra = H100_SD15_MS[f"{model} fwd"] if checkpointing and grad != "fwd" else 0.0
        return H100_SD15_MS[f"{model} {grad}"] + extra
    ms = {k: cost("vae" if k.startswith("vae") else "unet", k.split()[-1]) * scale
          for k in counts if not k.startswith("reward")}
    return sum(counts[k] * v for k, v in ms.items()) / 1000, ms


def profile(m, cfg, opt_g, opt_f, step, train_prompts, metrics_path):
    """Warm-up iterations (allocator, autotuning; with --compile its graphs), then cfg.profile iterations of the
    loop's two updates."""
    def iteration(s):
        row = generator_update(m, cfg, opt_g, s, pick_prompts(train_prompts, cfg.batch_size))
        return {**row, **fake_updates(m, cfg, opt_f, s, train_prompts)}
    warm = 3 if cfg.compile else 1
    for s in range(step, step + warm):
        iteration(s)
    step += warm - 1
    counts, sec = collections.Counter(), collections.Counter()
    hooks = [count_evaluations(counts, u, "unet") for u in {id(u): u for u in (m.unet, m.gen_unet)}.values()]
    hooks += [count_evaluations(counts, m.vae.decoder, "vae decode"),
              count_evaluations(counts, m.clip.visual, "reward")]
    if m.aesthetic is not None:
        hooks.append(count_evaluations(counts, m.aesthetic[0].visual, "reward"))
    cuda = m.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for s in range(step + 1, step + 1 + cfg.profile):
        sec.update({k: v for k, v in iteration(s).items() if k.startswith("sec_")})
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    sec["sec_other"] = wall - sum(sec.values())
    floor, ms = floor_seconds(m, counts, cfg.gradient_checkpointing)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    print(f"\n## dmdr --profile {cfg.profile} (after {warm} warm-up iterations; no evaluation or checkpoint)\n\n"
          "| phase | seconds | share |\n|---|---:|---:|")
    # sec_rl: the RL branch's forward and backward (sampling, reward, its loss)
    for k in ("sec_generator", "sec_fake", "sec_rl", "sec_other"):
        print(f"| {k[4:]} | {sec[k]:.3f} | {sec[k] / wall:.0%} |")
    print(f"| wall | {wall:.3f} | 100% |\n\n| evaluations (images) | count | floor ms/image |\n|---|---:|---:|")
    for k, n in sorted(counts.items()):
        print(f"| {k} | {n} | {f'{ms[k]:.4g}' if k in ms else 'not in floor'} |")
    print(f"\nfloor {floor:.4g} s: H100 SD1.5 costs scaled to this UNet's size and resolution, meaningful on an H100 "
          f"only (a decode with grad = 3 decodes)\nwall / floor = {wall / floor:.1f}; peak GPU memory "
          + (f"{peak:.2f} GiB" if cuda else "n/a (cpu)"))
    if cfg.rl != "none" and step + 1 < cfg.rl_start:
        print(f"note: the RL branch is off before --rl-start {cfg.rl_start}; pass --rl-start 0 to profile it")
    row = {"phase": "profile", "iter": step, "iters": cfg.profile, "wall_s": wall, **sec, "evals": counts,
           "floor_s": floor, "wall_over_floor": wall / floor, "peak_gib": peak}  # "iter": --resume filters on it
    with open(metrics_path, "a") as f:
        f.write(json_line(row))


# ---------------------------------------------------------------------------------------------------
# Evaluation: held-out prompts, fixed noise; reward, CLIP score, Frechet distance in CLIP space, PNG grid
# ---------------------------------------------------------------------------------------------------
def json_line(row):
    """A metrics.jsonl line; NaN/inf -> null, so that every line is valid JSON (jq, pandas), not Python's NaN."""
    return json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}) + "\n"


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2) for features (N, E), float64."""
    f1, f2 = f1.double(), f2.double()
    if not (torch.isfinite(f1).all() and torch.isfinite(f2).all()):
        return float("nan")  # logged as null (eigh would raise)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    c1, c2 = torch.cov(f1.T).reshape(f1.shape[1], -1), torch.cov(f2.T).reshape(f2.shape[1], -1)

    def sqrtm(c):
        w, v = torch.linalg.eigh(c)
        return (v * w.clamp(min=0).sqrt()) @ v.T
    s1 = sqrtm(c1)
    return ((mu1 - mu2).pow(2).sum() + c1.trace() + c2.trace() - 2 * sqrtm(s1 @ c2 @ s1).trace()).item()


def save_grid(path, top, bottom):
    """Two rows of images in [-1, 1] (generator above teacher) -> PNG."""
    from PIL import Image
    rows = [torch.cat(list(x.clamp(-1, 1)), dim=2) for x in (top, bottom)]  # (3, H, N*W) each
    img = ((torch.cat(rows, dim=1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(img).save(path)


@torch.no_grad()
def evaluate(m, cfg, eval_prompts, cache, it, out):
    g = torch.Generator(m.device).manual_seed(cfg.seed + 1)  # fixed noise, apart from the training RNG
    z = torch.randn(len(eval_prompts), *latent_shape(m), generator=g, device=m.device)
    emb = encode_prompts(m, eval_prompts)
    if "teacher" not in cache:  # the teacher's images never change: compute once
        x = teacher_sample(m, z, emb, m.uncond, cfg.eval_teacher_steps, cfg.eval_teacher_guidance)
        cache["teacher"] = decode(m, x)
    img_gen, img_teacher = decode(m, sample_generator(m, z, emb, generator=g)), cache["teacher"]
    save_grid(Path(out) / f"samples_{it:06d}.png", img_gen, img_teacher)
    return {"eval_reward": reward_fn(m, cfg, img_gen, eval_prompts).mean().item(),
            "eval_clip_generator": clip_score(m, img_gen, eval_prompts).mean().item(),
            "eval_clip_teacher": clip_score(m, img_teacher, eval_prompts).mean().item(),
            "eval_fd_clip": frechet_distance(clip_features(m, img_gen), clip_features(m, img_teacher)),
            **({"eval_aesthetic_generator": aesthetic_score(m, img_gen).mean().item(),
                "eval_aesthetic_teacher": aesthetic_score(m, img_teacher).mean().item()} if m.aesthetic else {})}


# ---------------------------------------------------------------------------------------------------
# Checkpoints (atomic), resume, the generator as a diffusers pipeline
# ---------------------------------------------------------------------------------------------------
def generator_state(m):
    if m.lora_generator:
        return {n: p.detach().clone() for n, p in generator_params(m).items()}
    return m.gen_unet.state_dict()


def atomic_write(path, obj):
    """Temp file, fsync, rename: a crash mid-write never leaves a broken file (obj: str, or for torch.save)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w" if isinstance(obj, str) else "wb") as f:
            f.write(obj) if isinstance(obj, str) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, a second Ctrl-C: no stray temp file (a checkpoint's can be GBs)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if is_write_error(e):
            write_failed(path, e)
        raise


def is_write_error(e):
    """A full disk, a quota or a read-only folder as each writer reports it: Python and PIL raise OSError, torch.save's
    zip writer a RuntimeError from inline_container.cc, safetensors (save_pretrained) a SafetensorError."""
    from safetensors import SafetensorError
    return isinstance(e, (OSError, SafetensorError)) or (isinstance(e, RuntimeError) and "inline_container" in str(e))


def write_failed(path, error):
    reason = (error.strerror if isinstance(error, OSError) and error.strerror
              else f"the write failed ({(str(error).strip().splitlines() or [type(error).__name__])[-1]})")
    fail(f"could not write {path}: {reason}", "free disk space or fix permissions, then run again; the files there "
         "are intact, and --resume continues from the last checkpoint, if one was saved")


def parse_json(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def save_checkpoint(path, m, opt_g, opt_f, step):
    # CUDA: the GPU in use only (get_rng_state_all would tie the checkpoint to the number of GPUs visible)
    state = {"step": step, "generator": generator_state(m), "dpo_ref": m.dpo_ref,
             "fake": {n: p.detach().clone() for n, p in m.unet.named_parameters() if ".fake." in n},
             "opt_g": opt_g.state_dict(), "opt_f": opt_f.state_dict(),
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}
    atomic_write(path, state)


def load_checkpoint(path, m, opt_g, opt_f):
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # not beside the live model on the GPU
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # truncated, empty, a folder
        fail(f"{path} is unreadable ({type(e).__name__})", "restore it from a copy, or start a new --out")
    if (not isinstance(state, dict) or not {"step", "generator", "fake", "opt_g", "opt_f", "rng"} <= set(state)
            or not {"python", "numpy", "torch", "cuda"} <= set(state["rng"])):
        fail(f"{path} is not a dmdr.py checkpoint", "point --out at a dmdr.py run")
    shapes = {"generator": generator_params(m) if m.lora_generator else m.gen_unet.state_dict(),
              "fake": {n: p for n, p in m.unet.named_parameters() if ".fake." in n}}
    for part, ours in shapes.items():
        if {n: t.shape for n, t in ours.items()} != {n: getattr(t, "shape", None) for n, t in state[part].items()}:
            fail(f"checkpoint {path} does not match this {part}", "resume with the run's --generator and ranks")
    params = dict(m.unet.named_parameters())
    with torch.no_grad():
        for n, v in state["fake"].items():
            params[n].copy_(v)
        if m.lora_generator:
            for n, v in state["generator"].items():
                params[n].copy_(v)
        else:
            m.gen_unet.load_state_dict(state["generator"])
    m.dpo_ref = None if state.get("dpo_ref") is None else {n: v.to(m.device) for n, v in state["dpo_ref"].items()}
    opt_g.load_state_dict(state["opt_g"]), opt_f.load_state_dict(state["opt_f"])
    random.setstate(state["rng"]["python"]), np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
    return state["step"]


def save_generator(m, cfg, folder):
    """The generator merged into a plain UNet + LCMScheduler whose K-step schedule is our trailing grid
    (original_inference_steps=1000) and whose boundary scalings are c_skip ~ 0, c_out ~ 1 (large
    timestep_scaling), so StableDiffusionPipeline(..., num_inference_steps=K, guidance_scale=0) = sample_generator.
    The frozen parts are reloaded in float32: in memory they may be bf16, and rounding the teacher is lossy."""
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    unet, vae, text_encoder, tokenizer = load_teacher(cfg.teacher)
    lora = None
    if m.lora_generator:
        unet.add_adapter(generator_lora_config(cfg), adapter_name="generator")
        unexpected = unet.load_state_dict(generator_params(m), strict=False).unexpected_keys  # missing: the base
        assert not unexpected, f"LoRA weights the saved UNet lacks (peft names changed?): {unexpected[:3]}"
        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="generator"))
        unet.fuse_lora(adapter_names=["generator"])
        unet.unload_lora()
    else:
        unet.load_state_dict(m.gen_unet.state_dict())
    scheduler = LCMScheduler.from_config(sd_scheduler().config, original_inference_steps=1000, timestep_scaling=1e6)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp, old = Path(f"{folder}.tmp"), Path(f"{folder}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # then swapped in: a crash never leaves a half-written generator folder
        pipe.save_pretrained(tmp)
        if lora is not None:  # the LoRA alone too (MBs), for load_lora_weights on the teacher (alpha = r: scale 1)
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=lora)
    except BaseException as e:  # as atomic_write: no GBs of half-written pipeline left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(e):
            write_failed(folder, e)
        raise
    shutil.rmtree(old, ignore_errors=True)  # left by a crash between the two renames below of an earlier save
    if Path(folder).exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def run(argv, held):
    cfg = parse_args(argv)
    out = Path(cfg.out)
    check_out_dir(cfg, out)
    if out.is_dir():  # now if it can, not after minutes of loading models
        lock_run_folder(out, held)
    if cfg.resume:
        cfg = resume_config(cfg, given_flags(argv), out)
    train_prompts, eval_prompts = validate(cfg)
    if cfg.resume:
        check_same_prompts(out, train_prompts + eval_prompts)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # config.json records what "auto" became: a --resume on another machine runs the same precision
    cfg.precision = "bf16" if frozen_dtype(cfg, device) == torch.bfloat16 else "fp32"
    ckpt = out / "checkpoint.pt"
    print(run_summary(cfg, device))
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)

    m = build_models(cfg, device)  # a teacher or reward model that fails to load leaves no run folder behind
    m.uncond = encode_prompts(m, [""])  # (1, 77, D)
    opt_g = torch.optim.AdamW(list(generator_params(m).values()), lr=cfg.lr)
    opt_f = torch.optim.AdamW(lora_params(m.unet, "fake"), lr=cfg.fake_lr)
    torch.manual_seed(cfg.seed)  # training draws start here, whatever model building consumed
    step = load_checkpoint(ckpt, m, opt_g, opt_f) if cfg.resume else 0
    if step > cfg.iters:
        fail(f"--iters {cfg.iters}: the run is past it, at iteration {step}", f"pass --iters {step} or more")
    out.mkdir(parents=True, exist_ok=True)
    if not held:
        lock_run_folder(out, held)
    if not cfg.profile or not cfg.resume:  # a resumed profile's flags are for its own timing, not for the run
        atomic_write(out / "config.json", json.dumps(asdict(cfg), indent=2))  # on --resume: with the changes
    if not cfg.resume:
        atomic_write(out / "prompts.txt", "".join(p + "\n" for p in train_prompts + eval_prompts))
        for stale in out.glob("samples_*.png"):  # of a run that stopped before its first checkpoint
            stale.unlink()
    for opt, lr in ((opt_g, cfg.lr), (opt_f, cfg.fake_lr)):
        for group in opt.param_groups:
            group["lr"] = lr  # the checkpoint's optimiser state carries the old lr
    metrics_path = out / "metrics.jsonl"
    lines = metrics_path.read_text().splitlines() if cfg.resume and metrics_path.exists() else []
    rows = [(line, parse_json(line)) for line in lines]  # a line cut short by a crash does not parse: dropped
    atomic_write(metrics_path, "".join(line + "\n" for line, row in rows  # lines after the checkpoint are redone
                                       if isinstance(row, dict) and isinstance(row.get("iter"), int)
                                       and row["iter"] <= step and row.get("phase") != "profile"))
    if cfg.profile:
        return profile(m, cfg, opt_g, opt_f, step, train_prompts, metrics_path)

    stop = []  # the first signal: finish the iteration, checkpoint, exit (exactly resumable); a second aborts

    def on_signal(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        print(f"\n{signal.Signals(signum).name}: finishing this iteration, then saving a checkpoint (Ctrl-C again "
              "to abort)", file=sys.stderr)

    # Ctrl-C, and SIGTERM: what timeout, SLURM's preemption and docker stop send
    # (a signal set to be ignored stays so: bash starts a background `&` job with SIGINT ignored, so that the
    # terminal's Ctrl-C leaves it running; Python itself keeps such a SIGINT ignored)
    handled = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN
               and threading.current_thread() is threading.main_thread()]
    old_handlers = {sig: signal.signal(sig, on_signal) for sig in handled}
    cache, saved = {}, step if cfg.resume else None  # saved: the iteration of the checkpoint on disk
    try:
        bar = tqdm(range(step, cfg.iters), initial=step, total=cfg.iters, desc="dmdr", disable=None)
        for step in bar:
            row = {"iter": step + 1}
            row.update(generator_update(m, cfg, opt_g, step, pick_prompts(train_prompts, cfg.batch_size)))
            row.update(fake_updates(m, cfg, opt_f, step, train_prompts))
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.iters:
                row.update(evaluate(m, cfg, eval_prompts, cache, step + 1, out))
            with open(metrics_path, "a") as f:
                f.write(json_line(row))
            bar.set_postfix(dmd=f"{row['dmd_loss']:.4f}", fake=f"{row['fake_loss']:.4f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.iters or stop:
                save_checkpoint(ckpt, m, opt_g, opt_f, step + 1)
                saved = step + 1
            if stop:  # a non-zero status: no generator was written, so `dmdr.py ... && next-step` stops here
                print(f"interrupted: checkpoint at iteration {step + 1} in {ckpt} (continue with --out {out} --resume)",
                      file=sys.stderr)
                raise SystemExit(128 + stop[0])
        save_generator(m, cfg, out / "generator")
        print(f"done: generator in {out / 'generator'}, metrics in {metrics_path}")
        return out
    except NonFinite as e:  # mid-iteration (some updates of it made): not a state to resume from; keep the last one
        fail(str(e), f"lower --lr/--fake-lr, then --resume from {ckpt} (iteration {saved})" if saved is not None
             else "lower --lr/--fake-lr and start afresh (no checkpoint yet: one every --save-every)")
    except KeyboardInterrupt:  # a second signal: stop now, mid-iteration; the last checkpoint stays
        print(f"aborted in iteration {step + 1}; " + (f"{ckpt} (iteration {saved}) continues with --out {out} --resume"
                                                     if saved is not None else "no checkpoint was saved"),
              file=sys.stderr)
        raise SystemExit(130)
    except OSError as e:  # the disk filled (or went read-only) under the metrics or a sample grid
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            write_failed(e.filename or out, e)
        raise
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def main(argv=None):
    # the run folder's lock is let go however the run ends, a one-line error too: in a notebook the process lives on
    held = []
    try:
        return run(argv, held)
    finally:
        for lock in held:
            os.close(lock)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # outside the training loop (loading, --profile): nothing to save
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
