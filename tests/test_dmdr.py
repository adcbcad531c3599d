"""dmdr.py on the offline `tiny` teacher (CPU): end-to-end runs for each RL branch, the saved pipeline, exact
resume, Ctrl-C, bad input, cross-checks against toy/, shared base weights, and a seeded learning test."""
import contextlib
import dataclasses
import json
import math
import os
import signal
import types
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
import torch.nn.functional as F

import dmdr
from gaussian_teacher import GaussianScoreUNet, gaussian_eps
from toy import dmdr as toy_dmdr
from toy import diffusion as toy_diffusion
from toy import redif as toy_redif

PROMPTS = ["a photo of a cat", "a red car", "a blue bird", "a green tree", "a small dog", "a wooden house"]
KEYS = {"iter", "dmd_loss", "fake_loss", "rl_loss", "reward", "dynadg_scale", "dynars_mean", "grad_norm",
        "sec_generator", "sec_fake", "sec_rl"}
EVAL_KEYS = {"eval_reward", "eval_clip_generator", "eval_clip_teacher", "eval_fd_clip"}
GENERATOR = {"none": "lora", "refl": "full", "dpo": "lora", "grpo": "full"}  # both generator kinds get exercised
ITERS = {"none": 2, "refl": 1, "dpo": 1, "grpo": 1}  # `none` also serves the resume test
ABLATION = {"dpo": ["--no-dynadg", "--no-dynars"]}  # the paper's cold-start ablation switches
STEPS = {"none": "2", "refl": "1", "dpo": "1", "grpo": "2"}  # K=1 and K=2 (backward simulation) both run


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def tiny_args(prompt_file, out, rl="none", iters=2, *extra):
    args = ["--teacher", "tiny", "--device", "cpu", "--prompts", prompt_file, "--num-eval-prompts", "2",
            "--steps", "2", "--batch-size", "2", "--fake-updates", "1", "--eval-every", "1",
            "--eval-teacher-steps", "2",
            "--iters", str(iters), "--out", str(out), "--rl", rl, "--generator", GENERATOR[rl], "--grpo-group", "2",
            "--save-every", "1000", "--seed", "3"]
    return args + (["--rl-start", "0"] if rl != "none" else []) + list(extra)


def strict_json(line):
    """json.loads as jq and pandas read: Python's NaN/Infinity tokens are not JSON."""
    return json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in metrics.jsonl: not JSON"))


