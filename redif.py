"""ReDiF: reinforced distillation of a Stable Diffusion teacher into a K-step student, in one file.

The student is the teacher's UNet (LoRA or full fine-tune) sampled with K DDIM steps. One K-step sampling run
is an episode of an MDP whose actions are DDIM steps with eta > 0 (E1, E2); its reward is how close the
student's image is to the 50-step teacher's image from the same prompt and the same x_T (E3). A behaviour-
cloning warm-up (E7) is followed by GRPO (E4) or DDPO-style PPO, with a clipped surrogate (E5) and a KL
penalty to the student as RL starts (E6). Equation tags are those of docs/METHOD.md.

    pip install -r requirements.txt
    python redif.py --teacher sd15 --steps 5         # SD1.5 -> 5-step student, on a CUDA GPU
    python redif.py --teacher sd15-random --bc-iters 1 --iters 3  # SD1.5 shapes, random weights (GPU speed, memory)
    python redif.py --teacher tiny --device cpu --steps 2 --teacher-steps 10 --prompts-per-iter 2 \
        --bc-iters 5 --iters 10                      # random tiny pipeline: a few minutes on a CPU

The student lands in <out>/student as a stock diffusers pipeline (LoRA merged, no peft needed):

    pipe = StableDiffusionPipeline.from_pretrained("runs/redif/student")  # DDIM with trailing spacing
    image = pipe("a photo of a cat", num_inference_steps=5, guidance_scale=7.5, eta=0.0).images[0]

Precision (--precision, default bf16 on CUDA): frozen parts in bf16 under a bf16 autocast, trainable weights and
AdamW fp32 (also runnable, and tested, on CPU); SDPA attention (diffusers' default processor on torch 2);
optional --gradient-checkpointing and --compile. Ctrl-C (or SIGTERM) finishes the current iteration, saves a
checkpoint and exits; `--out runs/redif --resume` continues exactly with the settings of its config.json (the
flags in RESUME_FREE, a lower --lr say, may be changed; config.json records them).
"""
import argparse
import contextlib
import copy
import dataclasses
import errno
import gzip
import hashlib
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
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def drop_empty_fp32_notice(record):
    """diffusers 0.42 logs "modules ... should be kept in float32: []" on every dtype cast, even when the list is
    empty (SD's UNet and VAE keep none): drop that record; keep it when it names modules."""
    return "kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(drop_empty_fp32_notice)

TEACHER_ALIASES = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "tiny": None, "sd15-random": None}
OFFLINE_ALIASES = ("tiny", "sd15-random")  # built from config with random weights, no download
REWARD_TERMS = ("clip", "dino", "clip_text", "aesthetic", "latent")
EVAL_SEED_BASE = 1_000_000_000  # held-out x_T seeds; training draws its seeds below --seed-pool
DEFAULT_PROMPTS = [
    "a photo of a cat sitting on a windowsill", "a red sports car on a mountain road",
    "a bowl of ramen with a soft boiled egg", "a lighthouse on a cliff at sunset",
    "an astronaut riding a horse, oil painting", "a cozy library with wooden shelves",
    "a corgi wearing sunglasses on the beach", "a watercolor painting of a forest in autumn",
    "a futuristic city skyline at night", "a close-up portrait of an old fisherman",
    "a teapot shaped like a pumpkin", "a snowy village with warm lights in the windows",
]


# ---------------------------------------------------------------------------------------------------
# Config: one dataclass, every field a flag (defaults from the papers / DDPO; "our choice" otherwise)
# ---------------------------------------------------------------------------------------------------
def flag(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    teacher: str = flag("sd15", "'sd15', 'tiny' (random tiny pipeline, CPU seconds), 'sd15-random' (SD1.5 shapes, "
                        "random weights), a hub id or a local diffusers folder of an SD1.x/2.x model")
    steps: int = flag(5, "K, the student's sampling steps on a trailing grid (K=5: 999,799,599,399,199)")
    teacher_steps: int = flag(50, "the teacher's DDIM steps (eta 0); --steps must be below it")
    teacher_guidance: float = flag(7.5, "the teacher's CFG scale w")
    student_guidance: float = flag(7.5, "the student's CFG scale, also at inference (our choice: like the teacher); "
                                   "at least 1 (1: no CFG), as a stock pipeline applies it")
    algo: str = flag("grpo", "grpo: advantages normalised within each group (E4); ppo: DDPO's per-prompt statistics",
                     choices=["grpo", "ppo"])
    group: int = flag(4, "G, rollouts per (prompt, x_T), differing only in eta-noise (GRPO: >= 2; our choice 4)")
    prompts_per_iter: int = flag(8, "(prompt, x_T) pairs per iteration (an RL iteration: prompts_per_iter*G rollouts)")
    reward: str = flag("clip=1,dino=0.5", "E3 weights: clip (CLIP image-image cos), dino (DINOv2 image-image cos), "
                       "clip_text (CLIP text-image cos of the student image), aesthetic (LAION aesthetic score of the "
                       "student image, ~1-10), latent (-MSE to the teacher's latent)")
    reward_weights: str = flag(None, "reward models: 'pretrained' (default for real teachers) or 'random' (default "
                               "for tiny / sd15-random)", choices=["pretrained", "random"])
    clip_model: str = flag("ViT-H-14", "open_clip architecture of the CLIP reward and of the evaluation")
    clip_pretrained: str = flag("laion2b_s32b_b79k", "open_clip pretrained tag")
    dino_model: str = flag("facebook/dinov2-small", "transformers DINOv2 model of the dino reward")
    aesthetic_model: str = flag("trl-lib/ddpo-aesthetic-predictor", "the aesthetic reward's MLP head (on open_clip "
                                "ViT-L-14/openai embeddings, as DDPO): a hub repo with aesthetic-model.pth, or a .pth")
    prompts: str = flag(None, "text file, one prompt a line (default: 12 built-in prompts); no images needed")
    seed_pool: int = flag(32, "x_T seeds per prompt for training, so teacher outputs are reused (our choice)")
    iters: int = flag(100, "RL iterations (sample, reward, update) after the BC warm-up")
    bc_iters: int = flag(50, "behaviour-cloning warm-up iterations before RL (E7; our choice)")
    finetune: str = flag("lora", "train a LoRA (peft) or the full UNet", choices=["lora", "full"])
    lora_rank: int = flag(8, "LoRA rank on the attention projections to_q/to_k/to_v/to_out.0 (our choice)")
    lr: float = flag(None, "AdamW learning rate (default 3e-4 with LoRA as in DDPO, 1e-5 full fine-tune)")
    eta: float = flag(1.0, "DDIM eta of training rollouts (E1: > 0 explores; 0 at evaluation and inference)")
    clip_range: float = flag(1e-4, "ratio clip range (E5); small because log-probs are averaged over dims (DDPO)")
    adv_clip_max: float = flag(5.0, "advantages are clipped to [-this, this] (DDPO)")
    beta: float = flag(0.01, "weight of the KL to the student as RL starts, i.e. after BC (E6; our choice); the "
                       "KL is averaged over latent dims, like the log-prob")
    minibatches: int = flag(2, "optimiser steps per pass over an iteration's rollouts (DDPO-like)")
    train_batch: int = flag(4, "rollouts per forward/backward (gradient accumulation within a minibatch; memory)")
    sample_batch: int = flag(None, "rollouts per sampling forward (default --train-batch: under bf16 the UNet's "
                             "numbers depend on the batch shape, and equal shapes start PPO's ratio at 1, as in "
                             "flow_grpo, whose sample and train batch sizes are equal; larger samples faster)")
    inner_epochs: int = flag(1, "passes over each iteration's rollouts (DDPO)")
    max_grad_norm: float = flag(1.0, "gradient clipping (DDPO)")
    ppo_buffer: int = flag(16, "--algo ppo: rewards kept per prompt (DDPO)")
    ppo_min_count: int = flag(16, "--algo ppo: with fewer, normalise with the batch's statistics (DDPO); at most "
                                  "--ppo-buffer")
    eval_every: int = flag(25, "evaluate every this many iterations, and at start and end (0: start and end only)")
    eval_pairs: int = flag(16, "held-out (prompt, seed) pairs for evaluation (>= 2): the prompts in turn, each with "
                           "a seed that training never draws (the CLIP Frechet distance of so few is a trend, "
                           "not an FID)")
    ckpt_every: int = flag(25, "checkpoint every this many iterations, at the end and on Ctrl-C")
    max_nan_skips: int = flag(3, "stop after this many iterations in a row with non-finite rewards or gradients "
                                "(their updates are skipped)")
    resolution: int = flag(None, "image size in pixels (default: the teacher's own, 512 for SD1.5)")
    teacher_batch: int = flag(8, "(prompt, x_T) pairs per teacher batch when filling the cache")
    teacher_cache: str = flag(None, "folder of cached teacher outputs (default <out>/teacher_cache; shareable)")
    out: str = flag("runs/redif", "output folder")
    device: str = flag("auto", "auto (CUDA if present), cuda or cpu", choices=["auto", "cuda", "cpu"])
    precision: str = flag("auto", "auto: bf16 on CUDA, fp32 on CPU; bf16: frozen weights bf16 under bf16 autocast, "
                          "trainable weights and optimiser fp32 (also runs on CPU, slowly); fp32: all float32 "
                          "(on CUDA, TF32 matmuls and convolutions)", choices=["auto", "bf16", "fp32"])
    resume: bool = flag(False, "continue the run in --out exactly, from its checkpoint.pt; settings not given "
                          "come from its config.json")
    seed: int = flag(0, "seed of everything (LoRA init, prompt and seed draws, eta-noise)")
    gradient_checkpointing: bool = flag(False, "recompute UNet activations in the backward pass (less memory)")
    compile: bool = flag(False, "torch.compile the UNets' forward (inductor) with channels_last weights; the first "
                         "iterations compile a few graphs (off until measured on a GPU)")
    profile: int = flag(0, "profile this many iterations after warm-up (1 iteration, 3 with --compile): seconds per "
                        "phase, UNet evaluations, the H100 floor, peak memory; printed and logged, then exit without "
                        "saving (0: off)")


def build_parser(defaults=True):
    """Every Config field a flag; a switch also has its --no- form (so a --resume can turn it off). Without
    defaults, parsing yields only the flags given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        shown = f.default is not None and f.type is not bool  # a None default's help says what None means
        name, kw = "--" + f.name.replace("_", "-"), dict(help=f.metadata["help"] + " (default: %(default)s)" * shown)
        kw["default"] = f.default if defaults else argparse.SUPPRESS
        if f.type is bool and f.name == "resume":
            parser.add_argument(name, action="store_true", **kw)
        elif f.type is bool:
            kw["help"] += f" (default: {'on' if f.default else 'off'})"
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(name, type=f.type, choices=f.metadata.get("choices"), **kw)
    return parser


def parse_args(argv=None):
    return Config(**vars(build_parser().parse_args(argv)))


def given_flags(argv=None):
    """The names of the settings given on the command line (a --resume takes the others from config.json)."""
    return set(vars(build_parser(defaults=False).parse_args(argv)))


def fail(message, fix):
    """User mistakes end in one line that names the fix."""
    raise SystemExit(f"error: {message} (fix: {fix})")


# ---------------------------------------------------------------------------------------------------
# Teachers: hub ids, local folders and two offline aliases built from config with random weights
# ---------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def offline_clip_tokenizer():
    """SD's CLIP tokenizer rebuilt from the BPE file open_clip ships: byte-to-unicode table, then merges."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # 49408 tokens
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as fh:
            json.dump({token: i for i, token in enumerate(vocab)}, fh)
        with open(os.path.join(tmp, "merges.txt"), "w") as fh:
            fh.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77)