def read_metrics(out):
    return [strict_json(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_frechet_distance_is_logged_as_null(prompt_file, tmp_path, monkeypatch):
    monkeypatch.setattr(dmdr, "frechet_distance", lambda f1, f2: float("nan"))
    dmdr.main(tiny_args(prompt_file, tmp_path, "none", 1))
    (row,) = read_metrics(tmp_path)
    assert row["eval_fd_clip"] is None and math.isfinite(row["dmd_loss"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prompt_file):
    """One short run per --rl (shared by the tests below)."""
    outs = {}
    for rl in GENERATOR:
        outs[rl] = tmp_path_factory.mktemp(f"run_{rl}")
        dmdr.main(tiny_args(prompt_file, outs[rl], rl, ITERS[rl], "--steps", STEPS[rl], *ABLATION.get(rl, [])))
    return outs


# ---------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rl", list(GENERATOR))
def test_end_to_end(runs, rl):
    out, n = runs[rl], ITERS[rl]
    rows = read_metrics(out)
    assert [r["iter"] for r in rows] == list(range(1, n + 1))
    for r in rows:
        assert KEYS <= set(r)
        assert all(math.isfinite(r[k]) for k in ("dmd_loss", "fake_loss", "grad_norm", "dynadg_scale", "dynars_mean"))
        assert r["grad_norm"] == pytest.approx(math.sqrt(2 * r["dmd_loss"]))
        if rl in ABLATION:  # DynaDG off: the plain teacher is the real score; DynaRS off: uniform renoise
            assert r["dynadg_scale"] == 0 and r["dynars_mean"] == 0.5
        else:
            assert r["dynadg_scale"] == pytest.approx(dmdr.dynadg_scale(r["iter"] - 1))
            assert r["dynars_mean"] == pytest.approx(4.0 / 5.5, rel=1e-6)  # Beta(4, 1.5) at the start (E11)
        if rl == "none":
            assert r["rl_loss"] is None and r["reward"] is None and r["sec_rl"] == 0
        else:
            assert math.isfinite(r["rl_loss"]) and -1 <= r["reward"] <= 1 and r["sec_rl"] > 0
    from PIL import Image
    for r in rows:  # --eval-every 1
        assert EVAL_KEYS <= set(r) and r["eval_fd_clip"] >= 0 and all(math.isfinite(r[k]) for k in EVAL_KEYS)
        assert Image.open(out / f"samples_{r['iter']:06d}.png").size == (2 * 32, 2 * 32)  # 2 prompts x (gen, teacher)
    assert len({r["eval_clip_teacher"] for r in rows}) == 1  # the teacher's images are fixed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rl"] == rl and cfg["rl_weight"] == (None if rl == "none" else 0.05)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == n and {"generator", "fake", "opt_g", "opt_f", "rng"} <= set(ckpt)
    assert all(".fake." in k for k in ckpt["fake"]) and len(ckpt["fake"]) > 0
    assert any(v.abs().sum() > 0 for k, v in ckpt["fake"].items() if "lora_B" in k)  # the fake score trained
    assert len(ckpt["opt_g"]["state"]) > 0 and len(ckpt["opt_f"]["state"]) > 0
    # DPO's reference (the generator as RL started, at step 0 here) travels with the checkpoint
    assert (ckpt["dpo_ref"] is not None) == (rl == "dpo")
    if rl == "dpo":
        assert ckpt["dpo_ref"].keys() == ckpt["generator"].keys()


def test_evaluation_is_the_generator_against_a_stock_ddim_teacher(prompt_file, tmp_path):
    """evaluate()'s teacher images are a stock diffusers pipeline (DDIM, trailing, eta 0) at --eval-teacher-steps
    and --eval-teacher-guidance from evaluate's own fixed noise (not the real score's guidance), and eval_fd_clip is
    the FD of the generator's CLIP features against the teacher's, > 0 (a set against itself cannot pass)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "none", 1, "--real-guidance", "1.75",
                                    "--eval-teacher-guidance", "7.5"))
    _, eval_prompts = dmdr.validate(cfg)
    assert eval_prompts == PROMPTS[-2:]
    m = dmdr.build_models(cfg, torch.device("cpu"))
    m.uncond = dmdr.encode_prompts(m, [""])
    cache = {}
    metrics = dmdr.evaluate(m, cfg, eval_prompts, cache, 0, tmp_path)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    z = torch.randn(len(eval_prompts), *dmdr.latent_shape(m), generator=g)
    generated = dmdr.decode(m, dmdr.sample_generator(m, z, dmdr.encode_prompts(m, eval_prompts), generator=g))
    unet, vae, text_encoder, tokenizer = dmdr.load_teacher("tiny")
    scheduler = DDIMScheduler.from_config(dmdr.sd_scheduler().config, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(eval_prompts, num_inference_steps=cfg.eval_teacher_steps, guidance_scale=7.5, eta=0.0,
                   latents=z.clone(), output_type="latent").images
    with torch.no_grad():
        teacher = dmdr.decode(m, latents)
        torch.testing.assert_close(cache["teacher"], teacher, rtol=1e-4, atol=1e-4)
        fd = dmdr.frechet_distance(dmdr.clip_features(m, generated), dmdr.clip_features(m, teacher))
    assert fd > 1e-6 and metrics["eval_fd_clip"] == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_the_last_prompts_are_held_out_and_every_training_prompt_is_drawn(prompt_file, tmp_path):
    """--prompts' last --num-eval-prompts are held out: evaluation and training prompts partition the file, and
    training draws every one of its prompts (the last one too)."""
    train, held_out = dmdr.validate(dmdr.parse_args(tiny_args(prompt_file, tmp_path)))
    assert held_out == PROMPTS[-2:] and train == PROMPTS[:-2]
    torch.manual_seed(0)
    assert set(dmdr.pick_prompts(train, 300)) == set(train)


def test_saved_pipeline_samples_like_the_generator(runs, prompt_file):
    """Stock diffusers on the saved folder (LoRA generator merged, LCMScheduler) == our own K-step sampler, and
    so is the teacher's pipeline with the folder's LoRA file loaded by load_lora_weights."""
    from diffusers import StableDiffusionPipeline
    rl = "none"
    out = runs[rl]
    pipe = StableDiffusionPipeline.from_pretrained(out / "generator")
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    latents = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=0, latents=z.clone(), output_type="latent",
                   generator=torch.Generator().manual_seed(11)).images
    assert pipe.scheduler.timesteps.tolist() == [999, 499]  # the trailing grid of --steps 2
    for k in (1, 4):  # the saved scheduler config gives every supported K its trailing grid
        pipe.scheduler.set_timesteps(k)
        assert pipe.scheduler.timesteps.tolist() == dmdr.trailing_timesteps(k).tolist()
    cfg = dmdr.parse_args(tiny_args(prompt_file, out, rl))
    m = dmdr.build_models(cfg, torch.device("cpu"))
    dmdr.load_checkpoint(out / "checkpoint.pt", m, torch.optim.AdamW(list(dmdr.generator_params(m).values())),
                         torch.optim.AdamW(dmdr.lora_params(m.unet, "fake")))
    ours = dmdr.sample_generator(m, z, dmdr.encode_prompts(m, PROMPTS[:2]), generator=torch.Generator().manual_seed(11))
    print(f"pipeline vs sampler: max |diff| {(latents - ours).abs().max():.2e}, max |x| {ours.abs().max():.1f}")
    assert torch.allclose(latents, ours, atol=1e-4, rtol=1e-4), (latents - ours).abs().max()
    unet, vae, text_encoder, tokenizer = dmdr.load_teacher("tiny")
    base = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    base.load_lora_weights(out / "generator")  # the LoRA alone, on the teacher: the same generator
    base.set_progress_bar_config(disable=True)
    lora = base(PROMPTS[:2], num_inference_steps=2, guidance_scale=0, latents=z.clone(), output_type="latent",
                generator=torch.Generator().manual_seed(11)).images
    assert torch.allclose(lora, ours, atol=1e-4, rtol=1e-4), (lora - ours).abs().max()
    teacher = dmdr.random_teacher("tiny")[0]
    assert any(not torch.equal(p, q) for p, q in zip(pipe.unet.parameters(), teacher.parameters()))  # trained
    full = StableDiffusionPipeline.from_pretrained(runs["refl"] / "generator").unet.state_dict()  # a full generator
    saved = torch.load(runs["refl"] / "checkpoint.pt", weights_only=False)["generator"]
    assert full.keys() == saved.keys() and all(torch.equal(full[k], saved[k]) for k in full)


def test_ctrl_c_checkpoints_and_resume_is_exact(runs, prompt_file, tmp_path, monkeypatch):
    """Ctrl-C in iteration 1 -> checkpoint at 1 and a clean exit; --resume to 2 == the uninterrupted `none` run
    (with an evaluation before and after the interruption)."""
    real = dmdr.fake_updates

    def interrupted(m, cfg, opt_f, step, prompts):
        if step == 0:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during iteration 1
        return real(m, cfg, opt_f, step, prompts)
    monkeypatch.setattr(dmdr, "fake_updates", interrupted)
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with pytest.raises(SystemExit) as stopped:
        dmdr.main(tiny_args(prompt_file, tmp_path, "none", 5))
    assert stopped.value.code == 130  # 128 + SIGINT: no generator was written, a `&&` chain stops
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 1
    assert [r["iter"] for r in read_metrics(tmp_path)] == [1] and not (tmp_path / "generator").exists()
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before  # handlers restored
    dmdr.main(["--out", str(tmp_path), "--resume", "--iters", "2"])  # the other settings from config.json
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("sec_")} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path)) == strip(read_metrics(runs["none"]))
    assert (tmp_path / "generator" / "model_index.json").exists()
    ours, theirs = (torch.load(p / "checkpoint.pt", weights_only=False) for p in (tmp_path, runs["none"]))
    for key in ("generator", "fake"):  # the weights and both optimisers' states, bit for bit
        a, b = ours[key], theirs[key]
        assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items()), key
    for key in ("opt_g", "opt_f"):
        a, b = ours[key]["state"], theirs[key]["state"]
        assert a.keys() == b.keys() and all(torch.equal(a[i][n], b[i][n]) for i in a for n in a[i]), key


def test_sigterm_checkpoints_and_an_ignored_sigint_stays_ignored(prompt_file, tmp_path, monkeypatch, capsys):
    """SIGTERM (timeout, SLURM, docker stop) in iteration 1 -> checkpoint at 1, status 128 + 15, one line saying
    so. A SIGINT that was ignored when the run started (a shell script's background job) stays ignored."""
    real = dmdr.fake_updates

    def signalled(m, cfg, opt_f, step, prompts):
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)  # ignored: no effect
        signal.raise_signal(signal.SIGTERM)
        return real(m, cfg, opt_f, step, prompts)
    monkeypatch.setattr(dmdr, "fake_updates", signalled)
    term = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # conftest's autouse fixture restores it
    with pytest.raises(SystemExit) as stopped:
        dmdr.main(tiny_args(prompt_file, tmp_path, "none", 3))
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is term
    assert stopped.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 1
    ckpt = tmp_path / "checkpoint.pt"
    assert capsys.readouterr().err.splitlines()[-1] == (f"interrupted: checkpoint at iteration 1 in {ckpt} "
                                                        f"(continue with --out {tmp_path} --resume)")


def test_a_second_ctrl_c_aborts_mid_iteration_in_one_line_and_keeps_the_checkpoint(prompt_file, tmp_path,
                                                                                     monkeypatch, capsys):
    real = dmdr.fake_updates

    def pressed_twice(m, cfg, opt_f, step, prompts):
        if step == 1:  # iteration 1 was checkpointed (--save-every 1)
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(m, cfg, opt_f, step, prompts)
    monkeypatch.setattr(dmdr, "fake_updates", pressed_twice)
    with pytest.raises(SystemExit) as stopped:
        dmdr.main(tiny_args(prompt_file, tmp_path, "none", 3, "--save-every", "1", "--eval-every", "1000"))
    assert stopped.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (f"aborted in iteration 2; {tmp_path / 'checkpoint.pt'} "
                                                        f"(iteration 1) continues with --out {tmp_path} --resume")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 1


def test_a_nan_score_stops_the_run_rather_than_vanishing_in_nan_to_num(prompt_file, tmp_path, monkeypatch):
    """E8's nan_to_num would turn a NaN teacher output (a bf16 overflow, say) into a silent zero gradient."""
    real = dmdr.real_x0
    monkeypatch.setattr(dmdr, "real_x0", lambda *args: real(*args) * float("nan"))
    with pytest.raises(SystemExit) as e:
        dmdr.main(tiny_args(prompt_file, tmp_path, "none", 2))
    assert str(e.value).startswith("error: non-finite real score at iteration 1") and "\n" not in str(e.value)


def test_nan_loss_is_one_line_error_keeps_the_last_checkpoint_and_resumes_with_a_lower_lr(prompt_file, tmp_path,
                                                                                         monkeypatch, capsys):
    """A non-finite loss mid-iteration (after that iteration's generator step) ends in one line and leaves the
    last checkpoint as it was (a mid-iteration state would resume inexactly); --resume with the lower --lr the
    error asks for continues from it with that lr, past a metrics line cut short by the crash."""
    real, calls = dmdr.fake_score_loss, []

    def nan_in_iteration_3(*args):
        calls.append(1)
        return torch.tensor(float("nan"), requires_grad=True) if len(calls) == 3 else real(*args)
    monkeypatch.setattr(dmdr, "fake_score_loss", nan_in_iteration_3)
    args = tiny_args(prompt_file, tmp_path, "none", 4)
    args[args.index("--save-every") + 1] = "2"
    with pytest.raises(SystemExit) as e:
        dmdr.main(args)
    msg = str(e.value)
    assert msg.startswith("error: non-finite fake-score loss at iteration 3") and "\n" not in msg
    assert "(fix: lower --lr/--fake-lr, then --resume" in msg and "(iteration 2)" in msg
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2 and {int(s["step"]) for s in ckpt["opt_g"]["state"].values()} == {2}  # consistent
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iter": 3, "dmd_lo')  # the process died while writing
    monkeypatch.setattr(dmdr, "fake_score_loss", real)
    dmdr.main(args + ["--resume", "--lr", "3e-5"])
    assert "resume: lr 0.0001 -> 3e-05" in capsys.readouterr().out
    assert [r["iter"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert [r["lr"] for r in read_metrics(tmp_path)] == [1e-4, 1e-4, 3e-5, 3e-5]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["lr"] == 3e-5 and config["precision"] == "fp32"  # auto, as it resolved: a resume elsewhere keeps it


def test_nan_loss_before_any_checkpoint_says_so(prompt_file, tmp_path, monkeypatch):
    monkeypatch.setattr(dmdr, "fake_score_loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match=r"iteration 1 \(fix: lower --lr/--fake-lr and start afresh"):
        dmdr.main(tiny_args(prompt_file, tmp_path, "none", 3))
    assert not (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(SystemExit, match="holds no checkpoint.pt .fix: run without --resume"):
        dmdr.main(tiny_args(prompt_file, tmp_path, "none", 3, "--resume"))
    monkeypatch.undo()  # the folder holds no run to lose: a fresh run starts over in it
    dmdr.main(tiny_args(prompt_file, tmp_path, "none", 1, "--eval-every", "1000"))
    assert [r["iter"] for r in read_metrics(tmp_path)] == [1] and (tmp_path / "generator").is_dir()


@pytest.mark.parametrize("rl", ["grpo", "dpo"])
def test_nan_rewards_stop_in_one_line(rl, prompt_file, tmp_path, monkeypatch):
    """One NaN among the rewards stops the run (DPO once ranked it a loser and went on with a finite loss)."""
    def reward_fn(m, cfg, images, prompts):
        r = torch.arange(len(images), dtype=torch.float32)
        r[-1] = float("nan")
        return r
    monkeypatch.setattr(dmdr, "reward_fn", reward_fn)
    with pytest.raises(SystemExit) as e:
        dmdr.main(tiny_args(prompt_file, tmp_path, rl, 1, "--steps", "2"))
    msg = str(e.value)
    assert msg.startswith(f"error: non-finite rewards in {rl.upper()}") and "(fix: lower --lr" in msg
    assert "\n" not in msg


def test_a_checkpoint_of_the_other_generator_kind_is_refused(runs, prompt_file, tmp_path):
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "refl", 1, "--generator", "full"))
    m = dmdr.build_models(cfg, torch.device("cpu"))
    opt_g, opt_f = (torch.optim.AdamW(p) for p in (list(dmdr.generator_params(m).values()),
                                                   dmdr.lora_params(m.unet, "fake")))
    with pytest.raises(SystemExit, match="does not match this generator"):
        dmdr.load_checkpoint(runs["none"] / "checkpoint.pt", m, opt_g, opt_f)  # a LoRA generator's
    (tmp_path / "c.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="c.pt is unreadable .EOFError"):
        dmdr.load_checkpoint(tmp_path / "c.pt", m, opt_g, opt_f)


def test_run_summary_names_device_and_precision_and_warns_of_a_cpu_run_at_sd_scale():
    """The run's first line says where it runs and in what precision; --device auto without a GPU on a real
    teacher warns (the run would take hours an iteration), the tiny teacher on the CPU does not."""
    def summary(device, *args):
        return dmdr.run_summary(dmdr.parse_args(list(args)), torch.device(device)).splitlines()

    assert summary("cuda") == ["dmdr: teacher sd15 on cuda (bfloat16), full generator, 4 steps, rl refl, "
                               "40000 iterations, out runs/dmdr"]
    assert summary("cpu", "--teacher", "tiny", "--rl", "dpo")[0].startswith("dmdr: teacher tiny on cpu (float32),")
    assert len(summary("cpu", "--teacher", "tiny")) == 1
    assert summary("cpu")[1].startswith("warning: no GPU in use") and len(summary("cpu", "--teacher", "x/y")) == 2
    # the official demo's RL start (20k) in a shorter run: no RL at all, said up front
    assert summary("cuda", "--iters", "20000")[1].startswith("warning: --rl-start 20000 >= --iters 20000: RL (refl)")
    assert len(summary("cuda", "--iters", "20001")) == len(summary("cuda", "--iters", "100", "--rl", "none")) == 1


@pytest.mark.parametrize("args, message", [
    (["--teacher", "./no/such/folder"], "unknown teacher './no/such/folder'"),
    (["--teacher", "sd-turbo"], "unknown teacher 'sd-turbo'"),
    (["--steps", "3"], "--steps 3 is not supported"),
    (["--rl-weight", "0.1"], "--rl-weight given but --rl is none"),
    (["--prompts", "EMPTY"], "is empty"),
    (["--device", "cuda"], "--device cuda but CUDA is not available"),
    (["--reward", "pickscore=1"], "unknown reward 'pickscore'"),
    (["--resume"], "--resume but"),
    (["--teacher", "BROKEN"], "could not load teacher"),  # passes the checks, fails in from_pretrained
    (["--dynars-steps", "0"], "--dynars-steps 0 must be positive"),  # the schedules divide by their horizon
    (["--max-grad-norm", "-1"], "--max-grad-norm -1.0 must be positive"),  # torch would reverse the gradient
    (["--generator", "lora", "--generator-lora-rank", "0"], "--generator-lora-rank 0 must be positive"),
    (["--dynars-a0", "-1"], "--dynars-a0 -1.0 must be positive"),  # not a Beta distribution
    (["--fake-lr", "-1"], "--fake-lr -1.0 must be non-negative"),
    (["--rl", "refl", "--rl-weight", "nan"], "--rl-weight nan is not a finite number"),
    (["--seed", "-1"], "--seed -1 is out of range"),
    (["--eval-teacher-steps", "61"], "--eval-teacher-steps 61"),  # the float arange gives 62 timesteps
    (["--eval-teacher-steps", "1001"], "--eval-teacher-steps 1001"),
    (["--prompts", "LATIN1"], "is not UTF-8 text"),
    (["--out", "AFILE"], "is a file"),
    (["--out", "AFILE/run"], "afile is a file"),
    (["--reward", "clip_text=nan"], "--reward weight clip_text=nan is not finite"),
    (["--batch-size", str(2 ** 31)], "is too large"),
    (["--rl", "grpo", "--rl-start", "0", "--grpo-eta", "0"], "--grpo-eta 0.0"),  # no log-prob: GRPO would not move
    (["--rl", "grpo", "--rl-start", "0", "--grpo-eta", "1.5"], "--grpo-eta 1.5 is not in (0, 1]"),  # not DDIM
])
def test_bad_input_one_line_error(args, message, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if "EMPTY" in args:
        (tmp_path / "empty.txt").write_text("\n  \n")
        args = [a.replace("EMPTY", str(tmp_path / "empty.txt")) for a in args]
    if "LATIN1" in args:
        (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
        args = [a.replace("LATIN1", str(tmp_path / "latin1.txt")) for a in args]
    if any("AFILE" in a for a in args):
        (tmp_path / "afile").write_text("")
        args = [a.replace("AFILE", str(tmp_path / "afile")) for a in args]
    if "BROKEN" in args:
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "model_index.json").write_text("{}")
        args = [a.replace("BROKEN", str(tmp_path / "broken")) for a in args]
    out = tmp_path / "out"
    argv = tiny_args(prompt_file, out, "none")
    for flag, value in zip(args[::2], args[1::2] + [None]):
        if flag in argv and value is not None:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag] + ([value] if value is not None else [])
    with pytest.raises(SystemExit) as e:
        dmdr.main(argv)
    msg = str(e.value)
    assert msg.startswith("error: ") and message in msg and "(fix: " in msg and "\n" not in msg
    assert not out.exists()  # nothing was written


def test_a_config_json_with_null_for_a_setting_that_has_a_default_is_refused(prompt_file, tmp_path):
    """fits() lets null through only for the settings whose default is None (lr, rl_weight, prompts, ...)."""
    fields = {f.name: f for f in dataclasses.fields(dmdr.Config)}
    assert dmdr.fits(None, fields["lr"]) and dmdr.fits(None, fields["prompts"])
    assert not dmdr.fits(None, fields["steps"]) and not dmdr.fits(None, fields["real_guidance"])
    out = tmp_path / "run"
    out.mkdir()
    config = dataclasses.asdict(dmdr.parse_args(tiny_args(prompt_file, out)))
    (out / "config.json").write_text(json.dumps({**config, "steps": None}))
    argv = ["--out", str(out), "--resume"]
    with pytest.raises(SystemExit, match="values no flag gives: steps=None"):
        dmdr.resume_config(dmdr.parse_args(argv), dmdr.given_flags(argv), out)


def test_a_training_prompt_is_needed_beyond_the_held_out_ones(tmp_path):
    """With exactly --num-eval-prompts prompts nothing is left to train on: one line, before any model."""
    path = tmp_path / "two.txt"
    path.write_text("a cat\na dog\n")
    cfg = dmdr.parse_args(["--teacher", "tiny", "--prompts", str(path), "--num-eval-prompts", "2", "--out",
                           str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="2 prompts but 2 are held out"):
        dmdr.validate(cfg)
    path.write_text("a cat\na dog\na bird\n")
    assert dmdr.validate(cfg) == (["a cat"], ["a dog", "a bird"])


class Stop(Exception):
    pass


def test_each_optimiser_runs_at_its_own_lr(prompt_file, tmp_path, monkeypatch):
    """main sets each optimiser's lr from its flag: the generator's at --lr, the fake score's at --fake-lr."""
    seen = {}

    def generator_update(m, cfg, opt_g, step, prompts):
        seen["g"] = [g["lr"] for g in opt_g.param_groups]
        return {"dmd_loss": 0.0}

    def fake_updates(m, cfg, opt_f, step, prompts):
        seen["f"] = [g["lr"] for g in opt_f.param_groups]
        raise Stop
    monkeypatch.setattr(dmdr, "generator_update", generator_update)
    monkeypatch.setattr(dmdr, "fake_updates", fake_updates)
    with pytest.raises(Stop):
        dmdr.main(tiny_args(prompt_file, tmp_path / "run", "none", 1, "--lr", "2e-4", "--fake-lr", "3e-6"))
    assert seen == {"g": [2e-4], "f": [3e-6]}


def test_resume_drops_profile_lines_and_keeps_the_runs_own(prompt_file, tmp_path):
    """A --resume --profile appends a "profile" line (its timing, not the run's); the next --resume cuts
    metrics.jsonl back to the checkpoint's iterations without it: the run's lines are those of the run alone."""
    out = tmp_path / "run"
    dmdr.main(tiny_args(prompt_file, out, "none", 1, "--eval-every", "1000"))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == [1]
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"phase": "profile", "iter": 1, "iters": 1, "wall_s": 1.0}) + "\n")
    dmdr.main(["--out", str(out), "--resume", "--iters", "2"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("phase") for r in rows] == [None, None] and [r["iter"] for r in rows] == [1, 2]
    assert (out / "metrics.jsonl").read_text().splitlines()[0] == lines[0]


def test_existing_run_is_never_overwritten(runs, prompt_file):
    before = (runs["dpo"] / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="already holds a run"):
        dmdr.main(tiny_args(prompt_file, runs["dpo"], "dpo"))
    with pytest.raises(SystemExit, match="--resume with different settings: real_guidance"):
        dmdr.main(tiny_args(prompt_file, runs["dpo"], "dpo", 3, "--steps", STEPS["dpo"], *ABLATION["dpo"], "--resume",
                            "--real-guidance", "3"))
    with pytest.raises(SystemExit, match="--resume with different settings: dynadg"):  # the switch's --no- form
        dmdr.main(["--out", str(runs["dpo"]), "--resume", "--dynadg"])
    other = Path(prompt_file).with_name("reversed.txt")
    other.write_text("\n".join(PROMPTS[::-1]) + "\n")
    with pytest.raises(SystemExit, match="the prompts differ from those the run started with"):
        dmdr.main(["--out", str(runs["dpo"]), "--resume", "--prompts", str(other)])
    assert (runs["dpo"] / "metrics.jsonl").read_text() == before


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        dmdr.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in dataclasses.fields(dmdr.Config):
        flag = "--" + ("no-" if f.default is True else "") + f.name.replace("_", "-")
        assert flag in text and " ".join(f.metadata["help"].split()[:3]) in text
    assert "(default: None)" not in text and "(default: 0.75)" in text  # None's meaning is in its flag's help


# ---------------------------------------------------------------------------------------------------
# Pure functions: the same numbers as toy/ on the same inputs
# ---------------------------------------------------------------------------------------------------
def test_frechet_distance_closed_form_under_an_affine_map():
    """b = 2a + 1: C_b = 4 C_a, so FD = |mu_a - mu_b|^2 + tr(C + 4C - 2 * 2C) = |mu_a + 1|^2 + tr(C_a)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    expected = ((a.mean(0) + 1) ** 2).sum() + torch.cov(a.T).trace()
    assert dmdr.frechet_distance(a, 2 * a + 1) == pytest.approx(expected.item(), rel=1e-6)
    assert dmdr.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("scale", [dmdr.dynadg_scale, toy_dmdr.dynadg_scale], ids=["dmdr", "toy"])
def test_dynadg_is_the_cosine_decay_of_e10(scale):
    """E10's shape, pinned in both files (their equality alone would pass any decay they shared)."""
    for s, c in ((0, 1.0), (2500, 0.5 * (1 + math.sqrt(0.5))), (5000, 0.5), (7500, 0.5 * (1 - math.sqrt(0.5))),
                 (10000, 0.0), (12000, 0.0)):
        assert scale(s, 0.75, 10000) == pytest.approx(0.75 * c, abs=1e-12)


def test_dmd_loss_matches_toy_and_its_gradient_is_the_normalised_x0_difference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    x0_real = x + torch.randn(x.shape, generator=g, dtype=torch.float64)
    x0_fake = x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ours, toys = dmdr.dmd_loss(xs[0], x0_real, x0_fake), toy_dmdr.dmd_loss(xs[1], x0_real, x0_fake)
    ours.backward(), toys.backward()
    assert ours.item() == pytest.approx(toys.item(), rel=1e-12)
    assert torch.allclose(xs[0].grad, xs[1].grad, rtol=1e-12, atol=0)
    # E8: -dL/dx * numel = (x0_real - x0_fake) / mean|x - x0_real| (per sample)
    expected = (x0_real - x0_fake) / ((x - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8)
    assert torch.allclose(-xs[0].grad * x.numel(), expected, rtol=1e-10, atol=1e-12)
    assert ours.item() == pytest.approx(0.5 * expected.pow(2).mean().item(), rel=1e-10)
    z = torch.zeros(2, 3, requires_grad=True)  # x == x0_real == x0_fake: 0 / (0 + 1e-8) = 0
    assert dmdr.dmd_loss(z, torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0
    assert math.isfinite(dmdr.dmd_loss(z, torch.zeros(2, 3), torch.ones(2, 3)).item())  # x == x0_real: no inf


def test_schedules_match_toy():
    for step in [0, 1, 100, 2500, 5000, 9999, 10000, 12000]:
        assert dmdr.dynadg_scale(step) == pytest.approx(toy_dmdr.dynadg_scale(step), abs=1e-15)
        assert dmdr.dynadg_scale(step, 0.5, 300) == pytest.approx(toy_dmdr.dynadg_scale(step, 0.5, 300), abs=1e-15)
        assert dmdr.dynars_beta(step) == pytest.approx(toy_dmdr.dynars_beta(step), abs=1e-15)
        assert dmdr.dynars_beta(step, 3.0, 2.0, 700) == pytest.approx(toy_dmdr.dynars_beta(step, 3.0, 2.0, 700),
                                                                      abs=1e-15)
    assert dmdr.dynadg_scale(0) == 0.75 and dmdr.dynadg_scale(10000) == 0.0  # E10 end points
    assert dmdr.dynars_beta(0) == (4.0, 1.5) and dmdr.dynars_beta(10000) == (1.0, 1.0)  # E11 end points
    for step, dynamic in [(0, True), (3000, True), (20000, True), (0, False)]:
        ours = dmdr.sample_renoise_timesteps(64, step, generator=torch.Generator().manual_seed(5), dynamic=dynamic)
        toys = toy_dmdr.sample_renoise_timesteps(64, step, generator=torch.Generator().manual_seed(5), dynamic=dynamic)
        assert torch.equal(ours, toys) and ours.dtype == torch.long and 20 <= ours.min() and ours.max() <= 980
    early = dmdr.sample_renoise_timesteps(4000, 0, generator=torch.Generator().manual_seed(0)).float().mean()
    late = dmdr.sample_renoise_timesteps(4000, 10000, generator=torch.Generator().manual_seed(0)).float().mean()
    assert early.item() == pytest.approx(20 + 960 * 4 / 5.5, abs=8) and late.item() == pytest.approx(500, abs=10)


def test_advantages_and_ddim_step_match_toy():
    r = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r[2] = 0.1  # an all-equal group: exactly 0
    ours = dmdr.grpo_advantages(r)
    assert torch.allclose(ours, toy_redif.grpo_advantages(r), rtol=1e-12, atol=1e-15)
    assert torch.equal(ours[2], torch.zeros(4))
    with pytest.raises(ValueError, match="non-finite rewards"):
        dmdr.grpo_advantages(torch.tensor([[1.0, float("nan")]]))
    ac = toy_diffusion.sd_alphas_cumprod()
    g = torch.Generator().manual_seed(2)
    eps, x = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for t, t_prev in [(999, 749), (249, -1)]:
        a = dmdr.ddim_step_with_logprob(eps, t, t_prev, x, ac, 1.0, generator=torch.Generator().manual_seed(3))
        b = toy_diffusion.ddim_step_with_logprob(eps, t, t_prev, x, ac, 1.0, generator=torch.Generator().manual_seed(3))
        assert all(torch.allclose(u, v, rtol=1e-12, atol=1e-14) for u, v in zip(a[:3], b[:3]))
    assert dmdr.trailing_timesteps(4).tolist() == [999, 749, 499, 249] == toy_diffusion.trailing_timesteps(4).tolist()


# ---------------------------------------------------------------------------------------------------
# Real and fake share one copy of the teacher's weights
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_models(prompt_file, tmp_path_factory):
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path_factory.mktemp("m"), "none"))
    m = dmdr.build_models(cfg, torch.device("cpu"))
    m.uncond = dmdr.encode_prompts(m, [""])
    return m


def storage_numel(*modules):
    seen = {}
    for module in modules:
        for p in module.parameters():
            seen[p.untyped_storage().data_ptr()] = p.numel()
    return sum(seen.values())


def test_building_the_models_prints_no_upstream_noise(prompt_file, tmp_path, modeling_log):
    """Two adapters on one UNet is the point (peft warns of it) and SD's UNet and VAE keep no module in float32
    (diffusers 0.42 says so on every cast): neither reaches the user. A notice that names modules still does."""
    log, records = modeling_log
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "none", 1, "--generator", "lora", "--precision", "bf16"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dmdr.build_models(cfg, torch.device("cpu"))
    assert [str(w.message) for w in caught] == [] and records == [] and dmdr.drop_empty_fp32_notice in log.filters
    log.warning("modules should be kept in float32: ['norm']")
    assert [r.getMessage() for r in records] == ["modules should be kept in float32: ['norm']"]


def test_real_and_fake_share_base_weights(lora_models, prompt_file, tmp_path):
    m = lora_models
    plain = dmdr.random_teacher("tiny")[0]
    base = sum(p.numel() for p in plain.parameters())
    lora = sum(p.numel() for n, p in m.unet.named_parameters() if "lora_" in n)
    assert m.gen_unet is m.unet  # LoRA generator: a third adapter-free view would be a second copy
    assert storage_numel(m.unet, m.gen_unet) == base + lora  # one copy of the base weights, plus the adapters
    q = m.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q  # a peft LoRA layer holding both adapters
    dmdr.use_adapter(m.unet, "fake")
    assert set(q.lora_A) == {"fake", "generator"} and q.scaling["fake"] == 2.0 and q.lora_A["fake"].out_features == 32
    dmdr.use_adapter(m.unet, "fake", 0.3)
    assert q.scaling["fake"] == pytest.approx(0.6) and q.active_adapters == ["fake"]  # DynaDG: lambda x alpha / r
    # Functional: give the fake LoRA weights; the real score (adapters off) is still exactly the plain teacher,
    # the fake score differs, and DynaDG at the fake's own LoRA scale (2.0) with guidance 1 is exactly the fake
    # score; with guidance 1.75, CFG over the fake LoRA's two branches (E10, as the official code's lora_scale).
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if ".fake." in n and "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([700, 300])
    emb = dmdr.encode_prompts(m, PROMPTS[:2])
    with torch.no_grad():
        real = dmdr.real_x0(m, x, t, emb, m.uncond, 1.75, 0.0)
        both = torch.cat([m.uncond.expand_as(emb), emb])
        eps_u, eps_c = plain(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=both).sample.chunk(2)
        teacher = dmdr.x0_from_eps(x, eps_u + 1.75 * (eps_c - eps_u), m.alphas_cumprod[t])
        fake = dmdr.fake_x0(m, x, t, emb)
        mixed = dmdr.real_x0(m, x, t, emb, m.uncond, 1.0, 2.0)
        half = dmdr.real_x0(m, x, t, emb, m.uncond, 1.0, 1.0)
        guided = dmdr.real_x0(m, x, t, emb, m.uncond, 1.75, 2.0)
        fake_u, fake_c = dmdr.fake_x0(m, x, t, m.uncond.expand_as(emb)), fake
        dmdr.real_x0(m, x, t, emb, m.uncond, 1.75, 0.75)
    assert q.scaling["fake"] == pytest.approx(0.75)  # the official demo's lambda_0, applied as the LoRA's scale
    assert torch.allclose(guided, fake_u + 1.75 * (fake_c - fake_u), rtol=1e-4, atol=1e-4)
    assert torch.allclose(real, teacher, atol=1e-5)
    assert (fake - dmdr.real_x0(m, x, t, emb, m.uncond, 1.0, 0.0)).abs().max() > 1e-3
    # equal up to float32 rounding: the CFG call runs at batch 2B, not B, eps_u + 1 (eps_c - eps_u) is not eps_c
    # bit for bit, and x0 at t = 700 scales eps's error by 1/sqrt(abar) ~ 3 (measured 4e-6 on |x0| up to 15)
    assert torch.allclose(mixed, fake, rtol=1e-5, atol=1e-5)
    rng = torch.get_rng_state()  # evaluation's teacher sampler leaves the training RNG alone (exact resume)
    ddim = dmdr.teacher_sample(m, x, emb, m.uncond, 3, 7.5)
    assert torch.equal(rng, torch.get_rng_state()) and torch.isfinite(ddim).all()
    assert 0 < (half - fake).abs().max() and (half - fake).abs().max() < (real - fake).abs().max() + 1
    # A full generator is the one unavoidable second copy: disjoint storage, nothing else duplicated.
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "refl"))
    full = dmdr.build_models(cfg, torch.device("cpu"))
    fake_lora = sum(p.numel() for n, p in full.unet.named_parameters() if "lora_" in n)
    assert storage_numel(full.unet, full.gen_unet) == 2 * base + fake_lora


ADAPTER_STATES = [None, ("fake", 1.0), ("fake", 0.3), ("fake", 0.0), ("generator", 1.0)]


def adapter_view(unet):
    """What a switch decides: per LoRA layer the off flag, active adapters and scales; which weights train."""
    layers = [(mod.disable_adapters, tuple(mod.active_adapters), dict(mod.scaling))
              for mod in unet.modules() if hasattr(mod, "scaling")]
    return layers, [n for n, p in unet.named_parameters() if p.requires_grad]


@settings(max_examples=25, deadline=None)
@given(seq=st.lists(st.sampled_from(ADAPTER_STATES), min_size=1, max_size=6))
def test_use_adapter_switches_only_on_a_change_to_what_a_full_switch_gives(lora_models, seq):
    """use_adapter skips diffusers' switch (a walk over every module) when the UNet is already in the asked state:
    after each call the UNet is exactly as after diffusers' own disable / enable + set_adapters, and diffusers is
    called once per change of state, not once per call."""
    unet, switches = lora_models.unet, []
    def counted(name, real):
        return lambda *args, **kwargs: switches.append(name) or real(*args, **kwargs)
    for name in ("disable_adapters", "set_adapters"):  # instance attributes shadow the class's, removed below
        setattr(unet, name, counted(name, getattr(unet, name)))
    try:
        unet.__dict__.pop("_adapter_state", None)  # from an unknown state: the first call always switches
        changes, last = 0, "unknown"
        for name, scale in (s or (None, 1.0) for s in seq):
            dmdr.use_adapter(unet, name, scale)
            state = None if name is None or scale == 0 else (name, scale)
            changes, last = changes + (state != last), state
            view = adapter_view(unet)
            if state is None:
                type(unet).disable_adapters(unet)
            else:
                type(unet).enable_adapters(unet)
                type(unet).set_adapters(unet, [name], weights=[scale])
            assert adapter_view(unet) == view
        assert len(switches) == changes
    finally:
        del unet.disable_adapters, unet.set_adapters
        unet.__dict__.pop("_adapter_state", None)  # the full switches above went around use_adapter


def test_use_adapter_after_a_switch_that_failed_switches_again(lora_models, monkeypatch):
    """A switch interrupted inside diffusers (Ctrl-C) leaves the UNet in no known state: the next call switches,
    even to the state the UNet was in before."""
    unet, calls = lora_models.unet, []
    dmdr.use_adapter(unet, "generator")
    real = type(unet).set_adapters

    def interrupted(self, *args, **kwargs):
        calls.append(args)
        raise KeyboardInterrupt
    monkeypatch.setattr(type(unet), "set_adapters", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dmdr.use_adapter(unet, "fake")
    monkeypatch.setattr(type(unet), "set_adapters", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    dmdr.use_adapter(unet, "generator")
    assert calls == [(["fake"],), (["generator"],)]


def test_the_dynadg_scale_reaches_the_real_score(prompt_file, tmp_path, monkeypatch):
    """E10 in the loop: each generator update's real score runs at the (logged) DynaDG scale of its step."""
    seen, real = [], dmdr.real_x0

    def spy(m, x_t, t, emb, uncond, guidance, dynadg=0.0):
        seen.append(dynadg)
        return real(m, x_t, t, emb, uncond, guidance, dynadg)
    monkeypatch.setattr(dmdr, "real_x0", spy)
    dmdr.main(tiny_args(prompt_file, tmp_path, "none", 2, "--dynadg-steps", "4", "--eval-every", "1000"))
    assert seen == [pytest.approx(dmdr.dynadg_scale(s, 0.75, 4)) for s in range(2)] and seen[1] < seen[0]


def test_the_fake_score_learns_every_generator_step_at_dynars_times(prompt_file, tmp_path, monkeypatch):
    """E9 (DMD2): the fake score trains on backward simulation's x0 at every grid step, not only the last one;
    E11: its renoise times follow DynaRS (Beta(4, 1.5) at step 0: mean t ~ 20 + 960 * 4 / 5.5 ~ 718, not 500)."""
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "none", 1, "--steps", "2", "--fake-updates", "64",
                                    "--generator", "lora"))
    m = dmdr.build_models(cfg, torch.device("cpu"))
    ts, ks = [], []
    draw, simulate = dmdr.sample_renoise_timesteps, dmdr.backward_simulation
    monkeypatch.setattr(dmdr, "sample_renoise_timesteps", lambda *a, **kw: ts.append(draw(*a, **kw)) or ts[-1])
    monkeypatch.setattr(dmdr, "backward_simulation", lambda m_, z, emb, k: ks.append(k) or simulate(m_, z, emb, k))
    torch.manual_seed(0)
    dmdr.fake_updates(m, cfg, torch.optim.AdamW(dmdr.lora_params(m.unet, "fake"), lr=0.0), 0, PROMPTS)
    assert torch.cat(ts).float().mean().item() == pytest.approx(20 + 960 * 4 / 5.5, abs=40)
    assert set(torch.cat(ks).tolist()) == {0, 1}


def test_each_fake_update_trains_on_its_own_slice_of_the_samples(lora_models, prompt_file, tmp_path, monkeypatch):
    """One backward simulation draws the samples of all --fake-updates; update i trains on slice i of them and of
    the prompt embeddings they were generated with (E9's loss is conditional on the sample's own prompt), so no
    two updates see the same samples (the runs above use --fake-updates 1)."""
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "none", 1, "--fake-updates", "3"))
    sims, seen = [], []
    simulate, loss = dmdr.backward_simulation, dmdr.fake_score_loss

    def simulation(m, z, emb, k):
        sims.append((simulate(m, z, emb, k), emb))
        return sims[-1][0]
    monkeypatch.setattr(dmdr, "backward_simulation", simulation)
    monkeypatch.setattr(dmdr, "fake_score_loss", lambda m, x0, emb, *a: seen.append((x0.clone(), emb.clone()))
                        or loss(m, x0, emb, *a))
    torch.manual_seed(0)
    dmdr.fake_updates(lora_models, cfg, torch.optim.AdamW(dmdr.lora_params(lora_models.unet, "fake"), lr=0.0), 0,
                      PROMPTS[:4])
    assert len(sims) == 1 and len(seen) == 3
    samples, embeddings = sims[0]
    assert any(not torch.equal(part, embeddings.chunk(3)[0]) for part in embeddings.chunk(3)[1:])  # prompts differ
    for (x0, emb), sample_part, emb_part in zip(seen, samples.chunk(3), embeddings.chunk(3)):
        assert torch.equal(x0, sample_part) and torch.equal(emb, emb_part)


@pytest.mark.parametrize("dynars", [True, False])
def test_no_dynars_gives_uniform_renoise_times_to_the_generator_and_the_fake(lora_models, prompt_file, tmp_path,
                                                                             monkeypatch, dynars):
    """--no-dynars (the paper's ablation) turns DynaRS off for the generator's DMD renoise and the fake score's
    alike; the logged dynars_mean alone does not show that."""
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "none", 1, "--dynars" if dynars else "--no-dynars"))
    calls, draw = [], dmdr.sample_renoise_timesteps
    monkeypatch.setattr(dmdr, "sample_renoise_timesteps",
                        lambda *a, **kw: calls.append(kw["dynamic"]) or draw(*a, **kw))
    torch.manual_seed(0)
    m = lora_models
    dmdr.generator_update(m, cfg, torch.optim.AdamW(list(dmdr.generator_params(m).values()), lr=0.0), 0,
                          PROMPTS[:2])
    dmdr.fake_updates(m, cfg, torch.optim.AdamW(dmdr.lora_params(m.unet, "fake"), lr=0.0), 0, PROMPTS[:4])
    assert calls == [dynars, dynars]


def test_dynars_reaches_uniform_renoise_times_at_its_horizon_for_generator_and_fake(prompt_file, tmp_path,
                                                                                    monkeypatch):
    """E11's Beta(a(s), b(s)) is Beta(1, 1) from s = S on, so at step S the renoise times of the
    generator's DMD loss and of the fake's loss are uniform on [20, 980] (mean 500), not Beta(4, 1.5) (mean
    20 + 960 * 4 / 5.5 ~ 718) as at step 0. 128 draws each (the fake's in 2 updates of 64): s.e. of the mean
    ~ 25 (uniform) and ~ 15 (Beta(4, 1.5)), so the +-80 band is 3.3 s.e. wide for the right law and 9 s.e. short
    of the wrong one (measured, seed 0: 509 and 482)."""
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "none", 1, "--fake-updates", "2", "--batch-size", "64",
                                    "--dynars-steps", "4"))
    m = dmdr.build_models(cfg, torch.device("cpu"))
    m.uncond = dmdr.encode_prompts(m, [""])
    ts, draw = [], dmdr.sample_renoise_timesteps
    monkeypatch.setattr(dmdr, "sample_renoise_timesteps", lambda *a, **kw: ts.append(draw(*a, **kw)) or ts[-1])
    torch.manual_seed(0)
    dmdr.generator_update(m, cfg, torch.optim.AdamW(list(dmdr.generator_params(m).values()), lr=0.0), 4,
                          PROMPTS[:4] * 32)
    generator_t = torch.cat(ts).float()
    ts.clear()
    dmdr.fake_updates(m, cfg, torch.optim.AdamW(dmdr.lora_params(m.unet, "fake"), lr=0.0), 4, PROMPTS[:4])
    fake_t = torch.cat(ts).float()
    assert len(generator_t) == 128 and len(fake_t) == 128
    assert generator_t.mean().item() == pytest.approx(500, abs=80)
    assert fake_t.mean().item() == pytest.approx(500, abs=80)