def build_offline_pipeline(alias):
    """`tiny` (diffusers' test sizes, 32 px) or `sd15-random` (SD1.5 shapes), random weights, seed 0 each."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    tiny = alias == "tiny"
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
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=offline_clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def teacher_source(name):
    """Validate --teacher without loading anything: an alias, an existing diffusers folder or a hub id."""
    if name in TEACHER_ALIASES:
        return TEACHER_ALIASES[name] or name
    folder = os.path.expanduser(name)
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            fail(f"teacher folder '{name}' has no model_index.json", "pass a diffusers pipeline folder")
        return os.path.abspath(folder)
    if name.startswith((".", "/", "~")) or os.path.isdir(name.split("/")[0]):
        fail(f"teacher folder '{name}' does not exist", "check the path, or pass a hub id or sd15/tiny/sd15-random")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        fail(f"unknown teacher alias '{name}'", f"use one of {', '.join(TEACHER_ALIASES)}, a hub id or a local folder")
    return name


def load_pipeline(cfg):
    """The teacher's pipeline, float32 on CPU, with DDIM on a trailing grid (the global RNG is left alone)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    source = teacher_source(cfg.teacher)
    with torch.random.fork_rng(devices=[]):
        if cfg.teacher in OFFLINE_ALIASES:
            pipe = build_offline_pipeline(cfg.teacher)
        else:
            try:
                pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None,
                                                               requires_safety_checker=False)
            except Exception as exc:  # offline, gated, not an SD pipeline ...
                fail(f"could not load teacher '{cfg.teacher}': {str(exc).splitlines()[0][:500]}",
                     "check the hub id and network, or pass a local diffusers folder of an SD1.x/2.x model")
    # Teacher and student both run DDIM on trailing grids (our choice): both start from x_T at t = 999, and
    # every state of the student's grid is a state of the teacher's trajectory when K divides teacher_steps.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                               set_alpha_to_one=False, thresholding=False)
    return pipe


# ---------------------------------------------------------------------------------------------------
# The MDP step (E1, E2): DDIM with eta as a Gaussian policy; the same math as toy/diffusion.py
# ---------------------------------------------------------------------------------------------------
def trailing_timesteps(num_steps, num_train_timesteps=1000):
    """Evenly spaced "trailing" grid t_1 > ... > t_K (K=5: 999, 799, 599, 399, 199), as diffusers builds it."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    grid = torch.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps, dtype=torch.float64)
    return (grid.round() - 1).long()


def sampler_grid(num_steps, num_train_timesteps=1000):
    """([t_k], [t_prev_k]), k = 1..K. t_prev = t - 1000 // K as in diffusers' DDIMScheduler.step, so a stock
    pipeline is the student's sampler (= t_{k+1} whenever K divides 1000; <= 0 after the last step)."""
    timesteps = trailing_timesteps(num_steps, num_train_timesteps)
    return timesteps.tolist(), (timesteps - num_train_timesteps // num_steps).tolist()


def _abar(alphas_cumprod, t):
    """abar_t; t < 0 means "after the last step" and uses alphas_cumprod[0] (SD: set_alpha_to_one=False)."""
    if isinstance(t, int):  # the samplers' grid: a view (a Python int copied to the GPU would wait for it)
        return alphas_cumprod[max(t, 0)]
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    return torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], alphas_cumprod[0])


def _expand(v, like):
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim())) if v.dim() > 0 else v