def test_the_generator_update_trains_every_step_of_the_grid(lora_models, prompt_file, tmp_path, monkeypatch):
    """DMD2's backward simulation draws the trained step k uniformly from all K steps, the last one (the
    output a user gets) included; 24 updates at K = 2 miss a step with probability 2^-23."""
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "none", 1))
    ks, simulate = [], dmdr.backward_simulation
    monkeypatch.setattr(dmdr, "backward_simulation", lambda m_, z, emb, k: ks.append(k) or simulate(m_, z, emb, k))
    m = lora_models
    opt = torch.optim.AdamW(list(dmdr.generator_params(m).values()), lr=0.0)
    torch.manual_seed(0)
    for _ in range(24):
        dmdr.generator_update(m, cfg, opt, 0, PROMPTS[:1])
    assert {int(k[0]) for k in ks} == set(range(len(m.timesteps)))
    assert all(len(set(k.tolist())) == 1 for k in ks)  # one k per batch (DMD2)


def test_the_dmd_renoise_uses_fresh_noise_not_the_generators_input(lora_models, prompt_file, tmp_path,
                                                                   monkeypatch):
    """E8 renoises the generator's x0 with fresh Gaussian noise; reusing the generator's input z would tie
    x_t to x0 (x0 is a function of z) and bias the score difference."""
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "none", 1))
    zs, noises = [], []
    simulate, add = dmdr.backward_simulation, dmdr.add_noise
    monkeypatch.setattr(dmdr, "backward_simulation", lambda m_, z, emb, k: zs.append(z) or simulate(m_, z, emb, k))
    monkeypatch.setattr(dmdr, "add_noise", lambda x0, noise, abar: noises.append(noise) or add(x0, noise, abar))
    m = lora_models
    torch.manual_seed(0)
    dmdr.generator_update(m, cfg, torch.optim.AdamW(list(dmdr.generator_params(m).values()), lr=0.0), 0,
                          PROMPTS[:2])
    renoise = noises[-1]  # the last add_noise of the update: backward simulation's come before it
    assert renoise.shape == zs[0].shape
    assert (renoise - zs[0]).abs().max() > 0.1


def test_saved_lcm_scheduler_passes_the_generators_x0_through_at_every_supported_k(tmp_path):
    """D19: the saved LCMScheduler must make denoised = c_out * x0_pred + c_skip * x_t equal x0_pred, i.e.
    c_skip ~ 0 and c_out ~ 1 at every timestep of every K-step trailing grid (timestep_scaling large). With
    diffusers' default timestep_scaling=10, c_skip(999) = 0.25 / 9990^2 = 2.5e-9 and it grows to 7e-6 at K=50:
    a stock pipeline would then no longer be the generator's own sampler. (Samples of the tiny test teacher at
    K=2 cannot show a 1e-8 drift, so the config is checked in closed form.)"""
    from diffusers import LCMScheduler
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    cfg = dmdr.parse_args(["--teacher", "tiny", "--device", "cpu", "--prompts", str(prompts), "--steps", "2",
                           "--generator", "lora", "--out", str(tmp_path / "run")])
    m = dmdr.build_models(cfg, torch.device("cpu"))
    dmdr.save_generator(m, cfg, tmp_path / "generator")
    sched = LCMScheduler.from_pretrained(tmp_path / "generator", subfolder="scheduler")
    for k in (1, 2, 4, 8, 50):
        sched.set_timesteps(k)
        assert sched.timesteps.tolist() == dmdr.trailing_timesteps(k).tolist()
        for t in sched.timesteps.tolist():
            c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
            assert float(c_skip) < 1e-12 and abs(float(c_out) - 1) < 1e-12, (k, t, c_skip, c_out)


def test_a_save_over_the_leftovers_of_a_crashed_save_replaces_them(lora_models, prompt_file, tmp_path):
    """A crash between save_generator's last rename and its clean-up leaves generator/ and generator.old/ both
    whole; the next save must still swap in the new generator (os.replace cannot rename onto a full folder)."""
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path / "run", "none"))
    for stale in (tmp_path / "generator", tmp_path / "generator.old"):
        stale.mkdir()
        (stale / "stale.txt").write_text("an earlier save")
    dmdr.save_generator(lora_models, cfg, tmp_path / "generator")
    assert [p.name for p in tmp_path.iterdir()] == ["generator"]  # no .old, no .tmp
    assert (tmp_path / "generator" / "model_index.json").exists()
    assert not (tmp_path / "generator" / "stale.txt").exists()


def test_the_fake_step_applies_the_clipped_gradient(tmp_path):
    """D17: as for the generator (test_the_generator_step_applies_the_clipped_gradient), the fake score's AdamW
    must be handed a gradient of norm <= --max-grad-norm (AdamW is scale-invariant: only the gradient shows it)."""
    prompts = ["a cat", "a dog", "a bird", "a tree"]
    path = tmp_path / "p.txt"
    path.write_text("\n".join(prompts) + "\n")
    cfg = dmdr.parse_args(["--teacher", "tiny", "--device", "cpu", "--prompts", str(path), "--steps", "2",
                           "--generator", "lora", "--batch-size", "2", "--fake-updates", "2",
                           "--max-grad-norm", "1e-7", "--out", str(tmp_path / "run")])
    m = dmdr.build_models(cfg, torch.device("cpu"))
    opt_f = torch.optim.AdamW(dmdr.lora_params(m.unet, "fake"), lr=0.0)
    norms = []
    opt_f.register_step_pre_hook(lambda opt, args, kwargs: norms.append(torch.cat(
        [p.grad.flatten() for p in opt.param_groups[0]["params"] if p.grad is not None]).norm().item()))
    torch.manual_seed(0)
    dmdr.fake_updates(m, cfg, opt_f, 0, prompts)
    assert len(norms) == 2 and all(0 < n <= 1e-7 * (1 + 1e-4) for n in norms), norms


@pytest.mark.parametrize("flag, old, new", [("--steps", "2", "4"), ("--rl", "none", "dpo"),
                                            ("--batch-size", "2", "3"), ("--seed", "3", "4")])
def test_resume_refuses_a_setting_that_shapes_training(flag, old, new, tmp_path):
    """D28: a --resume that changes K, the RL branch, the batch or the seed is not the same run: refused in one
    line naming the setting (only RESUME_FREE settings may change)."""
    path = tmp_path / "p.txt"
    path.write_text("a cat\na dog\n")
    out = tmp_path / "run"
    out.mkdir()
    base = ["--teacher", "tiny", "--device", "cpu", "--prompts", str(path), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--seed", "3", "--rl", "none"]
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(dmdr.parse_args(base))))
    argv = ["--out", str(out), "--resume", flag, new]
    name = flag[2:].replace("-", "_")
    with pytest.raises(SystemExit, match=f"--resume with different settings: {name}"):
        dmdr.resume_config(dmdr.parse_args(argv), dmdr.given_flags(argv), out)
    same = ["--out", str(out), "--resume", flag, old]  # the run's own value is no change
    assert getattr(dmdr.resume_config(dmdr.parse_args(same), dmdr.given_flags(same), out), name) == \
        type(getattr(dmdr.parse_args(base), name))(old)


def test_backward_simulation_per_sample_k_shares_unet_calls(prompt_file, tmp_path):
    """Backward simulation with a k per sample: row i is what a batch whose every k is k_i gives (same seed),
    and that is the plain rollout of k_i steps then step k_i's x0; the samples still running share one UNet call
    per step (K calls for the stack, fewer images as samples stop); under grad with one k for the batch, only
    the last call takes grad."""
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "none", 1, "--steps", "4"))
    m = dmdr.build_models(cfg, torch.device("cpu"))
    calls = []
    m.unet.register_forward_hook(lambda mod, args, out: calls.append((args[0].shape[0], torch.is_grad_enabled())))
    k = torch.tensor([3, 0, 2, 1, 3, 2])
    z = torch.randn(6, *dmdr.latent_shape(m), generator=torch.Generator().manual_seed(0))
    emb = dmdr.encode_prompts(m, [PROMPTS[i] for i in range(6)])
    with torch.no_grad():
        torch.manual_seed(5)
        stacked = dmdr.backward_simulation(m, z, emb, k)
        assert calls == [(6, False), (5, False), (4, False), (2, False)]
        for i in range(6):
            torch.manual_seed(5)
            alone = dmdr.backward_simulation(m, z, emb, k[i].expand(6))
            torch.manual_seed(5)
            rollout = dmdr.generator_rollout(m, z, emb, int(k[i]))
            plain = dmdr.generator_x0(m, rollout, m.timesteps[k[i]], emb)
            assert torch.allclose(stacked[i], alone[i], atol=1e-5) and torch.equal(alone, plain)
    calls.clear()
    x0 = dmdr.backward_simulation(m, z, emb, torch.full((6,), 2))
    assert calls == [(6, False), (6, False), (6, True)] and x0.requires_grad
    assert stacked[1].sub(x0[1]).abs().max() > 1e-3  # k changes the output: the comparison above has teeth


def test_refl_rewards_the_generators_k_step_output(prompt_file, tmp_path):
    """ReFL's reward is that of the image the generator returns (all K steps, as sample_generator and the saved
    pipeline compute it), not of backward simulation's x0 at a random step."""
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "refl", 1, "--steps", "4", "--generator", "lora"))
    m = dmdr.build_models(cfg, torch.device("cpu"))
    emb = dmdr.encode_prompts(m, PROMPTS[:3])
    torch.manual_seed(7)
    loss, r = dmdr.refl_loss(m, cfg, emb, PROMPTS[:3])
    torch.manual_seed(7)
    z = torch.randn(3, *dmdr.latent_shape(m))
    with torch.no_grad():
        final = dmdr.reward_fn(m, cfg, dmdr.decode(m, dmdr.sample_generator(m, z, emb)), PROMPTS[:3])
        first = dmdr.reward_fn(m, cfg, dmdr.decode(m, dmdr.generator_x0(m, z, m.timesteps[0], emb)), PROMPTS[:3])
    torch.testing.assert_close(r, final)
    assert loss.item() == pytest.approx(-final.mean().item(), rel=1e-5) and loss.requires_grad
    assert (first - final).abs().max() > 1e-4  # the one-step estimate scores differently: the check has teeth


@contextlib.contextmanager
def generator_restored(m):
    """-> the generator LoRA's parameters; afterwards they and DPO's reference are as before (the fixture is shared)."""
    params = dmdr.lora_params(m.unet, "generator")
    saved = [p.detach().clone() for p in params]
    try:
        yield params
    finally:
        m.dpo_ref = None
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)


@torch.no_grad()
def nudge(params, salt=0):
    """Move the generator LoRA by a fixed random step (its B starts at 0: the generator starts as the teacher)."""
    for p in params:
        p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + salt)))


def test_dpo_reference_is_the_generator_as_rl_started(lora_models):
    """DPO's reference is the generator's weights when RL starts (snapshotted, swapped in by pointer), not the
    teacher: right after the snapshot the Diffusion-DPO loss is exactly -log sigmoid(0) = log 2; later the
    reference still gives the snapshot's epsilon while the generator has moved on."""
    m = lora_models
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([749, 249])
    emb = dmdr.encode_prompts(m, PROMPTS[:2])
    cfg = dataclasses.replace(dmdr.parse_args(["--teacher", "tiny"]), reward_weights="random")
    with generator_restored(m) as params, torch.no_grad():
        nudge(params)  # a generator away from the teacher
        m.dpo_ref = dmdr.snapshot_generator(m)
        eps_start = dmdr.generator_eps(m, x, t, emb)
        assert dmdr.dpo_loss(m, cfg, emb, PROMPTS[:2])[0].item() == pytest.approx(math.log(2), abs=1e-6)
        nudge(params, salt=1)
        eps_now = dmdr.generator_eps(m, x, t, emb)
        assert abs(dmdr.dpo_loss(m, cfg, emb, PROMPTS[:2])[0].item() - math.log(2)) > 1e-6
        with dmdr.dpo_reference(m):
            eps_ref = dmdr.generator_eps(m, x, t, emb)
        torch.testing.assert_close(eps_ref, eps_start)
        assert (eps_now - eps_start).abs().max() > 1e-3
        torch.testing.assert_close(dmdr.generator_eps(m, x, t, emb), eps_now)  # swapped back
        dmdr.use_adapter(m.unet, None)
        assert (dmdr.unet_eps(m, m.unet, x, t, emb) - eps_start).abs().max() > 1e-3  # the teacher is not it


def test_dpo_loss_ranks_by_reward_and_is_diffusion_dpo_by_hand(lora_models, monkeypatch):
    """Winners (higher reward of each prompt's two samples) go first, and the loss is Diffusion-DPO's
    -log sigmoid(-beta/2 [(err_w - err_w_ref) - (err_l - err_l_ref)]), recomputed from the recorded epsilons."""
    m = lora_models
    cfg = dataclasses.replace(dmdr.parse_args(["--teacher", "tiny"]), reward_weights="random")
    emb = dmdr.encode_prompts(m, PROMPTS[:2])
    rewards = torch.tensor([0.9, 0.1, 0.2, 0.8])  # prompt 0: sample 0 wins over 2; prompt 1: sample 3 over 1
    seen, eps = {}, []
    real_sample, real_add, real_eps = dmdr.sample_generator, dmdr.add_noise, dmdr.generator_eps

    def add_noise(x0, noise, abar):
        seen["pair"], seen["noise"] = x0, noise
        return real_add(x0, noise, abar)
    monkeypatch.setattr(dmdr, "reward_fn", lambda *args: rewards)
    monkeypatch.setattr(dmdr, "sample_generator", lambda *a, **k: seen.setdefault("x0", real_sample(*a, **k)))
    monkeypatch.setattr(dmdr, "add_noise", add_noise)
    monkeypatch.setattr(dmdr, "generator_eps", lambda *args: eps.append(real_eps(*args)) or eps[-1])
    with generator_restored(m) as params, torch.no_grad():
        nudge(params)  # reference and generator apart, so that the losses differ from log 2
        m.dpo_ref = dmdr.snapshot_generator(m)
        nudge(params, salt=1)
        loss = dmdr.dpo_loss(m, cfg, emb, PROMPTS[:2])[0]
    x0, pair, noise = seen["x0"], seen["pair"], seen["noise"]
    assert torch.equal(pair[:2], x0[[0, 3]]) and torch.equal(pair[2:], x0[[2, 1]])
    err_ref, err = (((e - noise) ** 2).mean((1, 2, 3)) for e in eps[-2:])
    diff = (err[:2] - err_ref[:2]) - (err[2:] - err_ref[2:])
    assert diff.abs().max() > 1e-6
    assert loss.item() == pytest.approx(-F.logsigmoid(-0.5 * cfg.dpo_beta * diff).mean().item(), rel=1e-5)


def test_grpo_loss_uses_group_normalised_advantages(lora_models, monkeypatch):
    """E4 inside grpo_loss: the advantages handed to the surrogate are toy/'s within-group normalisation of the
    rewards (B=2 prompts x G=3). The loss value cannot show it: with ratio 1 it is -mean(A) = 0 for any A."""
    m = lora_models
    cfg = dataclasses.replace(dmdr.parse_args(["--teacher", "tiny"]), reward_weights="random", grpo_group=3)
    emb = dmdr.encode_prompts(m, PROMPTS[:2])
    rewards, seen, real = torch.tensor([0.1, 0.5, 0.3, 2.0, 1.0, 4.0]), [], dmdr.clipped_surrogate
    monkeypatch.setattr(dmdr, "reward_fn", lambda *args: rewards)
    monkeypatch.setattr(dmdr, "clipped_surrogate", lambda lp, old, adv, c: seen.append(adv) or real(lp, old, adv, c))
    dmdr.grpo_loss(m, cfg, emb, PROMPTS[:2])
    torch.testing.assert_close(seen[0], toy_redif.grpo_advantages(rewards.view(2, 3)).view(-1))