def ddim_step_with_logprob(eps, t, t_prev, sample, alphas_cumprod, eta=1.0, prev_sample=None, generator=None):
    """One DDIM step as the policy N(mean, std^2 I) (E1) and the log-density of the action taken (E2).

    eps, sample: (B, C, h, w); t, t_prev: int or (B,). Returns prev_sample, log_prob (B,) averaged over dims
    (DDPO), mean, std. eta = 0: deterministic step, log_prob 0.
    """
    abar_t = _expand(_abar(alphas_cumprod, t).to(sample.dtype), sample)
    abar_prev = _expand(_abar(alphas_cumprod, t_prev).to(sample.dtype), sample)
    x0_hat = (sample - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    std = eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()  # E1: sigma_k
    mean = abar_prev.sqrt() * x0_hat + (1 - abar_prev - std**2).clamp(min=0).sqrt() * eps  # E1: mu
    if prev_sample is None and eta == 0:
        prev_sample = mean  # mean + 0 * noise, without drawing the noise
    elif prev_sample is None:
        prev_sample = mean + std * torch.randn(sample.shape, generator=generator, dtype=sample.dtype,
                                               device=sample.device)
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * safe_std**2)  # E2: log N(a | mean, std^2)
                - torch.log(safe_std) - 0.5 * math.log(2 * math.pi))
    log_prob = torch.where(std > 0, log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob.mean(dim=tuple(range(1, sample.dim()))), mean, std


def guided_eps(unet, x, t, cond, uncond, guidance, alphas_cumprod, prediction_type="epsilon"):
    """CFG epsilon eps_u + w (eps_c - eps_u), float32. x (B, 4, h, w), cond (B, L, D), uncond (1, L, D)."""
    t_in = torch.full((x.shape[0],), int(t), device=x.device)
    if guidance == 1.0:
        out = unet(x, t_in, cond).sample.float()
    else:
        both = unet(torch.cat([x, x]), torch.cat([t_in, t_in]), torch.cat([uncond.expand_as(cond), cond])).sample
        out_u, out_c = both.float().chunk(2)
        out = out_u + guidance * (out_c - out_u)
    if prediction_type == "v_prediction":  # SD2.x 768-v: eps = sqrt(abar) v + sqrt(1 - abar) x_t
        abar = _abar(alphas_cumprod, int(t))
        out = abar.sqrt() * out + (1 - abar).sqrt() * x
    return out


# ---------------------------------------------------------------------------------------------------
# Models on the device: the student (LoRA or full) and the frozen teacher, also the reference policy (E6)
# ---------------------------------------------------------------------------------------------------
@dataclass
class Models:
    cfg: Config
    pipe: object  # vae, text_encoder, tokenizer; pipe.unet is the student
    teacher_unet: object  # None with LoRA: the student with its adapter disabled is the teacher
    device: torch.device
    ctx: object  # () -> a new bf16 autocast (bf16, the CUDA default) or nullcontext; one object nested stays on
    alphas_cumprod: torch.Tensor  # (1000,) float32
    prediction_type: str
    latent_size: int
    text_cache: dict = field(default_factory=dict)  # prompt -> embedding (77, D)
    reference: dict = None  # E6's reference after a BC warm-up: the trainable weights when RL started

    @property
    def student(self):
        return self.pipe.unet


def lora_config(cfg):
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                      target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def frozen_dtype(cfg, device):
    """The one precision decision: bf16 frozen weights + bf16 autocast, or float32 throughout."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def setup_models(cfg, pipe, device):
    """Move the pipeline to the device: frozen parts in frozen_dtype, trainable weights in float32."""
    dtype = frozen_dtype(cfg, device)
    pipe.vae.to(device, dtype).requires_grad_(False).eval()
    pipe.text_encoder.to(device, dtype).requires_grad_(False).eval()
    unet, teacher_unet = pipe.unet.requires_grad_(False).eval(), None
    if cfg.finetune == "lora":  # LoRA's B starts at 0: the student starts as the teacher
        unet.to(device, dtype)
        torch.manual_seed(cfg.seed)
        unet.add_adapter(lora_config(cfg))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        teacher_unet = copy.deepcopy(unet).to(device, dtype)
        unet.to(device, torch.float32).requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.compile:
        compile_unets(unet, teacher_unet)
    ctx = partial(torch.autocast, device.type, dtype=dtype) if dtype == torch.bfloat16 else contextlib.nullcontext
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return Models(cfg, pipe, teacher_unet, device, ctx, pipe.scheduler.alphas_cumprod.float().to(device),
                  pipe.scheduler.config.prediction_type, cfg.resolution // vae_scale)


COMPILE_BACKEND = "inductor"  # the tests trace with "eager": same guards and graphs, no code generation


def compile_unets(*unets):
    """--compile: channels_last weights and torch.compile of each UNet's forward, not of the module's __call__,
    so forward hooks (--profile's counters) stay outside the graph. The adapter switch (teacher / student) and
    grad mode are guarded, each batch size met after the first makes that dimension dynamic: a few graphs in the
    first iterations, then no recompilation (tested)."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    for unet in unets:
        if unet is not None:
            unet.to(memory_format=torch.channels_last)
            unet.forward = torch.compile(type(unet).forward.__get__(unet), backend=COMPILE_BACKEND)


@contextlib.contextmanager
def frozen_teacher(models):
    """The teacher's weights (with LoRA: the student with its adapter switched off)."""
    if models.teacher_unet is not None:
        yield models.teacher_unet
        return
    models.student.disable_adapters()
    try:
        yield models.student
    finally:
        models.student.enable_adapters()


@contextlib.contextmanager
def reference_policy(models):
    """E6's reference: the student when RL starts. Without BC that is the teacher (no copy needed); after BC,
    the weights snapshotted at the switch (`snapshot_reference`), swapped in by pointer for the call."""
    if models.reference is None:
        with frozen_teacher(models) as unet:
            yield unet
        return
    params = dict(models.student.named_parameters())

    def swap():
        for name, ref in models.reference.items():
            params[name].data, ref.data = ref.data, params[name].data

    swap()
    try:
        yield models.student
    finally:
        swap()


def snapshot_reference(models):
    """The trainable weights as RL starts: matrices and kernels in frozen_dtype (autocast casts them to it anyway,
    bit for bit: half the memory of a full fine-tune's copy), vectors (norms, biases: KBs) as they are, since
    CUDA's autocast runs the norms in float32. Each UNet call enters its own autocast, whose cache of weight casts
    (keyed by parameter, not by its data) is cleared on exit, so a swapped-in reference is never served stale."""
    dtype = frozen_dtype(models.cfg, models.device)
    models.reference = {n: p.detach().to(dtype if p.dim() > 1 else p.dtype, copy=True)
                        for n, p in models.student.named_parameters() if p.requires_grad}


def trainable_state(unet):
    return {n: p.detach().float().cpu().clone() for n, p in unet.named_parameters() if p.requires_grad}


TEXT_CACHE_SIZE = 1024  # prompts whose embeddings (77 x 768 float32: 236 KB each) stay on the device


@torch.no_grad()
def encode_prompts(models, prompts):
    """Text embeddings (B, 77, D), cached per prompt (the text encoder is frozen)."""
    tok = models.pipe.tokenizer
    missing = [p for p in dict.fromkeys(prompts) if p not in models.text_cache]
    if missing:
        ids = tok(missing, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(models.device)
        with models.ctx():
            models.text_cache.update(zip(missing, models.pipe.text_encoder(ids)[0].float()))
    embeddings = torch.stack([models.text_cache[p] for p in prompts])
    if missing:  # only an insertion can overfill it: cache hits (most calls) skip the scan
        for p in list(models.text_cache)[:-TEXT_CACHE_SIZE]:  # the oldest: a long prompt file stays within ~240 MB
            del models.text_cache[p]
    return embeddings


def initial_noise(seeds, latent_size, device):
    """x_T (B, 4, h, w), one CPU generator per seed: the same on any device, so the teacher's output is cacheable."""
    return torch.stack([torch.randn(4, latent_size, latent_size, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]).to(device)


# ---------------------------------------------------------------------------------------------------
# Teacher outputs, computed once per (teacher, prompt, seed, sampler settings) and cached on disk
# ---------------------------------------------------------------------------------------------------
class TeacherCache:
    """One .pt per key: the teacher's trajectory at the student's noise levels (K+1, 4, h, w), i.e. x_T, the
    states the student's steps start from (for BC, E7) and the final latent (the reward's target, E3)."""

    def __init__(self, folder, models):
        cfg, self.folder, self.models = models.cfg, Path(folder), models
        self.folder.mkdir(parents=True, exist_ok=True)
        timesteps, prev = sampler_grid(cfg.steps)
        self.levels = timesteps[:1] + prev  # the last level is the final latent
        self.hits = self.misses = 0
        self.settings = dict(teacher=teacher_source(cfg.teacher), steps=cfg.teacher_steps, levels=self.levels,
                             guidance=cfg.teacher_guidance, resolution=cfg.resolution, device=models.device.type,
                             dtype=str(frozen_dtype(cfg, models.device)))

    def path(self, prompt, seed):
        key = json.dumps(dict(self.settings, prompt=prompt, seed=int(seed)), sort_keys=True)
        return self.folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".pt")

    def get(self, prompts, seeds):
        """-> teacher states (B, K+1, 4, h, w) on the device; computes and stores the missing ones."""
        paths = [self.path(p, s) for p, s in zip(prompts, seeds)]
        todo = [i for i, p in enumerate(paths) if not p.exists() and p not in paths[:i]]  # each once
        self.hits, self.misses = self.hits + len(paths) - len(todo), self.misses + len(todo)
        size = self.models.cfg.teacher_batch
        for start in tqdm(range(0, len(todo), size), desc="teacher", leave=False, disable=None if todo else True):
            idx = todo[start:start + size]
            for i, states in zip(idx, self.sample([prompts[i] for i in idx], [seeds[i] for i in idx]).cpu()):
                atomic_write(paths[i], states.clone())
        return torch.stack([torch.load(p, map_location="cpu") for p in paths]).to(self.models.device)

    @torch.no_grad()
    def sample(self, prompts, seeds):
        """The frozen teacher: teacher_steps-step DDIM (eta 0, CFG) from the same x_T as the student (E3). A
        student level between two teacher timesteps is reached by the teacher's own eta-0 DDIM jump from the
        timestep above it (no extra UNet call; the states coincide when K divides teacher_steps and both divide
        1000, e.g. K = 5 of 50)."""
        m, cfg, recorded = self.models, self.models.cfg, []
        cond, uncond = encode_prompts(m, prompts), encode_prompts(m, [""])
        x = initial_noise(seeds, m.latent_size, m.device)
        with frozen_teacher(m) as unet:
            for t, t_prev in zip(*sampler_grid(cfg.teacher_steps)):
                with m.ctx():
                    eps = guided_eps(unet, x, t, cond, uncond, cfg.teacher_guidance, m.alphas_cumprod,
                                     m.prediction_type)
                while len(recorded) < len(self.levels) - 1 and t >= (level := self.levels[len(recorded)]) >= t_prev:
                    jump = x if level == t else ddim_step_with_logprob(eps, t, level, x, m.alphas_cumprod, 0.0)[0]
                    recorded.append(jump)
                x = ddim_step_with_logprob(eps, t, t_prev, x, m.alphas_cumprod, eta=0.0)[0]
        return torch.stack(recorded + [x], dim=1)


def atomic_write(path, obj):
    """Write a temp file, fsync, rename: a crash or a concurrent run never leaves a half-written file (without the
    fsync a crash soon after the rename can leave an empty one on some file systems). obj: str, or for torch.save."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w" if isinstance(obj, str) else "wb") as fh:
            fh.write(obj) if isinstance(obj, str) else torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
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


# ---------------------------------------------------------------------------------------------------
# Rewards (E3): cosine similarity of the student's and the teacher's images under CLIP / DINOv2, and more
# ---------------------------------------------------------------------------------------------------
def parse_reward(spec):
    """'clip=1,dino=0.5' -> {'clip': 1.0, 'dino': 0.5}."""
    weights = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = (s.strip() for s in part.partition("="))
        if name not in REWARD_TERMS:
            fail(f"unknown reward '{name}'", f"use {', '.join(REWARD_TERMS)}, e.g. --reward clip=1,dino=0.5")
        try:
            weights[name] = float(value)
        except ValueError:
            fail(f"bad --reward term '{part}'", "write name=weight, e.g. --reward clip=1,dino=0.5")
        if not math.isfinite(weights[name]):
            fail(f"--reward weight {part} is not finite", "write a finite weight, e.g. --reward clip=1,dino=0.5")
    if not any(weights.values()):
        fail("--reward has no non-zero weight", "e.g. --reward clip=1,dino=0.5")
    return weights


@dataclass
class RewardModels:
    clip: object  # open_clip CLIP: image-image reward (E3), text-image score, the evaluation's feature space
    clip_tokenize: object
    dino: object  # transformers Dinov2Model, None when unused
    aesthetic: tuple = None  # (open_clip ViT-L-14, MLP head) of the aesthetic reward, None when unused


def aesthetic_head(dim):
    """LAION's improved aesthetic predictor: a linear stack (no activations, as it was trained) on unit CLIP
    ViT-L/14 image embeddings -> a score of about 1-10."""
    nn = torch.nn
    return nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def load_reward_models(cfg, weights, device):
    import open_clip
    from transformers import Dinov2Config, Dinov2Model
    pretrained = (cfg.reward_weights or ("random" if cfg.teacher in OFFLINE_ALIASES else "pretrained")) == "pretrained"
    tiny = cfg.teacher == "tiny" and not pretrained  # tiny configs: seconds on CPU

    def create_clip(arch, tag):
        torch.manual_seed(0)
        if tiny:
            vision = open_clip.model.CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32)
            return open_clip.model.CLIP(32, vision, open_clip.model.CLIPTextCfg(width=32, heads=2, layers=2))
        # OpenAI's weights were trained with QuickGELU, which the arch's own config (GELU) does not say
        quick_gelu = bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu"))
        return open_clip.create_model(arch, pretrained=tag if pretrained else None, force_quick_gelu=quick_gelu)

    with torch.random.fork_rng(devices=[]):
        name = f"{cfg.clip_model}/{cfg.clip_pretrained}"
        try:
            clip, dino, aesthetic = create_clip(cfg.clip_model, cfg.clip_pretrained), None, None
            if weights.get("dino"):
                torch.manual_seed(0)
                name = cfg.dino_model
                if pretrained:
                    dino = Dinov2Model.from_pretrained(cfg.dino_model)
                else:  # tiny, or dinov2-small's shapes
                    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    mlp_ratio=2, image_size=32, patch_size=8) if tiny else
                                       Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6))
            if weights.get("aesthetic"):
                name = "ViT-L-14/openai"
                clip_l = create_clip("ViT-L-14", "openai")
                aesthetic = clip_l, aesthetic_head(clip_l.visual.output_dim)
                if pretrained:
                    name, path = cfg.aesthetic_model, cfg.aesthetic_model
                    if not os.path.isfile(path):
                        from huggingface_hub import hf_hub_download
                        path = hf_hub_download(cfg.aesthetic_model, "aesthetic-model.pth")
                    state = torch.load(path, map_location="cpu", weights_only=True)
                    aesthetic[1].load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
        except Exception as e:  # noqa: BLE001 - offline, unknown tag, not the predictor's checkpoint ...
            fail(f"could not load reward model {name}: {str(e).splitlines()[0][:500]}",
                 "check the network or the name, or --reward-weights random")
    for model in (clip, dino, *(aesthetic or ())):
        if model is not None:
            model.to(device, frozen_dtype(cfg, device)).eval().requires_grad_(False)
    return RewardModels(clip, open_clip.get_tokenizer(cfg.clip_model), dino, aesthetic)


def _prepare(images, size, mean, std):
    """Images in [-1, 1] (B, 3, H, W) -> resized to size x size, normalised. Antialiased, as open_clip's and
    DINOv2's own preprocessing (PIL / torchvision); 512 -> 224 without it aliases fine detail."""
    x = F.interpolate((images.float() + 1) / 2, size=(size, size), mode="bicubic", align_corners=False,
                      antialias=True).clamp(0, 1)
    return (x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)


def clip_image_features(rm, images, clip=None):
    """Unit image embeddings (B, E) of `clip` (default: the reward's CLIP)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    clip = rm.clip if clip is None else clip
    size = clip.visual.image_size
    x = _prepare(images, size[0] if isinstance(size, (tuple, list)) else size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    return F.normalize(clip.encode_image(x.to(next(clip.parameters()).dtype)).float(), dim=-1)


def aesthetic_score(rm, images):
    clip, head = rm.aesthetic
    return head(clip_image_features(rm, images, clip).to(head[0].weight.dtype)).float().squeeze(-1)


def clip_text_features(rm, prompts, device):
    return F.normalize(rm.clip.encode_text(rm.clip_tokenize(prompts).to(device)).float(), dim=-1)


def dino_features(rm, images):
    x = _prepare(images, min(rm.dino.config.image_size, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return F.normalize(rm.dino(pixel_values=x.to(rm.dino.dtype)).pooler_output.float(), dim=-1)


@torch.no_grad()
def decode(models, latents, chunk=8):
    """Latents (B, 4, h, w) -> images (B, 3, H, W) in [-1, 1]."""
    vae, images = models.pipe.vae, []
    for z in latents.split(chunk):
        with models.ctx():
            images.append(vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.float().clamp(-1, 1))
    return torch.cat(images)


@torch.no_grad()
def compute_rewards(weights, models, rm, prompts, student_latents, teacher_latents, group=1):
    """E3: R = sum_j lambda_j term_j per rollout -> R (B,), {term: (B,)}, images (student then teacher) or None.
    student_latents (B, 4, h, w); teacher_latents (B / group, 4, h, w): one per group, since a group shares its
    prompt and x_T, so each teacher image is decoded and embedded once, not G times.
    No gradient flows through the reward: the policy gradient only needs its value."""
    terms, images = {}, None

    def student_vs_teacher(feats):  # (B + B/group, E) -> cosine of each rollout with its group's teacher (B,)
        feats_s, feats_t = feats[:len(student_latents)], feats[len(student_latents):]
        return (feats_s * feats_t.repeat_interleave(group, dim=0)).sum(-1), feats_s

    if any(weights.get(k) for k in ("clip", "dino", "clip_text", "aesthetic")):
        images = decode(models, torch.cat([student_latents, teacher_latents]))  # (B + B/group, 3, H, W)
        with models.ctx():
            if weights.get("clip") or weights.get("clip_text"):
                terms["clip"], feats_s = student_vs_teacher(clip_image_features(rm, images))
                if weights.get("clip_text"):
                    terms["clip_text"] = (feats_s * clip_text_features(rm, prompts, models.device)).sum(-1)
            if weights.get("dino"):
                terms["dino"], _ = student_vs_teacher(dino_features(rm, images))
            if weights.get("aesthetic"):
                terms["aesthetic"] = aesthetic_score(rm, images[:len(student_latents)])
    teacher_latents = teacher_latents.repeat_interleave(group, dim=0)
    terms["latent"] = -((student_latents - teacher_latents) ** 2).mean(dim=(1, 2, 3))  # cheap: always logged
    return sum(w * terms[k] for k, w in weights.items() if w), terms, images


# ---------------------------------------------------------------------------------------------------
# Advantages and losses: pure functions on tensors, same names and semantics as in toy/redif.py
# ---------------------------------------------------------------------------------------------------
def grpo_advantages(rewards, eps=1e-4):
    """E4: A = (R - mean_g R) / (std_g R + eps) within each group; rewards (num_groups, G)."""
    if not torch.isfinite(rewards).all():
        raise ValueError("non-finite rewards in grpo_advantages (NaN or inf)")
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True, unbiased=False) + eps)
    same = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # exactly 0, whatever the rounding of the mean
    return torch.where(same, torch.zeros_like(advantages), advantages)


class PerPromptStatTracker:
    """DDPO's PPO advantage: each reward normalised with the recent rewards of its prompt."""

    def __init__(self, buffer_size=32, min_count=16):
        self.buffer_size, self.min_count, self.stats = buffer_size, min_count, {}

    def update(self, keys, rewards):
        """keys: B hashables, rewards (B,) -> advantages (B,). Below min_count, the batch's statistics."""
        rewards = torch.as_tensor(rewards)
        if not torch.isfinite(rewards).all():
            raise ValueError("non-finite rewards in PerPromptStatTracker.update (NaN or inf)")
        advantages = torch.empty_like(rewards)
        for key in dict.fromkeys(keys):
            idx = torch.tensor([i for i, k in enumerate(keys) if k == key])
            buffer = self.stats[key] = (self.stats.get(key, []) + rewards[idx].tolist())[-self.buffer_size:]
            seen = torch.tensor(buffer, dtype=rewards.dtype) if len(buffer) >= self.min_count else rewards
            advantages[idx] = (rewards[idx] - seen.mean()) / (seen.std(unbiased=False) + 1e-6)
        return advantages


def clipped_surrogate(log_prob, old_log_prob, advantages, clip_range):
    """E5: -mean(min(r A, clip(r, 1 - e, 1 + e) A)), r = exp(logp - logp_old); all (B,)."""
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return -torch.minimum(ratio * advantages, clipped * advantages).mean()


def gaussian_kl(mean, ref_mean, std):
    """E6: KL(N(mean, std^2) || N(ref_mean, std^2)) = (mean - ref_mean)^2 / (2 std^2), averaged over dims -> (B,)."""
    if (torch.as_tensor(std) <= 0).any():
        raise ValueError("gaussian_kl needs std > 0 (an eta = 0 step has no KL; fix: train with eta > 0)")
    kl = (mean - ref_mean) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.dim())))