def test_the_grpo_step_explores_at_grpo_eta(lora_models, monkeypatch):
    """E1: the policy's std is eta x DDIM's sigma, so --grpo-eta 0.25 gives a quarter of eta 1's std."""
    m, stds, step = lora_models, {}, dmdr.ddim_step_with_logprob
    monkeypatch.setattr(dmdr, "reward_fn", lambda *args: torch.tensor([0.1, 0.5, 0.3, 2.0]))
    for eta in (1.0, 0.25):
        def spy(*args, eta_in_force=eta, **kwargs):  # the std of the step GRPO takes at this --grpo-eta
            out = step(*args, **kwargs)
            stds[eta_in_force] = out[3]
            return out
        monkeypatch.setattr(dmdr, "ddim_step_with_logprob", spy)
        cfg = dataclasses.replace(dmdr.parse_args(["--teacher", "tiny"]), grpo_group=2, grpo_eta=eta)
        dmdr.grpo_loss(m, cfg, dmdr.encode_prompts(m, PROMPTS[:2]), PROMPTS[:2])
    assert stds[1.0].max() > 0
    torch.testing.assert_close(stds[0.25], 0.25 * stds[1.0])


@pytest.fixture(scope="module")
def four_step_lora_models(prompt_file, tmp_path_factory):
    """A K=4 LoRA generator whose LoRA is away from 0, so the generator is not the teacher."""
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path_factory.mktemp("m4"), "none", 2, "--steps", "4"))
    m = dmdr.build_models(cfg, torch.device("cpu"))
    m.uncond = dmdr.encode_prompts(m, [""])
    with torch.no_grad():
        for p in dmdr.generator_params(m).values():
            p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return m


def test_the_grpo_step_samples_each_group_around_its_own_state(four_step_lora_models, monkeypatch):
    """GRPO's stochastic last step (E1) draws episode i of group b from N(mu(x_b, eps_b), sigma^2): the state
    handed to the DDIM step is row b of the rollout's states, the same row as its epsilon, for all G episodes. The
    policy's mean, hence each sample and its reward, is then that of its own prompt; checked against the rollout."""
    m = four_step_lora_models
    cfg = dataclasses.replace(dmdr.parse_args(["--teacher", "tiny"]), reward_weights="random", grpo_group=3)
    prompts = PROMPTS[:2]
    emb = dmdr.encode_prompts(m, prompts)
    seen, rollout, step = {}, dmdr.generator_rollout, dmdr.ddim_step_with_logprob
    monkeypatch.setattr(dmdr, "generator_rollout", lambda *a, **k: seen.setdefault("x", rollout(*a, **k)))

    def ddim(eps, t, t_prev, sample, ac, **kw):
        out = step(eps, t, t_prev, sample, ac, **kw)
        seen.update(eps=eps.detach(), state=sample, mean=out[2].detach(), std=out[3], action=out[0].detach())
        return out
    monkeypatch.setattr(dmdr, "ddim_step_with_logprob", ddim)
    monkeypatch.setattr(dmdr, "reward_fn", lambda m_, cfg_, images, p: seen.setdefault("prompts", p) and
                        torch.arange(len(p), dtype=torch.float))
    dmdr.grpo_loss(m, cfg, emb, prompts)
    x, K = seen["x"], len(m.timesteps)
    with torch.no_grad():
        eps = dmdr.generator_eps(m, x, m.timesteps[K - 1], emb)
    assert torch.equal(seen["state"], x.repeat_interleave(3, 0))
    torch.testing.assert_close(seen["eps"], eps.repeat_interleave(3, 0))
    abar = m.alphas_cumprod
    x0 = (x - (1 - abar[m.timesteps[K - 1]]).sqrt() * eps) / abar[m.timesteps[K - 1]].sqrt()
    torch.testing.assert_close(seen["mean"], (abar[0].sqrt() * x0 + (1 - abar[0] - seen["std"] ** 2).clamp(min=0)
                                              .sqrt() * eps).repeat_interleave(3, 0), rtol=1e-4, atol=1e-5)
    assert seen["prompts"] == [p for p in prompts for _ in range(3)]


def test_the_dpo_pair_is_noised_with_one_noise_at_one_timestep(four_step_lora_models, monkeypatch):
    """Diffusion-DPO compares winner and loser at the SAME (t, noise): x_t^w - x_t^l = sqrt(abar_t) (x_w - x_l)
    exactly, with t the timestep the UNet is given for both rows (B=4 prompts, K=4 grid)."""
    m = four_step_lora_models
    cfg = dataclasses.replace(dmdr.parse_args(["--teacher", "tiny"]), reward_weights="random")
    prompts = PROMPTS[:4]
    emb = dmdr.encode_prompts(m, prompts)
    seen, calls, sample, eps = {}, [], dmdr.sample_generator, dmdr.generator_eps
    monkeypatch.setattr(dmdr, "reward_fn", lambda *a: torch.tensor([0.9, 0.1, 0.2, 0.8, 0.5, 0.6, 0.7, 0.3]))
    monkeypatch.setattr(dmdr, "sample_generator", lambda *a, **k: seen.setdefault("x0", sample(*a, **k)))
    monkeypatch.setattr(dmdr, "generator_eps", lambda m_, x, t, e: calls.append((x.detach(), t)) or eps(m_, x, t, e))
    m.dpo_ref = dmdr.snapshot_generator(m)
    torch.manual_seed(1)
    dmdr.dpo_loss(m, cfg, emb, prompts)
    m.dpo_ref = None
    x0 = seen["x0"]
    win = torch.tensor([0.9, 0.1, 0.2, 0.8]) >= torch.tensor([0.5, 0.6, 0.7, 0.3])
    x_w = torch.where(win.view(4, 1, 1, 1), x0[:4], x0[4:])
    x_l = torch.where(win.view(4, 1, 1, 1), x0[4:], x0[:4])
    (x_t, t2), (x_t2, _) = calls[-2], calls[-1]
    assert torch.equal(x_t, x_t2) and torch.equal(t2[:4], t2[4:])
    assert t2[:4].unique().numel() > 1 and not torch.equal(t2[:4], t2[:4].flip(0))  # the check has teeth
    abar = m.alphas_cumprod[t2[:4]].view(4, 1, 1, 1)
    torch.testing.assert_close(x_t[:4] - x_t[4:], abar.sqrt() * (x_w - x_l), rtol=1e-4, atol=1e-5)


def test_the_generator_step_applies_the_clipped_gradient(lora_models):
    """AdamW is scale-invariant, so only the gradient it is handed shows --max-grad-norm: norm <= the limit."""
    m = lora_models
    opt_g = torch.optim.AdamW(list(dmdr.generator_params(m).values()), lr=0.0)
    norms = []
    opt_g.register_step_pre_hook(lambda opt, args, kwargs: norms.append(torch.cat(
        [p.grad.flatten() for p in opt.param_groups[0]["params"] if p.grad is not None]).norm().item()))
    cfg = dataclasses.replace(dmdr.parse_args(["--teacher", "tiny"]), rl="none", max_grad_norm=1e-7, batch_size=2)
    torch.manual_seed(0)
    dmdr.generator_update(m, cfg, opt_g, 0, PROMPTS[:2])
    opt_g.zero_grad(set_to_none=True)
    assert len(norms) == 1 and 0 < norms[0] <= 1e-7 * (1 + 1e-4)


def test_grpo_runs_one_unet_call_per_group_with_the_gradient_of_the_whole_group(lora_models, monkeypatch):
    """The G episodes of a group share state and prompt, so the policy's mean is computed once per prompt: B
    images through the generator with grad, not B*G, and the same loss and gradient as the B*G batch holding G
    copies of each state (B=2, G=3, K=2)."""
    m = lora_models
    cfg = dataclasses.replace(dmdr.parse_args(["--teacher", "tiny"]), reward_weights="random", grpo_group=3)
    emb, rewards = dmdr.encode_prompts(m, PROMPTS[:2]), torch.tensor([0.1, 0.5, 0.3, 2.0, 1.0, 4.0])
    monkeypatch.setattr(dmdr, "reward_fn", lambda *args: rewards)
    params = list(dmdr.generator_params(m).values())
    calls = []
    hook = m.unet.register_forward_hook(lambda mod, args, out: calls.append((len(args[0]), torch.is_grad_enabled())))
    torch.manual_seed(5)
    loss, _ = dmdr.grpo_loss(m, cfg, emb, PROMPTS[:2])
    hook.remove()
    grads = torch.autograd.grad(loss, params)
    assert calls == [(2, False), (2, True)]  # the first step from z without grad, then the last step's mean

    torch.manual_seed(5)  # the B*G batch, by hand, on the same random draws
    z = torch.randn(2, *dmdr.latent_shape(m))
    with torch.no_grad():
        x = dmdr.generator_rollout(m, z, emb, 1).repeat_interleave(3, 0)
    t = m.timesteps[1]
    eps = dmdr.generator_eps(m, x, t, emb.repeat_interleave(3, 0))
    _, log_prob, _, _ = dmdr.ddim_step_with_logprob(eps, t, -1, x, m.alphas_cumprod, eta=cfg.grpo_eta)
    adv = toy_redif.grpo_advantages(rewards.view(2, 3)).view(-1)
    ref = toy_redif.clipped_surrogate(log_prob, log_prob.detach(), adv, cfg.grpo_clip)
    ref_grads = torch.autograd.grad(ref, params)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-7)
    assert max(g.abs().max() for g in ref_grads) > 0
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-8)


def test_checkpoint_restores_the_rngs_of_the_gpu_in_use(lora_models, tmp_path, monkeypatch):
    """The global RNGs come back from a checkpoint; of CUDA's (faked here), the one of the GPU in use, so a run
    can resume where another number of GPUs is visible."""
    cuda_rng, restored = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_rng.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    m = lora_models
    opt_g, opt_f = (torch.optim.AdamW(dmdr.lora_params(m.unet, a)) for a in ("generator", "fake"))
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    dmdr.save_checkpoint(tmp_path / "c.pt", m, opt_g, opt_f, 3)
    torch.rand(10)
    assert dmdr.load_checkpoint(tmp_path / "c.pt", m, opt_g, opt_f) == 3
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(restored) == 1 and torch.equal(restored[0], cuda_rng)


def test_dpo_reference_is_snapshotted_once_and_round_trips(lora_models, prompt_file, tmp_path):
    """Two DPO iterations from RL step 0: the reference is the generator at step 0 (LoRA B = 0) while the
    generator has moved; and save/load of a checkpoint brings the reference back."""
    dmdr.main(tiny_args(prompt_file, tmp_path / "run", "dpo", 2, "--steps", "1"))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    ref_b = [v for k, v in ckpt["dpo_ref"].items() if "lora_B" in k]
    assert ref_b and all(v.abs().max() == 0 for v in ref_b)
    assert any(v.abs().max() > 0 for k, v in ckpt["generator"].items() if "lora_B" in k)
    m = lora_models
    opt_g, opt_f = (torch.optim.AdamW(dmdr.lora_params(m.unet, a)) for a in ("generator", "fake"))
    ref = {k: v + 1 for k, v in dmdr.snapshot_generator(m).items()}
    m.dpo_ref = {k: v.clone() for k, v in ref.items()}
    try:
        dmdr.save_checkpoint(tmp_path / "c.pt", m, opt_g, opt_f, 3)
        m.dpo_ref = None
        assert dmdr.load_checkpoint(tmp_path / "c.pt", m, opt_g, opt_f) == 3
        assert m.dpo_ref.keys() == ref.keys() and all(torch.equal(m.dpo_ref[k], v) for k, v in ref.items())
    finally:
        m.dpo_ref = None


# ---------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------
def gaussian_run(monkeypatch, prompt_file, tmp_path, rl, iters, *flags):
    """dmdr.py's models on the Gaussian teacher (tests/gaussian_teacher.py; K=1, DynaDG and DynaRS on with a
    100-step horizon) and its two optimisers as main builds them, and a train(start, stop) loop of dmdr's own
    updates -> cfg, models, train."""
    tiny = dmdr.load_teacher("tiny")
    monkeypatch.setattr(dmdr, "load_teacher", lambda name: (GaussianScoreUNet(), *tiny[1:]))
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, rl, iters, "--steps", "1", "--fake-lr", "1e-2",
                                    "--fake-updates", "5", "--batch-size", "4", "--dynadg-steps", "100",
                                    "--dynars-steps", "100", *flags))
    m = dmdr.build_models(cfg, torch.device("cpu"))
    m.uncond = dmdr.encode_prompts(m, [""])
    opt_g = torch.optim.AdamW(list(dmdr.generator_params(m).values()), lr=cfg.lr)
    opt_f = torch.optim.AdamW(dmdr.lora_params(m.unet, "fake"), lr=cfg.fake_lr)

    def train(start, stop, generator=True):
        for step in range(start, stop):
            if generator:
                dmdr.generator_update(m, cfg, opt_g, step, dmdr.pick_prompts(PROMPTS[:4], cfg.batch_size))
            dmdr.fake_updates(m, cfg, opt_f, step, PROMPTS[:4])
    return cfg, m, train


@pytest.mark.parametrize("generator, lr, iters", [("lora", "1e-3", 200), ("full", "2e-2", 250)])
def test_learning_dmd_moves_a_collapsed_generator_onto_the_data(generator, lr, iters, prompt_file, tmp_path,
                                                                  monkeypatch):
    """Seeded DMDR run on the Gaussian teacher, measured on a fixed probe (z, noise, t). The generator starts as
    the teacher: its one-step samples are collapsed onto the data mean. Warm-up: 20 rounds of fake updates on that
    generator, so the E9 loss falls and the DMD gradient (E8) appears. Then DMD spreads the generator onto
    N(data_mean, 0.25) (std 0.017 -> 0.5 +- 10%, mean within 0.05), the DMD gradient shrinks by over 10x, and the
    fake score follows: its epsilon stays close to the closed-form epsilon of the generator's current Gaussian.
    (The fake loss itself rises at the end, as the samples spread: its floor is the generator's own score's
    loss.) Checked over 6 seeds: every one converges. K=1: with K>1 the fake score learns the mixture of backward
    simulation's steps, which one Gaussian can only moment-match."""
    cfg, m, train = gaussian_run(monkeypatch, prompt_file, tmp_path, "none", iters, "--generator", generator,
                                 "--lr", lr)
    g = torch.Generator().manual_seed(1)
    z, noise = torch.randn(256, 4, 16, 16, generator=g), torch.randn(256, 4, 16, 16, generator=g)
    t = torch.randint(20, 980, (256,), generator=g)
    emb = dmdr.encode_prompts(m, PROMPTS[:1]).expand(256, -1, -1)
    data_mean = torch.tensor(m.unet.config.data_mean)

    @torch.no_grad()
    def probe():
        x0 = dmdr.sample_generator(m, z, emb)
        x_t = dmdr.add_noise(x0, noise, m.alphas_cumprod[t])
        dmd = dmdr.dmd_loss(x0, dmdr.real_x0(m, x_t, t, emb, m.uncond, cfg.real_guidance), dmdr.fake_x0(m, x_t, t, emb))
        mean, var = x0.mean((0, 2, 3)), x0.transpose(0, 1).reshape(4, -1).var(1).mean()
        dmdr.use_adapter(m.unet, "fake")
        fake_err = (dmdr.unet_eps(m, m.unet, x_t, t, emb) - gaussian_eps(x_t, m.alphas_cumprod[t], mean, var))
        return dict(fake_loss=dmdr.fake_score_loss(m, x0, emb, t, noise).item(), grad=math.sqrt(2 * dmd.item()),
                    mean=mean, std=var.sqrt().item(), fake_err=fake_err.pow(2).mean().sqrt().item())
    torch.manual_seed(0)
    start = probe()
    train(0, 20, generator=False)
    warm = probe()
    train(0, cfg.iters)
    end = probe()
    print({k: {n: v for n, v in d.items() if n != "mean"} for k, d in dict(start=start, warm=warm, end=end).items()})
    assert start["std"] < 0.02 and start["grad"] < 1e-6  # collapsed; the fake score is still the teacher
    assert warm["fake_loss"] < 0.1 * start["fake_loss"] and warm["grad"] > 1.0
    assert (end["mean"] - data_mean).abs().max() < 0.05 and abs(end["std"] - 0.5) < 0.05
    assert end["grad"] < 0.1 * warm["grad"]
    assert end["fake_err"] < 0.1 * start["fake_err"], (start["fake_err"], end["fake_err"])


def test_learning_refl_weight_trades_distance_to_the_data_for_reward(prompt_file, tmp_path, monkeypatch):
    """E12 on the Gaussian teacher: one seeded DMDR run (LoRA generator) per lambda_rl = 0, 10, 100, with ReFL on
    the clip_text reward (random CLIP on the tiny VAE's images) from iteration 50 of 100. On a fixed probe, the
    reward rises with lambda_rl (measured -0.001, 0.023, 0.055) and so does the drift of the generator's channel
    means from the data's (0.02, 0.23, 1.1); other seeds gave the same order by as wide margins. L_dmd holds the
    generator to the data distribution, and lambda_rl sets how far the reward may pull it away."""
    rewards, drifts = [], []
    for i, weight in enumerate([0, 10, 100]):
        rl = ["refl", "--rl-weight", str(weight), "--rl-start", "50"] if weight else ["none"]
        cfg, m, train = gaussian_run(monkeypatch, prompt_file, tmp_path / str(i), rl[0], 100, "--generator", "lora",
                                     "--lr", "1e-3", *rl[1:])
        torch.manual_seed(0)
        train(0, 20, generator=False)
        train(0, cfg.iters)
        z = torch.randn(32, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        prompts = [PROMPTS[j % 4] for j in range(32)]
        with torch.no_grad():
            x0 = dmdr.sample_generator(m, z, dmdr.encode_prompts(m, prompts))
            rewards.append(dmdr.reward_fn(m, cfg, dmdr.decode(m, x0), prompts).mean().item())
        drifts.append((x0.mean((0, 2, 3)) - torch.tensor(m.unet.config.data_mean)).abs().max().item())
    print(f"lambda_rl 0, 10, 100: reward {rewards}, drift of the mean {drifts}")
    assert rewards[0] + 0.01 < rewards[1] < rewards[2] - 0.01
    assert drifts[0] < 0.05 < drifts[1] < 0.5 < drifts[2]


# ---------------------------------------------------------------------------------------------------
# --profile
# ---------------------------------------------------------------------------------------------------
def test_profile_counts_evaluations_exactly(prompt_file, tmp_path, capsys):
    """--profile 2 with K=1 (backward simulation always k=0) and DPO: every UNet, VAE and reward evaluation
    (images) matches the closed form of one iteration; nothing is saved but the profile line."""
    b, r, n = 2, 1, 2
    dmdr.main(tiny_args(prompt_file, tmp_path, "dpo", 2, "--steps", "1", "--profile", str(n)))
    per_iter = {"generator fwd+bwd": b,  # x0 of the drawn step, with grad
                "generator fwd": r * b,  # the fake updates' backward simulation
                "real score fwd": 2 * b,  # CFG: unconditional + conditional rows
                "fake score fwd": b, "fake score fwd+bwd": r * b,  # DMD gradient (E8); fake-score training (E9)
                "rl fwd": 2 * b + 2 * b,  # DPO: 2 samples per prompt (K=1), the reference's error on both
                "rl fwd+bwd": 2 * b,  # the generator's error on both samples
                "vae decode fwd": 2 * b, "reward fwd": 2 * b}  # ranking the two samples
    row = read_metrics(tmp_path)[-1]
    assert row["phase"] == "profile" and row["iters"] == n and row["peak_gib"] is None
    assert row["evals"] == {k: n * v for k, v in per_iter.items()}
    assert row["sec_generator"] + row["sec_fake"] + row["sec_rl"] + row["sec_other"] == pytest.approx(row["wall_s"])
    assert row["floor_s"] > 0 and row["wall_over_floor"] == pytest.approx(row["wall_s"] / row["floor_s"])
    table = capsys.readouterr().out
    assert all(f"| {p} |" in table for p in ("generator", "fake", "rl", "other", "wall"))
    assert "n/a (cpu)" in table and all(f"| {k} | {n * v} |" in table for k, v in per_iter.items())
    assert sorted(os.listdir(tmp_path)) == [".lock", "config.json", "metrics.jsonl", "prompts.txt"]  # no checkpoint


def test_local_diffusers_folder_loads_as_the_teacher(tmp_path):
    """The users' path (--teacher FOLDER, StableDiffusionPipeline.from_pretrained), on a tiny pipeline saved offline."""
    from diffusers import StableDiffusionPipeline
    unet, vae, text_encoder, tokenizer = dmdr.load_teacher("tiny")
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=dmdr.sd_scheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "teacher")
    loaded = dmdr.load_teacher(str(tmp_path / "teacher"))
    ours, saved = loaded[0].state_dict(), unet.state_dict()
    assert set(ours) == set(saved) and all(torch.equal(ours[k], saved[k]) for k in saved)
    assert loaded[3]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_sd15_alias_loads_the_hub_id_through_the_hub_cache(sd15_hub_cache):
    """--teacher sd15 -> stable-diffusion-v1-5/stable-diffusion-v1-5 through from_pretrained, here from an offline
    hub cache holding the tiny pipeline."""
    import json
    from conftest import run_offline_hub
    cache, saved = sd15_hub_cache
    out = run_offline_hub(cache, """if True:
        import json, dmdr
        unet, vae, text_encoder, tokenizer = dmdr.load_teacher("sd15")
        print(json.dumps(dict(unet={k: v.double().sum().item() for k, v in unet.state_dict().items()},
                              ids=tokenizer("a photo of a cat").input_ids)))""")
    loaded = json.loads(out.strip().splitlines()[-1])
    assert loaded["unet"] == {k: v.double().sum().item() for k, v in saved.unet.state_dict().items()}
    assert loaded["ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_bf16_precision_keeps_trainables_fp32_tracks_fp32_and_saves_fp32_weights(prompt_file, tmp_path):
    """--precision bf16 is the CUDA path (frozen base, VAE, text encoder and CLIP bf16 under bf16 autocast; LoRAs
    fp32); it also runs on CPU, so its dtype handling is tested here: the scores and the DMD + ReFL gradient
    (through gradient checkpointing, the VAE decoder and CLIP) agree with float32's, and the saved pipeline holds
    the teacher's float32 weights, not their bf16 rounding."""
    from diffusers import StableDiffusionPipeline
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    out = {}
    for precision in ("fp32", "bf16"):
        extra = ["--precision", precision] + ["--gradient-checkpointing"] * (precision == "bf16")
        cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path / precision, "refl", 1, "--generator", "lora", *extra))
        m = dmdr.build_models(cfg, torch.device("cpu"))
        m.uncond = dmdr.encode_prompts(m, [""])
        trainable = dmdr.lora_params(m.unet, "generator") + dmdr.lora_params(m.unet, "fake")
        frozen = [p for n, p in m.unet.named_parameters() if "lora_" not in n]
        frozen += [*m.vae.parameters(), *m.text_encoder.parameters(), *m.clip.parameters()]
        assert {p.dtype for p in frozen} == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert {p.dtype for p in trainable} == {torch.float32}
        with torch.no_grad():  # a trained fake score: at init, real - fake on the random teacher is 2e-4 of
            for n, p in m.unet.named_parameters():  # real, below bf16's resolution (see the README)
                if ".fake." in n and "lora_B" in n:
                    p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        emb, t = dmdr.encode_prompts(m, PROMPTS[:2]), torch.tensor([999, 999])
        x0 = dmdr.generator_x0(m, x, t[0], emb)
        with torch.no_grad():
            x_t = dmdr.add_noise(x0.detach(), noise, m.alphas_cumprod[t - 300])
            x0_real = dmdr.real_x0(m, x_t, t - 300, emb, m.uncond, 1.75)
            x0_fake = dmdr.fake_x0(m, x_t, t - 300, emb)
        loss = dmdr.dmd_loss(x0, x0_real, x0_fake) + 0.05 * dmdr.reward_surrogate(m, cfg, x0, PROMPTS[:2])[0]
        dmdr.use_adapter(m.unet, "generator")
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in dmdr.lora_params(m.unet, "generator")])
        assert grad.dtype == torch.float32 and grad.norm() > 0
        out[precision] = x0_real, x0_fake, grad
        if precision == "bf16":
            with torch.no_grad():  # move the generator LoRA so that the export has something to merge
                for p in dmdr.lora_params(m.unet, "generator"):
                    p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
            dmdr.save_generator(m, cfg, tmp_path / "generator")
    for x32, x16 in zip(out["fp32"][:2], out["bf16"][:2]):
        assert (x16 - x32).norm() / x32.norm() < 0.03  # bf16 rounding, not a dtype bug (which gives O(1) errors)
    cos = torch.nn.functional.cosine_similarity(out["fp32"][2], out["bf16"][2], dim=0)
    print(f"cosine of the bf16 and fp32 generator gradients: {cos:.4f}")
    assert cos > 0.95
    saved = StableDiffusionPipeline.from_pretrained(tmp_path / "generator")
    unet, vae, text_encoder, _ = dmdr.load_teacher("tiny")
    for ours, theirs in ((saved.vae, vae), (saved.text_encoder, text_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)
    a, b = saved.unet.state_dict(), unet.state_dict()
    lora_targets = {k for k in a if any(f".{n}." in k for n in ("to_q", "to_k", "to_v", "to_out"))}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k not in lora_targets)
    assert all(not torch.equal(a[k], b[k]) for k in lora_targets if k.endswith("weight"))  # the merged LoRA


def test_dpo_reference_of_a_full_generator_keeps_its_norms_in_fp32(prompt_file, tmp_path):
    """Under bf16, matrices and kernels are cast to bf16 by autocast anyway, so a bf16 copy is exact there; CUDA's
    autocast runs the norms in float32, so their weights (and the biases, KBs) keep the generator's dtype. So the
    swapped-in reference gives the snapshot's epsilon bit for bit after the generator has moved on."""
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "dpo", 1, "--generator", "full", "--precision", "bf16"))
    m = dmdr.build_models(cfg, torch.device("cpu"))
    params = dmdr.generator_params(m)
    nudge(params.values(), salt=1)  # norms off their initial 1 and 0, which bf16 holds exactly
    ref = dmdr.snapshot_generator(m)
    assert ref.keys() == params.keys()
    assert {(v.dim() > 1, v.dtype) for v in ref.values()} == {(True, torch.bfloat16), (False, torch.float32)}
    assert all(torch.equal(v, params[n].to(v.dtype)) for n, v in ref.items())
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([749, 249])
    emb = dmdr.encode_prompts(m, PROMPTS[:2])
    with torch.no_grad():
        m.dpo_ref, eps_start = ref, dmdr.generator_eps(m, x, t, emb)
        nudge(params.values())  # matrices and vectors alike
        eps_now = dmdr.generator_eps(m, x, t, emb)
        with dmdr.dpo_reference(m):
            assert torch.equal(dmdr.generator_eps(m, x, t, emb), eps_start)
    assert (eps_now - eps_start).abs().max() > 1e-3