def bc_loss(student_next, teacher_next):
    """E7: latent MSE between the student's eta-0 step from a teacher state and the teacher's next state."""
    return F.mse_loss(student_next, teacher_next)


# ---------------------------------------------------------------------------------------------------
# Sample phase: K-step rollouts of the student, no grad, storing latents and log-probs
# ---------------------------------------------------------------------------------------------------
def policy_step(models, unet, x, t, t_prev, cond, eta, prev_sample=None, generator=None):
    """CFG epsilon of `unet` at (x, t) with the student's guidance, then the DDIM step (E1, E2)."""
    with models.ctx():
        eps = guided_eps(unet, x, t, cond, encode_prompts(models, [""]), models.cfg.student_guidance,
                         models.alphas_cumprod, models.prediction_type)
    return ddim_step_with_logprob(eps, t, t_prev, x, models.alphas_cumprod, eta, prev_sample, generator)


@torch.no_grad()
def sample_student(models, x_T, cond, eta, generator=None, batch=None):
    """x_T (B, 4, h, w), cond (B, 77, D) -> latents (B, K+1, 4, h, w), log_probs (B, K); `batch` rollouts at a
    time (training passes --sample-batch: the batch shape of the log-prob recomputation, by default)."""
    if batch is not None and batch < len(x_T):
        parts = [sample_student(models, x, c, eta, generator) for x, c in zip(x_T.split(batch), cond.split(batch))]
        return tuple(torch.cat(part) for part in zip(*parts))
    x, latents, log_probs = x_T, [x_T], []
    for t, t_prev in zip(*sampler_grid(models.cfg.steps)):
        x, log_prob, _, _ = policy_step(models, models.student, x, t, t_prev, cond, eta, generator=generator)
        latents.append(x)
        log_probs.append(log_prob)
    return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1)


def draw_pairs(cfg, prompts, generator):
    """prompts_per_iter (prompt, seed) pairs from the training pool, prompts x range(seed_pool)."""
    idx = torch.randint(len(prompts), (cfg.prompts_per_iter,), generator=generator).tolist()
    seeds = torch.randint(cfg.seed_pool, (cfg.prompts_per_iter,), generator=generator).tolist()
    return [prompts[i] for i in idx], seeds