@pytest.mark.parametrize("rl", ["dpo", "grpo"])
def test_bf16_end_to_end_keeps_fp32_state(rl, prompt_file, tmp_path):
    """The other RL branches under --precision bf16 (log-probs of a bf16-autocast step, DPO's reference errors):
    finite losses, and the checkpoint holds fp32 trainables and optimiser states (what --resume continues)."""
    dmdr.main(tiny_args(prompt_file, tmp_path, rl, 1, "--steps", "2", "--precision", "bf16"))
    row = read_metrics(tmp_path)[-1]
    assert all(math.isfinite(row[k]) for k in ("dmd_loss", "fake_loss", "rl_loss", "eval_reward"))
    assert -1 <= row["reward"] <= 1 and row["dmd_loss"] > 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    tensors = [*ckpt["generator"].values(), *ckpt["fake"].values()]
    tensors += [v for opt in ("opt_g", "opt_f") for s in ckpt[opt]["state"].values() for v in s.values()
                if v.dim() > 0]
    assert tensors and {v.dtype for v in tensors} == {torch.float32}
    if rl == "dpo":  # DPO's reference (of the LoRA generator here): bf16 matrices, as autocast casts them
        assert {v.dtype for v in ckpt["dpo_ref"].values()} == {torch.bfloat16}


def test_compile_gives_the_same_run_and_stops_recompiling(prompt_file, tmp_path, dynamo_graphs):
    """--compile (traced with dynamo's "eager" backend, see conftest.py) repeats the uncompiled run's metrics,
    and once the first evaluation has run no new graph is compiled, although the DynaDG scale changes every
    iteration (torch < 2.6, which refuses --compile with DynaDG, runs this without it)."""
    dynadg = not getattr(torch._dynamo.config, "specialize_float", False)
    args = ("refl", 4, "--generator", "lora", "--eval-every", "2") + (() if dynadg else ("--no-dynadg",))
    dmdr.main(tiny_args(prompt_file, tmp_path / "eager", *args))
    graphs = dynamo_graphs(dmdr, "fake_updates")
    dmdr.main(tiny_args(prompt_file, tmp_path / "compiled", *args, "--compile"))
    assert 0 < graphs[2] == graphs[3]  # graphs[i]: after iteration i+1's updates, before its evaluation
    assert len({r["dynadg_scale"] for r in read_metrics(tmp_path / "compiled")}) == (4 if dynadg else 1)
    for ours, theirs in zip(read_metrics(tmp_path / "compiled"), read_metrics(tmp_path / "eager"), strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours.keys() - {k for k in ours if k.startswith("sec_")}:
            # channels_last reorders the convolutions' sums: equal up to float rounding
            assert ours[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-6), key


def test_compile_with_dynadg_on_a_torch_that_specialises_floats_is_one_line(prompt_file, tmp_path):
    """torch < 2.6 guards on each float's value (dynamo's specialize_float): with DynaDG's scale changing every
    iteration, --compile would compile the UNet again every iteration (measured on torch 2.4: a new graph per
    iteration). Refused before any model loads, unless DynaDG is off."""
    args = tiny_args(prompt_file, tmp_path / "run", "none", 2, "--compile")
    with torch._dynamo.config.patch(specialize_float=True):
        with pytest.raises(SystemExit, match=r"^error: --compile with DynaDG needs torch >= 2\.6 \(this is .*\(fix: "
                                             r"upgrade torch, drop --compile or pass --no-dynadg\)$"):
            dmdr.main(args)
        assert not (tmp_path / "run").exists()
        for ok in (["--no-dynadg"], ["--dynadg-lambda0", "0"]):
            dmdr.validate(dmdr.parse_args(args + ok))
    with torch._dynamo.config.patch(specialize_float=False):  # torch >= 2.6's default
        dmdr.validate(dmdr.parse_args(args))


def test_clip_score_is_the_cosine_of_unit_image_and_text_embeddings(lora_models):
    """The CLIP text-image score (ReFL's reward, eval_clip_*) is a cosine: both embeddings unit-normalised,
    so it lies in [-1, 1] whatever the norms of the encoders' outputs."""
    m = lora_models
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        text = m.clip.encode_text(m.clip_tokenizer(PROMPTS[:2])).float()
        image = dmdr.clip_features(m, images)
        expected = (torch.nn.functional.normalize(image, dim=-1) * torch.nn.functional.normalize(text, dim=-1)).sum(-1)
        score = dmdr.clip_score(m, images, PROMPTS[:2])
    assert (text.norm(dim=-1) - 1).abs().max() > 1e-3  # the encoder's own output is not unit: the normalising shows
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-6)


def test_dmdr_eval_reward_is_the_generators_reward(lora_models, prompt_file, tmp_path):
    """eval_reward is the --reward of the generator's held-out images (by hand from evaluate's fixed noise),
    not of the teacher's, whose images never change (eval_clip_teacher is their score)."""
    m = lora_models
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "none", 1))
    _, eval_prompts = dmdr.validate(cfg)
    cache = {}
    metrics = dmdr.evaluate(m, cfg, eval_prompts, cache, 0, tmp_path)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    z = torch.randn(len(eval_prompts), *dmdr.latent_shape(m), generator=g)
    with torch.no_grad():
        generated = dmdr.decode(m, dmdr.sample_generator(m, z, dmdr.encode_prompts(m, eval_prompts), generator=g))
        ours = dmdr.reward_fn(m, cfg, generated, eval_prompts).mean().item()
        teachers = dmdr.reward_fn(m, cfg, cache["teacher"], eval_prompts).mean().item()
    assert abs(ours - teachers) > 1e-6
    assert metrics["eval_reward"] == pytest.approx(ours, rel=1e-5)


def test_clip_for_openai_weights_is_built_with_quick_gelu(prompt_file, tmp_path):
    """As redif.py's: OpenAI's tags (the aesthetic head's ViT-L-14/openai) were trained with QuickGELU, which the
    arch config does not say. ViT-B-32 with random weights (an offline teacher) stands in for ViT-L-14."""
    from open_clip.transformer import QuickGELU
    cfg = dmdr.parse_args(["--teacher", "sd15-random", "--device", "cpu", "--out", str(tmp_path)])
    clip = dmdr.create_clip(cfg, "ViT-B-32", "openai")
    assert {type(b.mlp.gelu) for b in [*clip.visual.transformer.resblocks, *clip.transformer.resblocks]} == {QuickGELU}

def test_aesthetic_reward_loads_the_laion_checkpoint_and_is_differentiable(prompt_file, tmp_path, monkeypatch):
    """--reward clip_text=1,aesthetic=0.05: the head loads a checkpoint in the LAION predictor's own format
    ("layers.N.*" keys; the CLIP ViT-L/14 download is replaced by the tiny CLIP here), the reward is the weighted
    sum of the two terms, its gradient reaches the images (ReFL), and a bad checkpoint is a one-line error."""
    head = dmdr.aesthetic_head(32).eval()
    torch.nn.init.normal_(head[-1].weight, std=1.0)  # a head whose score visibly depends on the image
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, tmp_path / "aesthetic-model.pth")
    tiny_clip = dmdr.create_clip(dmdr.parse_args(tiny_args(prompt_file, tmp_path / "x")), "ViT-L-14", "openai")
    monkeypatch.setattr(dmdr, "create_clip", lambda *args: tiny_clip)
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path / "run", "refl", 1, "--reward", "clip_text=1,aesthetic=0.05",
                                    "--reward-weights", "pretrained", "--aesthetic-model",
                                    str(tmp_path / "aesthetic-model.pth")))
    m = dmdr.build_models(cfg, torch.device("cpu"))
    clip, loaded = m.aesthetic
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), head.state_dict().values()))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    reward = dmdr.reward_fn(m, cfg, images * 2 - 1, PROMPTS[:2])
    aesthetic = head(dmdr.clip_features(m, images * 2 - 1, clip)).squeeze(-1)
    torch.testing.assert_close(reward, dmdr.clip_score(m, images * 2 - 1, PROMPTS[:2]) + 0.05 * aesthetic)
    assert torch.autograd.grad(aesthetic.sum(), images)[0].abs().sum() > 0
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        bad = dataclasses.replace(cfg, aesthetic_model=str(tmp_path / "bad.pth"))
        dmdr.load_aesthetic(bad, m.device, torch.float32)
    assert str(e.value).startswith("error: could not load the aesthetic head") and "\n" not in str(e.value)


def test_decode_in_chunks_is_one_decode_and_keeps_the_gradient(lora_models):
    """DPO and GRPO decode 2B and B*G images for their rewards: in chunks of 8, with the value and the gradient
    of one VAE call on all of them."""
    z = torch.randn(9, *dmdr.latent_shape(lora_models), generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    chunked, whole = dmdr.decode(lora_models, z), dmdr.decode(lora_models, z, chunk=9)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)  # O(1) if a chunk went astray
    grads = [torch.autograd.grad((images * torch.arange(images.numel()).view_as(images)).sum(), z)[0]
             for images in (chunked, whole)]
    torch.testing.assert_close(*grads, rtol=1e-3, atol=1e-3 * grads[1].abs().max().item())  # kernels by batch size


def test_the_aesthetic_score_reads_its_own_clip(prompt_file, tmp_path):
    """The aesthetic head reads ViT-L-14's embeddings (m.aesthetic[0]), not the CLIP of the clip_text reward. In
    the tiny setting both CLIPs are built alike (seed 0), so the aesthetic one is perturbed to tell them apart."""
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "none", 1, "--reward", "aesthetic=1"))
    m = dmdr.build_models(cfg, torch.device("cpu"))
    clip_l, head = m.aesthetic
    with torch.no_grad():
        for p in clip_l.visual.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        score = dmdr.aesthetic_score(m, images)
        torch.testing.assert_close(score, head(dmdr.clip_features(m, images, clip_l)).squeeze(-1))
        assert (score - head(dmdr.clip_features(m, images)).squeeze(-1)).abs().max() > 1e-4


def test_clip_features_equal_redifs(prompt_file, tmp_path):
    """Both scripts embed images for CLIP alike ([-1, 1] -> [0, 1], antialiased bicubic resize, OpenAI mean and
    std; test_redif checks that preprocessing against PIL and in closed form): same model, same features."""
    import redif
    clip = dmdr.create_clip(dmdr.parse_args(tiny_args(prompt_file, tmp_path)), "ViT-B-32", "openai")
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = dmdr.clip_features(types.SimpleNamespace(clip=clip, ctx=contextlib.nullcontext), images)
        theirs = redif.clip_image_features(types.SimpleNamespace(clip=clip), images)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_refl_image_by_image_has_the_value_and_gradient_of_the_whole_batch(prompt_file, tmp_path):
    """reward_surrogate (ReFL's loss) takes dL_rl/dx0 one image at a time (decoder memory) and returns
    x0 . stopgrad(dL_rl/dx0) with L_rl's value: its value and its gradient w.r.t. the generator equal those of
    -mean R(decode(x0)) on the batch."""
    cfg = dmdr.parse_args(tiny_args(prompt_file, tmp_path, "refl", 1, "--generator", "lora",
                                    "--reward", "clip_text=1,aesthetic=0.05"))
    m = dmdr.build_models(cfg, torch.device("cpu"))
    with torch.no_grad():  # a generator LoRA away from zero, so that the gradient reaches both of its factors
        for p in dmdr.lora_params(m.unet, "generator"):
            p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    emb = dmdr.encode_prompts(m, PROMPTS[:3])
    z = torch.randn(3, *dmdr.latent_shape(m), generator=torch.Generator().manual_seed(0))
    params = dmdr.lora_params(m.unet, "generator")
    results = []
    for whole in (True, False):
        x0 = dmdr.generator_x0(m, z, m.timesteps[0], emb)
        if whole:
            r = dmdr.reward_fn(m, cfg, dmdr.decode(m, x0), PROMPTS[:3])
            loss = -r.mean()
        else:
            loss, r = dmdr.reward_surrogate(m, cfg, x0, PROMPTS[:3])
        dmdr.use_adapter(m.unet, "generator")
        grads = torch.autograd.grad(loss, params)
        results.append((loss.detach(), r.detach(), torch.cat([g.flatten() for g in grads])))
    (loss_w, r_w, g_w), (loss_c, r_c, g_c) = results
    torch.testing.assert_close(loss_c, loss_w)
    torch.testing.assert_close(r_c, r_w)
    print(f"relative gradient difference {((g_c - g_w).norm() / g_w.norm()).item():.2e}")
    assert g_w.norm() > 0 and (g_c - g_w).norm() < 1e-5 * g_w.norm()  # float32 rounding of other sums