def iteration_generators(cfg, step, device):
    """All randomness of iteration `step` comes from (seed, step), so resuming at any step is exact. Two seeds:
    on CPU one seed would give the eta-noise the very stream the (prompt, seed) draws came from."""
    seeds = np.random.SeedSequence([cfg.seed, step]).generate_state(2, np.uint64) >> 1
    return torch.Generator().manual_seed(int(seeds[0])), torch.Generator(device).manual_seed(int(seeds[1]))


# ---------------------------------------------------------------------------------------------------
# Train phase: log-probs recomputed with grad on the stored latents, step by step (E5, E6); or BC (E7)
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_means(models, latents, cond):
    """E6's reference policy's step means at the K stored states of each rollout -> (b, K, 4, h, w). All K under one
    switch to the reference: with LoRA and no BC that is the adapter off and on again, diffusers walking every module
    (on SD1.5, 30 ms of CPU for the pair on the 2-core CI host; a UNet call on 4 rollouts x CFG: 26 ms of H100)."""
    with reference_policy(models) as reference:
        return torch.stack([policy_step(models, reference, latents[:, k], t, t_prev, cond, models.cfg.eta,
                                        prev_sample=latents[:, k + 1])[2]
                            for k, (t, t_prev) in enumerate(zip(*sampler_grid(models.cfg.steps)))], dim=1)


def policy_loss_step(models, latents, old_log_probs, advantages, cond, k, t, t_prev, ref_mean=None):
    """Loss of step k; latents (b, K+1, 4, h, w), old_log_probs (b, K), advantages (b,), cond (b, 77, D);
    ref_mean (b, 4, h, w): the reference's mean at step k (reference_means), needed when beta > 0."""
    cfg, x, action = models.cfg, latents[:, k], latents[:, k + 1]
    _, log_prob, mean, std = policy_step(models, models.student, x, t, t_prev, cond, cfg.eta, prev_sample=action)
    loss = clipped_surrogate(log_prob, old_log_probs[:, k], advantages, cfg.clip_range)  # E5
    kl = torch.zeros_like(log_prob)
    if cfg.beta > 0:
        kl = gaussian_kl(mean, ref_mean, std)  # E6
        loss = loss + cfg.beta * kl.mean()
    log_ratio = (log_prob - old_log_probs[:, k]).detach()
    ratio_err = (log_ratio.exp() - 1).abs()
    stats = torch.stack([loss.detach(), kl.mean().detach(), 0.5 * (log_ratio**2).mean(),
                         (ratio_err > cfg.clip_range).float().mean(), ratio_err.max()]).tolist()  # one GPU sync
    return loss, dict(zip(("loss", "kl", "approx_kl", "clipfrac", "ratio_err"), stats))


def trainable_params(models):
    return [p for p in models.student.parameters() if p.requires_grad]


def build_optimizer(models):
    return torch.optim.AdamW(trainable_params(models), lr=models.cfg.lr, betas=(0.9, 0.999), weight_decay=1e-4,
                             eps=1e-8)  # DDPO's


def optimiser_step(models, optimizer):
    """-> False, and no step, when the gradient is NaN/inf (AdamW would write it into every weight, and every
    later checkpoint would hold it); the caller counts the iteration as a skip."""
    norm = torch.nn.utils.clip_grad_norm_(trainable_params(models), models.cfg.max_grad_norm)
    finite = bool(torch.isfinite(norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


def rl_update(models, optimizer, rollout, advantages, generator):
    """PPO-style passes over the iteration's rollouts; gradients accumulate over the K steps of a minibatch.
    *_first: the first minibatch, before any optimiser step, where the ratio differs from 1 by numerics alone
    (0 on CPU at the tests' batch sizes, ~1e-5 at others; under bf16 the kernels, hence the last bits, depend on
    the batch shape, so rollouts are sampled at --sample-batch = --train-batch, and a |ratio - 1| near
    --clip-range would clip the update away)."""
    latents, old_log_probs, cond = rollout  # (B, K+1, 4, h, w), (B, K), (B, 77, D)
    cfg, logs, first, skipped = models.cfg, [], None, 0
    models.student.train()  # changes no output: SD's UNet and our LoRA have no dropout
    for _ in range(cfg.inner_epochs):
        for minibatch in torch.randperm(len(latents), generator=generator).to(latents.device).chunk(cfg.minibatches):
            for mb in minibatch.split(cfg.train_batch):
                ref_means = reference_means(models, latents[mb], cond[mb]) if cfg.beta > 0 else None  # E6
                for k, (t, t_prev) in enumerate(zip(*sampler_grid(cfg.steps))):
                    loss, stats = policy_loss_step(models, latents[mb], old_log_probs[mb], advantages[mb], cond[mb],
                                                   k, t, t_prev, None if ref_means is None else ref_means[:, k])
                    (loss * len(mb) / len(minibatch) / cfg.steps).backward()
                    logs.append(dict(stats, rows=len(mb)))
            if first is None:
                first = list(logs)
            skipped += not optimiser_step(models, optimizer)
    models.student.eval()
    record = {key: float(np.mean([log[key] for log in logs])) for key in ("loss", "kl", "approx_kl", "clipfrac")}
    return dict(record, nonfinite_steps=skipped, ratio_err_first=max(log["ratio_err"] for log in first),
                clipfrac_first=float(np.average([log["clipfrac"] for log in first],
                                                weights=[log["rows"] for log in first])))


def bc_update(models, optimizer, teacher_states, cond):
    """E7 on teacher states (P, K+1, 4, h, w): the student's eta-0 step from state k should land on state k+1."""
    models.student.train()
    losses, steps = [], models.cfg.steps
    for mb in torch.arange(len(teacher_states), device=teacher_states.device).split(models.cfg.train_batch):
        for k, (t, t_prev) in enumerate(zip(*sampler_grid(steps))):
            mean = policy_step(models, models.student, teacher_states[mb, k], t, t_prev, cond[mb], 0.0)[2]
            loss = bc_loss(mean, teacher_states[mb, k + 1])
            (loss * len(mb) / len(teacher_states) / steps).backward()
            losses.append(loss.item() * len(mb) / len(teacher_states))
    skipped = not optimiser_step(models, optimizer)
    models.student.eval()
    return dict(bc_loss=sum(losses) / steps, nonfinite_steps=int(skipped))


# ---------------------------------------------------------------------------------------------------
# Evaluation on held-out (prompt, seed) pairs: teacher alignment, CLIP scores, Frechet distance, grids
# ---------------------------------------------------------------------------------------------------
def frechet_distance(feats_a, feats_b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to features (N, D)."""
    a, b = feats_a.double(), feats_b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")  # logged as null (eigh would raise): NaN features come from a NaN reward model
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    tr_covmean = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean)


@torch.no_grad()
def evaluate(models, rm, weights, cache, prompts, grid_path):
    """The eta-0 student against the teacher on held-out seeds; writes a PNG grid (student | teacher rows)."""
    n = models.cfg.eval_pairs
    eval_prompts, seeds = [prompts[i % len(prompts)] for i in range(n)], [EVAL_SEED_BASE + i for i in range(n)]
    teacher = cache.get(eval_prompts, seeds)[:, -1]
    x_T = initial_noise(seeds, models.latent_size, models.device)
    student = sample_student(models, x_T, encode_prompts(models, eval_prompts), eta=0.0)[0][:, -1]
    reward, terms, images = compute_rewards(weights, models, rm, eval_prompts, student, teacher)
    images = decode(models, torch.cat([student, teacher])) if images is None else images
    with models.ctx():
        feats_s, feats_t = clip_image_features(rm, images).chunk(2)
        text = clip_text_features(rm, eval_prompts, models.device)
    save_grid(images, grid_path)
    metrics = dict(eval_reward=reward.mean().item(), eval_latent_mse=-terms["latent"].mean().item(),
                   eval_clip_img=(feats_s * feats_t).sum(-1).mean().item(),
                   eval_clip_text_student=(feats_s * text).sum(-1).mean().item(),
                   eval_clip_text_teacher=(feats_t * text).sum(-1).mean().item(),
                   eval_fd_clip=frechet_distance(feats_s, feats_t))
    if "dino" in terms:
        metrics["eval_dino"] = terms["dino"].mean().item()
    if "aesthetic" in terms:
        with models.ctx():
            metrics.update(eval_aesthetic_student=terms["aesthetic"].mean().item(),
                           eval_aesthetic_teacher=aesthetic_score(rm, images[len(student):]).mean().item())
    return metrics


def save_grid(images, path, max_rows=8):
    """Student then teacher images (2N, 3, H, W) in [-1, 1] -> PNG whose row i is [student_i | teacher_i]."""
    from PIL import Image
    student, teacher = images.chunk(2)
    rows = torch.cat([student[:max_rows], teacher[:max_rows]], dim=3)  # (n, 3, H, 2W)
    grid = torch.cat(list(rows), dim=1)  # (3, n H, 2W)
    pixels = ((grid.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


# ---------------------------------------------------------------------------------------------------
# Profiling (--profile N): seconds per phase, images through each model, and the floor they imply
# ---------------------------------------------------------------------------------------------------
# Per-image costs of the SD1.5 UNet (859,520,964 parameters) at 512 px in bf16, eager PyTorch, measured on the
# lent H100 (issue 5): forward 52 ms / 16 images, forward+backward+AdamW 180 ms / 16, VAE decode 100 ms / 8.
SD15_UNET_PARAMS = 859_520_964
H100_SEC_FORWARD, H100_SEC_TRAIN, H100_SEC_DECODE = 0.052 / 16, 0.180 / 16, 0.100 / 8


def count_images(models, rm, cache):
    """Pre-hooks counting batch rows (a CFG call on b latents is 2b): UNet forward-only and forward+backward
    (grad on), the teacher's share of the forward-only ones, VAE decodes, reward-model images."""
    counts = dict(unet_forward=0, unet_forward_backward=0, unet_teacher=0, vae_decode=0, reward_images=0)

    def counter(kind):
        def hook(module, args, kwargs):
            kind_now = "unet_forward_backward" if kind == "unet_forward" and torch.is_grad_enabled() else kind
            counts[kind_now] += (list(args) + list(kwargs.values()))[0].shape[0]
        return hook

    modules = [(models.student, "unet_forward"), (models.teacher_unet, "unet_forward"),
               (models.pipe.vae.decoder, "vae_decode"), (rm.clip.visual, "reward_images"), (rm.dino, "reward_images"),
               (rm.aesthetic and rm.aesthetic[0].visual, "reward_images")]
    hooks = [m.register_forward_pre_hook(counter(kind), with_kwargs=True) for m, kind in modules if m is not None]

    def teacher_sample(prompts, seeds):  # with LoRA the teacher is the student's module: count its calls here
        before = counts["unet_forward"]
        states = TeacherCache.sample(cache, prompts, seeds)
        counts["unet_teacher"] += counts["unet_forward"] - before
        return states

    cache.sample = teacher_sample  # an instance attribute: `del cache.sample` restores the method
    return counts, hooks


def profile(models, rm, cache, step, log, run_iteration):
    """Warm-up iterations (allocator, autotuning, lazy init; with --compile its graphs), then --profile timed ones
    -> the profile record."""
    cfg, cuda = models.cfg, models.device.type == "cuda"
    warm = 3 if cfg.compile else 1
    for s in range(step, step + warm):
        log(run_iteration(s))
    step += warm - 1
    counts, hooks = count_images(models, rm, cache)
    hits, misses, files = cache.hits, cache.misses, len(list(cache.folder.glob("*.pt")))
    if cuda:
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    wall = time.perf_counter()
    records = [run_iteration(s) for s in range(step + 1, step + 1 + cfg.profile)]
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - wall
    for handle in hooks:
        handle.remove()
    del cache.sample
    for record in records:
        log(record)
    sec = {k: sum(r.get(f"sec_{k}", 0.0) for r in records) for k in ("teacher", "rollout", "reward", "update")}
    sec["other"] = wall - sum(sec.values())
    # H100 SD1.5 costs scaled by latent area (SD1.5: 64 x 64) and by UNet size (LoRA left out; the VAE is scaled
    # alike, as a proxy). Gradient checkpointing reruns each trained forward in the backward: one forward more.
    params = sum(p.numel() for n, p in models.student.named_parameters() if "lora_" not in n)
    train = H100_SEC_TRAIN + (H100_SEC_FORWARD if cfg.gradient_checkpointing else 0.0)
    floor = (models.latent_size / 64) ** 2 * params / SD15_UNET_PARAMS * (counts["unet_forward"] * H100_SEC_FORWARD
            + counts["unet_forward_backward"] * train + counts["vae_decode"] * H100_SEC_DECODE)
    record = dict(iter=step + 1, phase="profile", iters=cfg.profile, wall_s=wall, floor_s=floor,
                  wall_over_floor=wall / floor, **{f"sec_{k}": v for k, v in sec.items()}, **counts,
                  teacher_computed=cache.misses - misses, teacher_cache_hits=cache.hits - hits,
                  teacher_files_written=len(list(cache.folder.glob("*.pt"))) - files,
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    log(record)
    print(profile_table(record, sec, models.device))
    return record


def profile_table(r, sec, device):
    """Markdown: seconds per phase, then images through each model, then the teacher's cache, floor and memory."""
    twice = "none" if r["teacher_computed"] == r["teacher_files_written"] else "SOME"
    peak = "n/a (cpu)" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
    counts = ("unet_forward", "unet_forward_backward", "vae_decode", "reward_images")
    return "\n".join([f"profile: {r['iters']} iterations from iteration {r['iter']} on {device}", "",
                      "| phase | seconds | share |", "|---|---:|---:|",
                      *(f"| {k} | {v:.3f} | {v / r['wall_s']:.0%} |" for k, v in sec.items()),
                      f"| total (wall) | {r['wall_s']:.3f} | 100% |", "", "| images through | count |", "|---|---:|",
                      *(f"| {k} | {r[k]} |" for k in counts), "",
                      f"teacher outputs: {r['teacher_computed']} computed ({r['unet_teacher']} of the UNet forward "
                      f"images), {r['teacher_cache_hits']} cache hits, {r['teacher_files_written']} new cache files: "
                      f"{twice} computed twice",
                      f"floor {r['floor_s']:.4g} s (H100 SD1.5 per-image costs scaled by (latent/64)^2 and UNet "
                      f"size: meaningful on an H100 only); wall / floor {r['wall_over_floor']:.3g}; "
                      f"peak GPU memory {peak}"])


# ---------------------------------------------------------------------------------------------------
# Checkpoints, the saved student, input checks and the loop
# ---------------------------------------------------------------------------------------------------
def save_checkpoint(path, step, models, optimizer, tracker, nan_state):
    # CUDA: the GPU in use only (get_rng_state_all would tie the checkpoint to the number of GPUs visible)
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    reference = None if models.reference is None else {n: t.cpu() for n, t in models.reference.items()}
    atomic_write(path, dict(step=step, trainable=trainable_state(models.student), optimizer=optimizer.state_dict(),
                            reference=reference, tracker=tracker.stats if tracker else None, nan_state=nan_state,
                            rng=rng))


def load_checkpoint(path, models, optimizer, tracker):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # truncated, empty, a folder
        fail(f"{path} is unreadable ({type(e).__name__})", "restore it from a copy, or start a new --out")
    if (not isinstance(ckpt, dict) or not {"step", "trainable", "optimizer", "rng", "nan_state"} <= set(ckpt)
            or not {"python", "numpy", "torch", "cuda"} <= set(ckpt["rng"])):
        fail(f"{path} is not a redif.py checkpoint", "point --out at a redif.py run")
    ours = {n: t.shape for n, t in trainable_state(models.student).items()}
    if ours != {n: getattr(t, "shape", None) for n, t in ckpt["trainable"].items()}:
        fail(f"checkpoint {path} does not match this student", "resume with the run's --finetune and --lora-rank")
    models.student.load_state_dict(ckpt["trainable"], strict=False)
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("reference") is not None:
        models.reference = {n: t.to(models.device) for n, t in ckpt["reference"].items()}
    if tracker is not None:
        tracker.stats = ckpt["tracker"] or {}
    rng = ckpt["rng"]
    random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return ckpt["step"], ckpt["nan_state"]


def save_student(models, folder):
    """A stock diffusers pipeline: the teacher's float32 components, the student's UNet (LoRA merged) and DDIM
    with trailing spacing, so `pipe(prompt, num_inference_steps=K, eta=0.0)` is the student's own sampler."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    cfg = models.cfg
    pipe = load_pipeline(cfg)  # fresh float32 weights (on CUDA the frozen parts in memory are bf16)
    state, lora = trainable_state(models.student), None
    if cfg.finetune == "lora":
        pipe.unet.add_adapter(lora_config(cfg))
        unexpected = pipe.unet.load_state_dict(state, strict=False).unexpected_keys  # missing: the base weights
        assert not unexpected, f"LoRA weights the saved UNet lacks (peft names changed?): {unexpected[:3]}"
        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        pipe.unet.fuse_lora()
        pipe.unet.unload_lora()
    else:
        pipe.unet.load_state_dict(state)
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a save cut short earlier
    try:
        pipe.save_pretrained(tmp)
        if lora is not None:  # the LoRA alone too (MBs), for load_lora_weights on the teacher (alpha = r: scale 1)
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=lora)
        (tmp / "redif.json").write_text(json.dumps(dict(num_inference_steps=cfg.steps, eta=0.0,
                                                        guidance_scale=cfg.student_guidance, height=cfg.resolution,
                                                        width=cfg.resolution)))
    except BaseException as e:  # as atomic_write: no GBs of half-written pipeline left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(e):
            write_failed(folder, e)
        raise
    replace_folder(tmp, folder)


def replace_folder(new, folder):
    """Move the complete folder `new` to `folder`; an existing one is renamed aside first and removed last, so a
    crash at any point leaves a whole student at `folder` or at `folder`.old, never a half-written one."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_prompts(cfg):
    if cfg.prompts is None:
        return DEFAULT_PROMPTS
    if not os.path.isfile(cfg.prompts):
        fail(f"prompt file '{cfg.prompts}' not found", "pass an existing text file, one prompt a line")
    try:
        prompts = [line.strip() for line in Path(cfg.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        fail(f"prompt file '{cfg.prompts}' is not UTF-8 text", "save it as UTF-8, one prompt a line")
    if not prompts:
        fail(f"prompt file '{cfg.prompts}' is empty", "write one prompt a line, or leave out --prompts")
    return prompts


def validate(cfg):
    """Every mistake visible before loading a model -> (reward weights, prompts); fills in the default lr."""
    if cfg.lr is None:  # not `or`: --lr 0 is a value
        cfg.lr = 3e-4 if cfg.finetune == "lora" else 1e-5
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but CUDA is not available", "use --device cpu or auto, or install a CUDA build of torch")
    teacher_source(cfg.teacher)
    if not 1 <= cfg.steps < cfg.teacher_steps:
        fail(f"--steps {cfg.steps} must be at least 1 and below the teacher's {cfg.teacher_steps}",
             "choose fewer student steps, e.g. --steps 5")
    for name, k in (("--steps", cfg.steps), ("--teacher-steps", cfg.teacher_steps)):
        check_grid(name, k)
    if cfg.algo == "grpo" and cfg.group < 2:
        fail(f"--group {cfg.group}: GRPO normalises within a group and needs at least 2", "use --group 4 or --algo ppo")
    positive = ("group", "prompts_per_iter", "seed_pool", "minibatches", "train_batch", "sample_batch", "inner_epochs",
                "ckpt_every", "teacher_batch", "max_nan_skips", "lora_rank", "resolution", "ppo_buffer",
                "ppo_min_count", "max_grad_norm", "clip_range", "adv_clip_max")  # max_grad_norm <= 0: ascent or no step
    non_negative = ("iters", "bc_iters", "eval_every", "lr", "beta")  # lr 0: resume frozen, to evaluate
    for f in dataclasses.fields(Config):
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
    if cfg.seed_pool > EVAL_SEED_BASE:
        fail(f"--seed-pool {cfg.seed_pool} would draw the held-out evaluation seeds (from {EVAL_SEED_BASE})",
             "use a smaller --seed-pool, e.g. 32")
    if cfg.teacher_cache:
        check_folder("--teacher-cache", Path(cfg.teacher_cache))
    if cfg.iters > 0 and not 0 < cfg.eta <= 1:
        fail(f"--eta {cfg.eta} is not in (0, 1]: an eta-0 step has no log-probability, and above 1 the step is no "
             "longer DDIM's", "use --eta 1.0")
    if cfg.algo == "ppo" and cfg.ppo_min_count > cfg.ppo_buffer:  # the buffer never reaches it: batch statistics
        fail(f"--ppo-min-count {cfg.ppo_min_count} is above --ppo-buffer {cfg.ppo_buffer}: per-prompt statistics would "
             "never be used", f"use --ppo-min-count {cfg.ppo_buffer} or less")
    if cfg.student_guidance < 1:  # diffusers: CFG only when guidance_scale > 1, the conditional eps below it
        fail(f"--student-guidance {cfg.student_guidance}: below 1 a stock diffusers pipeline samples without CFG, not "
             "as the student trained", "use --student-guidance 1 (no CFG) or more")
    if cfg.eval_pairs < 2:
        fail("--eval-pairs must be at least 2 (the Frechet distance needs a covariance)", "use --eval-pairs 16")
    return parse_reward(cfg.reward), load_prompts(cfg)


def check_grid(name, k, num_train_timesteps=1000):
    """The trailing grid's float arange gives K+1 timesteps for some K (61, 103, 121, ...; diffusers' too), and the
    sampler and the cache need exactly K."""
    if k > num_train_timesteps:
        fail(f"{name} {k} is above the {num_train_timesteps} training timesteps", f"use {name} 50 or fewer")
    if (n := len(trailing_timesteps(k, num_train_timesteps))) != k:
        ok = (j for j in range(1, num_train_timesteps + 1) if len(trailing_timesteps(j, num_train_timesteps)) == j)
        fail(f"{name} {k}: the trailing grid (as diffusers builds it) has {n} timesteps, not {k}",
             f"use {name} {min(ok, key=lambda j: abs(j - k))}")


def pick_device(cfg):
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda")


def run_summary(cfg, device):
    """The line a run starts with, and a warning when a Stable Diffusion-sized teacher runs on the CPU (with
    --device auto and no GPU it would run, hours an iteration, rather than stop)."""
    dtype = str(frozen_dtype(cfg, device)).removeprefix("torch.")
    line = (f"redif: teacher {cfg.teacher} on {device.type} ({dtype}), {cfg.finetune} student, {cfg.steps} steps, "
            f"{cfg.bc_iters} BC + {cfg.iters} {cfg.algo} iterations (G={cfg.group}), out {cfg.out}")
    if device.type == "cpu" and cfg.teacher != "tiny":
        line += (f"\nwarning: no GPU in use; a teacher of Stable Diffusion's size ({cfg.teacher}) takes hours per "
                 "iteration on a CPU (--device cuda stops with an error when CUDA is missing)")
    if dtype == "bfloat16" and cfg.iters > 0 and len(shapes := unet_batch_shapes(cfg)) > 1:
        line += (f"\nwarning: the UNet runs rollouts at batch sizes {shapes} between sampling and training; under "
                 "bf16 its last bits depend on the batch shape, so PPO's ratio may start off 1 by more than "
                 "--clip-range (make --prompts-per-iter x --group / --minibatches a multiple of --train-batch)")
    return line


def unet_batch_shapes(cfg):
    """The rollout batch sizes of sampling (--sample-batch) and of the recomputation (rl_update's chunks)."""
    rows = torch.arange(cfg.prompts_per_iter * cfg.group)
    train = {len(c) for mb in rows.chunk(cfg.minibatches) for c in mb.split(cfg.train_batch)}
    return sorted(train | {len(c) for c in rows.split(cfg.sample_batch or cfg.train_batch)})


def check_folder(flag, path):
    """A file where a folder must go fails now, not after minutes of loading models."""
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            fail(f"{flag} {path}: {part} is a file", "pass a folder (it is created if missing)")


def check_out_dir(cfg, out):
    """Never overwrite a run: a checkpoint or a student marks one. A folder whose run stopped before its first
    checkpoint (a crash in iteration 1, a --profile) holds nothing to resume: a fresh run starts over in it."""
    if not cfg.out:
        fail("--out is empty", "pass a folder, e.g. --out runs/redif")
    check_folder("--out", out)
    if cfg.resume and not (out / "checkpoint.pt").is_file():
        fail(f"--resume but {out} holds no checkpoint.pt", "run without --resume to start afresh there, or point "
             "--out at the run")
    if not cfg.resume and ((out / "checkpoint.pt").exists() or (out / "student").exists()):
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


# settings a resumed run may change: they leave what was already trained alone (lr: e.g. after NaN rewards);
# prompts: the file may move, its prompts are compared (check_same_prompts); the teacher cache is keyed by content
RESUME_FREE = {"iters", "eval_every", "ckpt_every", "teacher_batch", "max_nan_skips", "compile",
               "gradient_checkpointing", "lr", "max_grad_norm", "prompts", "teacher_cache"}
THIS_PROCESS = {"out", "device", "profile", "resume"}  # where and how this process runs: never from config.json


def fits(value, f):
    """Whether a value read from config.json is one the flag could have given."""
    if value is None or isinstance(value, bool) != (f.type is bool):
        return value is None and f.default is None
    ok = isinstance(value, (int, float)) if f.type is float else isinstance(value, f.type)
    return ok and value in f.metadata.get("choices", [value])


def resume_config(cfg, given, out):
    """--resume: the run's config.json, overridden by the settings given on this command line -> (cfg, the changed
    ones {name: (old, new)}). Changing one outside RESUME_FREE would not continue the same run; a setting the
    file lacks (added to the script since the run) counts at its default."""
    path, flags = out / "config.json", {f.name: f for f in dataclasses.fields(Config)}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        fail(f"{path} is missing or unreadable", "point --out at a redif.py run folder")
    if not isinstance(saved, dict) or set(saved) - set(flags):
        fail(f"{path} is not a redif.py config" + (f" ({', '.join(sorted(set(saved) - set(flags)))} unknown)"
                                                   if isinstance(saved, dict) else ""), "point --out at a redif.py run")
    if bad := [f"{k}={v!r}" for k, v in saved.items() if not fits(v, flags[k])]:
        fail(f"{path} holds values no flag gives: {', '.join(bad)}", "restore the run's config.json")
    saved = {**{k: f.default for k, f in flags.items()}, **saved}
    if "prompts" not in given and (out / "prompts.txt").exists():
        saved["prompts"] = str(out / "prompts.txt")  # the run's own copy: the folder moves with its prompts
    cfg = dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k not in given | THIS_PROCESS})
    changed = sorted(k for k in given - THIS_PROCESS if saved[k] != getattr(cfg, k))
    if refused := [k for k in changed if k not in RESUME_FREE]:
        fail(f"--resume with different settings: {', '.join(refused)}",
             "leave them out to keep the run's (config.json), or start a new --out")
    return cfg, {k: (saved[k], getattr(cfg, k)) for k in changed}


def check_same_prompts(out, prompts):
    """A run trains on the prompts it started with (its prompts.txt), not on an edited --prompts file."""
    path = out / "prompts.txt"
    try:
        theirs = path.read_text(encoding="utf-8").splitlines() if path.exists() else list(prompts)
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text", "restore it, or resume with --prompts and the run's prompt file")
    if theirs != list(prompts):
        fail(f"the prompts differ from those the run started with ({path})",
             f"resume with --prompts {path}, or start a new --out")


def write_config(cfg, out):
    atomic_write(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))


def metrics_until(path, step):
    """The lines of metrics.jsonl up to a checkpoint at `step` (its eval included); a line cut short by a kill
    mid-write does not parse and is dropped."""
    keep = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(r, dict) or not isinstance(r.get("iter"), int):
            continue
        if r["iter"] < step or (r["phase"] == "eval" and r["iter"] <= step):
            keep.append(line)
    return keep


def resume_run(out, changed, models, optimizer, tracker):
    """--resume: load the checkpoint, put the settings now in force into the optimiser and config.json, cut
    metrics.jsonl back to the checkpoint (a temp file, then a rename) -> step, nan_state."""
    cfg = models.cfg
    step, nan_state = load_checkpoint(out / "checkpoint.pt", models, optimizer, tracker)
    if step > cfg.bc_iters + cfg.iters:
        fail(f"--iters {cfg.iters}: the run is past it, at iteration {step} ({cfg.bc_iters} of them BC)",
             f"pass --iters {step - cfg.bc_iters} or more")
    for group in optimizer.param_groups:  # load_state_dict brought back the lr the checkpoint was saved with
        group["lr"] = cfg.lr
    if changed:
        print("resume: " + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
    if not cfg.profile:  # a profile's flags are for its own timing, not for the run
        write_config(cfg, out)
    keep = metrics_until(out / "metrics.jsonl", step)
    atomic_write(out / "metrics.jsonl", "".join(line + "\n" for line in keep))
    return step, nan_state


def train_iteration(models, rm, weights, cache, optimizer, tracker, prompts, step, nan_state):
    """One BC (E7) or RL iteration -> its metrics line."""
    cfg, clock, hits, misses = models.cfg, time.perf_counter(), cache.hits, cache.misses
    cpu_gen, dev_gen = iteration_generators(cfg, step, models.device)
    record, sec = dict(iter=step, phase="bc" if step < cfg.bc_iters else "rl"), {}
    pair_prompts, seeds = draw_pairs(cfg, prompts, cpu_gen)
    teacher = cache.get(pair_prompts, seeds)  # (P, K+1, 4, h, w)
    sec["teacher"], clock = time.perf_counter() - clock, time.perf_counter()
    if record["phase"] == "bc":
        record.update(bc_update(models, optimizer, teacher, encode_prompts(models, pair_prompts)))
    else:
        if cfg.bc_iters > 0 and step == cfg.bc_iters:
            # fresh Adam moments for RL, as toy/redif.py: BC's gradients are ~10x larger, and its moments would shrink
            # RL's first hundreds of steps 3-5x (a checkpoint saved at the switch holds BC's and resumes through here)
            optimizer.state.clear()
        if cfg.bc_iters > 0 and cfg.beta > 0 and models.reference is None:
            snapshot_reference(models)  # E6: the KL holds RL near the BC'd student, not the pre-BC teacher
        # a group = G rollouts sharing prompt and x_T, differing in eta-noise (E4); rollout b is in group b // G
        rollout_prompts = [p for p in pair_prompts for _ in range(cfg.group)]
        cond = encode_prompts(models, rollout_prompts)
        x_T = initial_noise(seeds, models.latent_size, models.device).repeat_interleave(cfg.group, dim=0)
        latents, log_probs = sample_student(models, x_T, cond, cfg.eta, dev_gen, cfg.sample_batch or cfg.train_batch)
        sec["rollout"], clock = time.perf_counter() - clock, time.perf_counter()
        rewards, terms, _ = compute_rewards(weights, models, rm, rollout_prompts, latents[:, -1], teacher[:, -1],
                                            cfg.group)  # E3
        sec["reward"], clock = time.perf_counter() - clock, time.perf_counter()
        record.update(reward_mean=rewards.mean().item(), reward_std=rewards.std(unbiased=False).item(),
                      **{f"reward_{k}": v.mean().item() for k, v in terms.items()})
        if torch.isfinite(rewards).all():
            if cfg.algo == "grpo":
                advantages = grpo_advantages(rewards.view(-1, cfg.group).cpu()).view(-1)  # E4
            else:
                advantages = tracker.update(rollout_prompts, rewards.cpu())
            advantages = advantages.clamp(-cfg.adv_clip_max, cfg.adv_clip_max).to(models.device)
            record.update(rl_update(models, optimizer, (latents, log_probs, cond), advantages, cpu_gen))
        else:
            record["nonfinite_rewards"] = True
    if record.get("nonfinite_rewards") or record.get("nonfinite_steps"):  # main() stops after --max-nan-skips in a row
        nan_state["skips"], nan_state["streak"] = nan_state["skips"] + 1, nan_state["streak"] + 1
        what = "rewards, update" if record.get("nonfinite_rewards") else "gradients in some minibatches, their steps"
        tqdm.write(f"warning: non-finite {what} skipped at iteration {step}")
    else:
        nan_state["streak"] = 0
    sec["update"] = time.perf_counter() - clock
    record.update(nan_skips=nan_state["skips"], teacher_cache_hits=cache.hits - hits,
                  teacher_cache_misses=cache.misses - misses, **{f"sec_{k}": v for k, v in sec.items()})
    return record


def run(argv, held):
    cfg = parse_args(argv)
    out, changed = Path(cfg.out), {}
    check_out_dir(cfg, out)
    if out.is_dir():  # now if it can, not after minutes of loading models
        lock_run_folder(out, held)
    if cfg.resume:
        cfg, changed = resume_config(cfg, given_flags(argv), out)
    weights, prompts = validate(cfg)
    if cfg.resume:
        check_same_prompts(out, prompts)
    device = pick_device(cfg)
    # config.json records what "auto" became: a --resume on another machine runs the same precision
    cfg.precision = "bf16" if frozen_dtype(cfg, device) == torch.bfloat16 else "fp32"
    print(run_summary(cfg, device))
    pipe = load_pipeline(cfg)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    unit = vae_scale * 2 ** (len(pipe.unet.config.block_out_channels) - 1)  # each UNet block halves the latent
    cfg.resolution = cfg.resolution or pipe.unet.config.sample_size * vae_scale
    if cfg.resolution % unit:
        fail(f"--resolution {cfg.resolution} is not a multiple of {unit}", f"use a multiple of {unit}")
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    models = setup_models(cfg, pipe, device)
    rm = load_reward_models(cfg, weights, device)  # a reward model that fails to load leaves no run folder behind
    out.mkdir(parents=True, exist_ok=True)
    if not held:
        lock_run_folder(out, held)
    if not cfg.resume:
        write_config(cfg, out)
        atomic_write(out / "prompts.txt", "".join(p + "\n" for p in prompts))
        for stale in out.glob("samples_*.png"):  # of a run that stopped before its first checkpoint
            stale.unlink()
    cache = TeacherCache(cfg.teacher_cache or out / "teacher_cache", models)
    optimizer = build_optimizer(models)
    tracker = PerPromptStatTracker(cfg.ppo_buffer, cfg.ppo_min_count) if cfg.algo == "ppo" else None
    step, nan_state, total = 0, dict(skips=0, streak=0), cfg.bc_iters + cfg.iters
    if cfg.resume:
        step, nan_state = resume_run(out, changed, models, optimizer, tracker)
    metrics_file, stop = open(out / "metrics.jsonl", "a" if cfg.resume else "w"), []

    def log(record):  # NaN/inf -> null, so every line is valid JSON
        record = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in record.items()}
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    def evaluate_and_log(count):
        log(dict(iter=count, phase="eval",
                 **evaluate(models, rm, weights, cache, prompts, out / f"samples_{count:06d}.png")))

    def on_signal(signum, frame):  # the first: finish the iteration, checkpoint, exit; a second one aborts
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        print(f"\n{signal.Signals(signum).name}: finishing this iteration, then saving a checkpoint (Ctrl-C again "
              "to abort)", file=sys.stderr)

    if cfg.profile:  # from where the run is; no checkpoint, no student (a later --resume drops its lines)
        with contextlib.closing(metrics_file):
            return profile(models, rm, cache, step, log, lambda s: train_iteration(
                models, rm, weights, cache, optimizer, tracker, prompts, s, nan_state))
    # Ctrl-C, and SIGTERM: what timeout, SLURM's preemption and docker stop send
    # (a signal set to be ignored stays so: bash starts a background `&` job with SIGINT ignored, so that the
    # terminal's Ctrl-C leaves it running; Python itself keeps such a SIGINT ignored)
    handled = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not signal.SIG_IGN
               and threading.current_thread() is threading.main_thread()]
    old_handlers = {sig: signal.signal(sig, on_signal) for sig in handled}
    saved = step if cfg.resume else None  # the iteration count of the checkpoint on disk
    try:
        if not cfg.resume:  # a checkpoint, even at iteration 0, comes after this eval's line
            evaluate_and_log(0)
        bar = tqdm(range(step, total), initial=step, total=total, desc="redif", disable=None)
        for step in bar:
            record = train_iteration(models, rm, weights, cache, optimizer, tracker, prompts, step, nan_state)
            log(record)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ("reward_mean", "bc_loss") if record.get(k) is not None})
            count = step + 1
            if (cfg.eval_every and count % cfg.eval_every == 0) or count == total:
                evaluate_and_log(count)
            if stop or count % cfg.ckpt_every == 0 or count == total or nan_state["streak"] >= cfg.max_nan_skips:
                save_checkpoint(out / "checkpoint.pt", count, models, optimizer, tracker, nan_state)
                saved = count
            if nan_state["streak"] >= cfg.max_nan_skips:
                fail(f"rewards or gradients were NaN/inf in {nan_state['streak']} iterations in a row (updates "
                     "skipped, checkpoint saved)",
                     "check the reward models and --reward weights, lower --lr, then --resume")
            if stop:  # a non-zero status: no student was written, so `redif.py ... && next-step` stops here
                print(f"saved {out / 'checkpoint.pt'} at iteration {count}; continue with --out {out} --resume",
                      file=sys.stderr)
                raise SystemExit(128 + stop[0])
        if saved is None:  # --bc-iters 0 --iters 0: the student is the teacher, and still a run to resume
            save_checkpoint(out / "checkpoint.pt", step, models, optimizer, tracker, nan_state)
        save_student(models, out / "student")
        print(f"student saved to {out / 'student'}: {cfg.steps} steps, guidance {cfg.student_guidance}, eta 0")
        return out
    except KeyboardInterrupt:  # a second signal: stop mid-iteration; the checkpoint on disk stays as it was
        print("aborted mid-iteration; " + (f"{out / 'checkpoint.pt'} (iteration {saved}) continues with --out {out} "
                                           "--resume" if saved is not None else "no checkpoint was saved"),
              file=sys.stderr)
        raise SystemExit(130)
    except OSError as e:  # the disk filled (or went read-only) under the metrics or a sample grid
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            write_failed(e.filename or out, e)
        raise
    finally:
        with contextlib.suppress(OSError):  # each line was flushed as written: a failed close repeats a reported error
            metrics_file.close()
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)


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
