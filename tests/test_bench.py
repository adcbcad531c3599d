"""bench/sd_profile.py, the GPU benchmark: its cases run on the tiny teacher, and the floor it computes from a
profile line's image counts is the scripts' own floor (same counts, same per-image costs)."""
import contextlib
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import dmdr
import redif

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import sd_profile  # noqa: E402

H100_COSTS = {"forward": redif.H100_SEC_FORWARD, "train full": redif.H100_SEC_TRAIN,
              "train lora": redif.H100_SEC_TRAIN, "vae decode": redif.H100_SEC_DECODE}


@pytest.mark.parametrize("case", ["redif-lora", "dmdr-lora", "dmdr-full", "redif-lora-gc", "dmdr-lora-gc"])
def test_bench_floor_is_the_scripts_floor(case, tmp_path):
    script, args = sd_profile.case_command(case, "tiny", tmp_path / case)
    {"redif.py": redif, "dmdr.py": dmdr}[script].main(args)
    row = [json.loads(line) for line in (tmp_path / case / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["phase"] == "profile"
    counts = sd_profile.image_counts(script, row)
    assert counts["forward"] > 0 and counts["train"] > 0 and counts["vae decode"] > 0
    unet = redif.build_offline_pipeline("tiny").unet  # both scripts scale SD1.5's costs by UNet size, latent area
    scale = (unet.config.sample_size / 64) ** 2 * sum(p.numel() for p in unet.parameters()) / redif.SD15_UNET_PARAMS
    assert dmdr.H100_SD15_MS == pytest.approx({"unet fwd": 1000 * H100_COSTS["forward"],  # one set of costs
                                               "unet fwd+bwd": 1000 * H100_COSTS["train full"],
                                               "vae fwd": 1000 * H100_COSTS["vae decode"],
                                               "vae fwd+bwd": 3000 * H100_COSTS["vae decode"]})
    trains, checkpointing = sd_profile.CASES[case][2], "--gradient-checkpointing" in sd_profile.CASES[case][1]
    floor = sd_profile.floor_here(counts, H100_COSTS, trains, checkpointing)
    assert row["floor_s"] == pytest.approx(scale * floor, rel=1e-9)
    if checkpointing:  # the backward's rerun forwards: one UNet forward per trained image, one decode per ReFL decode
        extra = (counts["train"] + counts["train lora"]) * H100_COSTS["forward"]
        extra += counts.get("vae decode with grad", 0) * H100_COSTS["vae decode"]
        assert extra > 0 and floor == pytest.approx(sd_profile.floor_here(counts, H100_COSTS, trains) + extra)
    result = dict(case=case, status="ok", seconds=1.0, trains=trains, row=row, counts=counts,
                  checkpointing=checkpointing)
    line = sd_profile.table([result], {k: v * scale for k, v in H100_COSTS.items()}).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == case and cells[5] == f"{row['floor_s'] / row['iters']:.2f}"  # the floor here = the script's
    assert cells[6] == f"{row['wall_over_floor']:.2f}"


def test_floor_here_costs_each_kind_at_its_own_rate():
    costs = {"forward": 1.0, "train full": 10.0, "train lora": 100.0, "vae decode": 1000.0}
    counts = {"forward": 1, "train": 2, "train lora": 3, "vae decode": 4, "vae decode with grad": 5}
    assert sd_profile.floor_here(counts, costs, "full") == 1 + 20 + 300 + 4000
    assert sd_profile.floor_here(counts, costs, "lora") == 1 + 200 + 300 + 4000
    assert sd_profile.floor_here(counts, costs, "full", checkpointing=True) == 4321 + (2 + 3) * 1 + 5 * 1000


@pytest.mark.parametrize("script, saved", [("dmdr", "generator"), ("redif", "student")])
def test_a_saved_model_without_its_checkpoint_is_never_overwritten(script, saved, tmp_path):
    """D26 / R10: a folder holding a finished generator/ (dmdr) or student/ (redif) whose checkpoint.pt was
    deleted to save space is still a run: a fresh run there is refused, not started over it."""
    mod = {"dmdr": dmdr, "redif": redif}[script]
    out = tmp_path / "run"
    (out / saved).mkdir(parents=True)
    cfg = mod.parse_args(["--out", str(out), "--teacher", "tiny"])
    with pytest.raises(SystemExit, match="already holds a run"):
        mod.check_out_dir(cfg, out)
    (out / saved).rmdir()
    mod.check_out_dir(cfg, out)  # an empty folder is fine: the check has teeth


@pytest.mark.parametrize("script", ["dmdr", "redif"])
@pytest.mark.parametrize("obj, writer", [("text", "fsync"), ("tensors", "fsync"), ("tensors", "torch.save")])
def test_a_failed_write_keeps_the_old_file_leaves_no_temp_file_and_says_so_in_one_line(script, obj, writer, tmp_path,
                                                                                          monkeypatch):
    """A full disk (or a read-only folder) while a checkpoint, config or metrics file is written: the previous
    file stays whole, the temp file (GBs for a full fine-tune's checkpoint) is removed, and one line names the fix.
    torch.save's zip writer reports a full disk as a RuntimeError of its own (seen on a 4 MB tmpfs)."""
    mod = {"dmdr": dmdr, "redif": redif}[script]
    path = tmp_path / "checkpoint.pt"
    path.write_text("the last good checkpoint")

    def disk_full(*args):
        if writer == "torch.save":
            args[1].write(b"PK")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4109376 vs 4109264")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full) if writer == "fsync" else monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as stopped:
        mod.atomic_write(path, "new" if obj == "text" else {"x": torch.zeros(3)})
    reason = "No space left on device" if writer == "fsync" else "the write failed ([enforce fail at inline_container"
    assert str(stopped.value).startswith(f"error: could not write {path}: {reason}")
    assert "(fix: free disk space" in str(stopped.value) and "\n" not in str(stopped.value)
    assert path.read_text() == "the last good checkpoint" and [p.name for p in tmp_path.iterdir()] == [path.name]


RUNS = {"redif": ["--teacher", "tiny", "--device", "cpu", "--resolution", "8", "--steps", "2", "--teacher-steps", "4",
                  "--group", "2", "--prompts-per-iter", "1", "--seed-pool", "1", "--eval-pairs", "2", "--bc-iters",
                  "0", "--iters", "1"],
        "dmdr": ["--teacher", "tiny", "--device", "cpu", "--steps", "1", "--batch-size", "2", "--fake-updates", "1",
                 "--eval-teacher-steps", "1", "--num-eval-prompts", "2", "--iters", "1"]}


def test_only_torch_saves_zip_writer_error_counts_as_a_write_failure(tmp_path, monkeypatch):
    """is_write_error takes a RuntimeError for a full disk only when torch.save's zip writer raised it
    (inline_container.cc). Any other RuntimeError inside a save (a bug, an OOM) stays itself, with its traceback,
    not 'could not write ...: free disk space'; the temp file still goes."""
    for mod in (dmdr, redif):
        assert mod.is_write_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4 vs 2"))
        assert not mod.is_write_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        assert mod.is_write_error(OSError(28, "No space left on device"))

        def broken(obj, f):
            f.write(b"PK")
            raise RuntimeError("Cannot pickle a tensor subclass")
        with monkeypatch.context() as patch:
            patch.setattr(torch, "save", broken)
            path = tmp_path / f"{mod.__name__}.pt"
            with pytest.raises(RuntimeError, match="Cannot pickle"):
                mod.atomic_write(path, {"x": torch.zeros(1)})
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(SystemExit, match=r"could not write x: the write failed \(OSError\) \(fix"):
            mod.write_failed("x", OSError())  # an error without a message


@pytest.mark.parametrize("script", ["dmdr", "redif"])
def test_a_folder_gone_read_only_mid_run_is_one_line_naming_the_file(script, tmp_path, monkeypatch):
    """main turns EROFS (a folder gone read-only: a remount, a quota's read-only fallback) under a sample grid into
    one line, like ENOSPC, and the line names the file that could not be written (OSError.filename)."""
    from PIL import Image
    mod = {"dmdr": dmdr, "redif": redif}[script]
    out = tmp_path / "run"

    def read_only(self, fp, *a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(fp))
    monkeypatch.setattr(Image.Image, "save", read_only)
    with pytest.raises(SystemExit) as stopped:
        mod.main(RUNS[script] + ["--out", str(out)])
    message = str(stopped.value)
    assert message.startswith(f"error: could not write {out / 'samples_'}") and "\n" not in message
    assert ".png: Read-only file system (fix: free disk space or fix permissions" in message


@pytest.mark.parametrize("script", ["dmdr", "redif"])
def test_resume_takes_the_prompts_and_the_teacher_cache_from_a_new_path(script, tmp_path):
    """RESUME_FREE holds prompts (both scripts) and teacher_cache (redif): the file or the cache folder may move,
    their content is what is checked (check_same_prompts; the cache is keyed by content). A --resume giving the new
    path continues the run with it, and names the change."""
    mod = {"dmdr": dmdr, "redif": redif}[script]
    prompts = ["a cat", "a dog", "a bird", "a fish"]
    (tmp_path / "old.txt").write_text("".join(p + "\n" for p in prompts))
    (tmp_path / "moved.txt").write_text("".join(p + "\n" for p in prompts))
    out = tmp_path / "run"
    out.mkdir()
    extra = ["--teacher-cache", str(tmp_path / "c1")] if script == "redif" else []
    cfg = mod.parse_args(RUNS[script] + ["--prompts", str(tmp_path / "old.txt"), "--out", str(out), *extra])
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (out / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    argv = ["--out", str(out), "--resume", "--prompts", str(tmp_path / "moved.txt")]
    argv += ["--teacher-cache", str(tmp_path / "c2")] if script == "redif" else []
    resumed = mod.resume_config(mod.parse_args(argv), mod.given_flags(argv), out)
    if script == "redif":
        resumed, changed = resumed
        assert resumed.teacher_cache == str(tmp_path / "c2") and set(changed) == {"teacher_cache", "prompts"}
    assert resumed.prompts == str(tmp_path / "moved.txt")


@pytest.mark.parametrize("script", ["dmdr", "redif"])
def test_a_disk_that_fills_mid_run_is_one_line_and_resume_finishes_the_run(script, tmp_path, monkeypatch):
    """Where the disk fills: under a sample grid (PIL's OSError) the run stops in one line; under the final
    save_pretrained (safetensors' own error type) it stops in one line with the checkpoint kept and no
    half-written folder, and --resume, once there is room, writes the student / generator."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from safetensors import SafetensorError
    mod, saved = {"dmdr": (dmdr, "generator"), "redif": (redif, "student")}[script]
    out = tmp_path / "run"
    args = RUNS[script] + ["--out", str(out)]

    def grid_full(*a, **kw):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped:
        patch.setattr(Image.Image, "save", grid_full)
        mod.main(args)
    assert str(stopped.value).startswith(f"error: could not write {out}: No space left on device (fix: free disk")

    def pipeline_full(self, folder, **kw):
        Path(folder).mkdir()
        (Path(folder) / "model_index.json").write_text("{")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    shutil.rmtree(out)
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped:
        patch.setattr(StableDiffusionPipeline, "save_pretrained", pipeline_full)
        mod.main(args)
    assert str(stopped.value) == (
        f"error: could not write {out / saved}: the write failed (Error while serializing: I/O error: No space left "
        "on device (os error 28)) (fix: free disk space or fix permissions, then run again; the files there are "
        "intact, and --resume continues from the last checkpoint, if one was saved)")
    assert (out / "checkpoint.pt").exists() and not any(p.name.startswith(saved) for p in out.iterdir())
    mod.main(args + ["--resume"])
    assert (out / saved / "model_index.json").exists()


@pytest.mark.parametrize("script", ["dmdr", "redif"])
def test_one_process_per_run_folder(script, tmp_path, monkeypatch):
    """While another process holds a run folder, a run there is refused in one line before it writes anything;
    a run holds its folder while it trains, and lets go when it ends."""
    mod = {"dmdr": dmdr, "redif": redif}[script]
    out = tmp_path / "run"
    out.mkdir()
    lock = "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)"
    holder = subprocess.Popen([sys.executable, "-c", lock + "; print('held', flush=True); sys.stdin.read()",
                               str(out / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit) as refused:
            mod.main(RUNS[script] + ["--out", str(out)])
    finally:
        holder.stdin.close()
        holder.wait()
    assert str(refused.value) == (f"error: another process is running in {out} (fix: wait for it to end (or stop "
                                  "it), or choose another --out)")
    assert [p.name for p in out.iterdir()] == [".lock"]

    def can_lock():
        return subprocess.run([sys.executable, "-c", lock, str(out / ".lock")], capture_output=True).returncode == 0
    seen, save = [], mod.save_checkpoint
    monkeypatch.setattr(mod, "save_checkpoint", lambda *a, **kw: seen.append(can_lock()) or save(*a, **kw))
    mod.main(RUNS[script] + ["--out", str(out)])
    assert seen == [False] and can_lock()
    with pytest.raises(SystemExit, match="^error: .*missing"):  # a one-line error after the lock was taken
        mod.main(RUNS[script] + ["--out", str(out), "--resume", "--prompts", str(tmp_path / "missing.txt")])
    assert can_lock()  # let go, though this process lives on (a notebook's would)

    import fcntl
    for code in (errno.EAGAIN, errno.ENOLCK):  # locked by another process; a file system without locks: no lock

        def lockf(*args):
            raise OSError(code, os.strerror(code))
        held = []
        with monkeypatch.context() as patch:
            patch.setattr(fcntl, "lockf", lockf)
            refusal = pytest.raises(SystemExit, match="another process")
            with refusal if code == errno.EAGAIN else contextlib.nullcontext():
                mod.lock_run_folder(out, held)
        assert len(held) == (code == errno.ENOLCK)  # a refusal holds nothing open
        for lock in held:
            os.close(lock)
    (tmp_path / "unwritable" / ".lock").mkdir(parents=True)  # as a read-only folder: the lock file cannot open
    with pytest.raises(SystemExit, match=r"^error: could not write .*\.lock: Is a directory \(fix: free disk"):
        mod.main(RUNS[script] + ["--out", str(tmp_path / "unwritable")])


def sqrtm_psd(c):
    w, v = torch.linalg.eigh(c)
    return v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T


@pytest.mark.parametrize("script", ["dmdr", "redif"])
def test_frechet_distance_of_anisotropic_gaussians_is_the_closed_form(script):
    """The Frechet distance's matrix square roots are right for covariances that are not multiples of I (CLIP
    features are anything but isotropic; an isotropic test cannot see transposed eigenvectors): equal to the
    formula with a square root checked by squaring it, and near the population value."""
    g = torch.Generator().manual_seed(0)
    mix_a, mix_b = (torch.randn(3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64) @ mix_a.T
    b = 0.5 + torch.randn(4000, 3, generator=g, dtype=torch.float64) @ mix_b.T
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root = sqrtm_psd(cov_a)
    torch.testing.assert_close(root @ root, cov_a)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * sqrtm_psd(
        root @ cov_b @ root).trace()
    fd = {"dmdr": dmdr, "redif": redif}[script].frechet_distance(a, b)
    assert fd == pytest.approx(expected.item(), rel=1e-9)
    ca, cb = mix_a @ mix_a.T, mix_b @ mix_b.T  # the population: means 0 and 0.5, covariances mix mix^T
    ra = sqrtm_psd(ca)
    assert fd == pytest.approx((3 * 0.25 + ca.trace() + cb.trace() - 2 * sqrtm_psd(ra @ cb @ ra).trace()).item(),
                               rel=0.1)


@pytest.mark.parametrize("script, spec", [("redif", "clip=1,dino=0"), ("dmdr", "clip_text=1,aesthetic=0")])
def test_a_zero_weight_reward_term_is_allowed_beside_a_non_zero_one(script, spec):
    """A term at weight 0 is skipped (a spec may keep it written out); only a spec whose weights are all zero is
    refused."""
    mod = {"dmdr": dmdr, "redif": redif}[script]
    first, second = (term.split("=")[0] for term in spec.split(","))
    assert mod.parse_reward(spec) == {first: 1.0, second: 0.0}
    with pytest.raises(SystemExit, match="no non-zero weight"):
        mod.parse_reward(f"{first}=0,{second}=0")


def test_train_summary_reports_the_last_evaluation_and_the_worst_first_minibatch_ratio():
    rows = [{"iter": 0, "phase": "eval", "eval_reward": 0.1}, {"iter": 0, "phase": "rl", "ratio_err_first": 2e-4,
            "clipfrac_first": 0.5}, {"iter": 1, "phase": "rl", "ratio_err_first": 3e-5, "clipfrac_first": 0.0},
            {"iter": 2, "phase": "eval", "eval_reward": 0.3}]
    summary = sd_profile.train_summary(rows)
    assert summary == {"iter": 2, "phase": "eval", "eval_reward": 0.3, "check_clipfrac_first": 0.5,
                       "check_ratio_err_first": 2e-4}
    line = sd_profile.table([dict(case="redif-train", status="ok", seconds=1.0, eval=summary)], None).splitlines()[-1]
    assert "eval_reward 0.3, check_clipfrac_first 0.5, check_ratio_err_first 0.0002 |" in line
    dmdr_row = {"iter": 1, "eval_reward": 0.2, "rl_loss": 0.1}  # dmdr: evaluation keys in the iteration's line
    assert sd_profile.train_summary([dmdr_row]) == dmdr_row
    assert sd_profile.first_ratio_checks([{"ratio_err_first": None}, {"ratio_err_first": 1e-5}]) == {
        "check_ratio_err_first": 1e-5}  # a non-finite value is logged as null: skipped, not a crash


def test_budget_is_a_hard_limit_on_every_case(tmp_path, monkeypatch):
    """Each case runs with what is left of --budget as its time limit (not --case-timeout on top of it), and none
    starts with under MIN_CASE_SECONDS left: the device call that runs the bench ends when planned."""
    limits = []

    def fake_run(cmd, log, timeout):
        limits.append(timeout)
        log.write_text("a case that failed at once\n")
        return 1, 0.0
    monkeypatch.setattr(sd_profile, "run", fake_run)
    args = ["--teacher", "tiny", "--cases", "redif-lora,dmdr-lora", "--case-timeout", "300", "--out", str(tmp_path)]
    results = sd_profile.main(args + ["--budget", "100"])
    assert [r["status"] for r in results] == ["failed (1)"] * 2 and len(limits) == 2
    assert all(90 < t <= 100 for t in limits)
    results = sd_profile.main(args + ["--budget", str(sd_profile.MIN_CASE_SECONDS - 1)])
    assert [r["status"] for r in results] == ["skipped: over --budget"] * 2 and len(limits) == 2


def test_without_a_gpu_the_sd15_cases_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU here.*--teacher tiny"):
        sd_profile.main(["--out", str(tmp_path / "bench")])
    assert not (tmp_path / "bench").exists()


def test_unet_rate_times_the_scripts_call_sizes_and_the_summary_shows_them(tmp_path, monkeypatch):
    """bench/unet_rate.py also times eager forward and LoRA training at --small-batches (the scripts' call sizes,
    where eager kernels launched one by one may leave the GPU waiting), and sd_profile's summary prints them beside
    the --batch figure that prices the floor."""
    import unet_rate
    timed = []
    monkeypatch.setattr(unet_rate, "timed", lambda fn, reps, device: timed.append(fn) or 0.012)
    report = unet_rate.main(["--teacher", "tiny", "--device", "cpu", "--batch", "4", "--small-batches", "1,2",
                             "--reps", "1", "--json", str(tmp_path / "costs.json")])
    assert len(timed) == 2 * 3 + 2 * 2 + 1  # 2 variants x 3 cases, 2 cases x 2 small batches, the VAE
    assert report["by_batch"] == {"forward": {1: 0.012, 2: 0.006, 4: 0.003}, "train lora": {1: 0.012, 2: 0.006,
                                                                                             4: 0.003}}
    assert report["eager"]["forward"] == report["by_batch"]["forward"][4]
    saved = json.loads((tmp_path / "costs.json").read_text())
    assert saved["by_batch"]["train lora"] == {"1": 0.012, "2": 0.006, "4": 0.003}
    result = dict(case="unet", status="ok", seconds=1.0, by_batch=saved["by_batch"])
    summary = sd_profile.write_summary(tmp_path, [result], saved["eager"])
    assert "eager ms per image by batch (images per call): forward 1: 12.00, 2: 6.00, 4: 3.00; train lora 1: 12.00" \
        in summary
    with pytest.raises(SystemExit, match="--small-batches '4,x' is not a list of positive integers"):
        unet_rate.main(["--teacher", "tiny", "--device", "cpu", "--small-batches", "4,x"])


def test_a_broken_case_costs_its_row_not_the_table(tmp_path, monkeypatch):
    """One GPU call runs the whole table: a case whose output the bench cannot read is recorded and the next case
    runs; a metrics line cut short by a killed process is skipped; a timed-out case that did log a profile is
    shown as timed out, not "ok"; a null (non-finite) floor prints as "-"."""
    calls = []

    def fake_run(cmd, log, timeout):
        calls.append(cmd)
        run_dir = tmp_path / cmd[cmd.index("--out") + 1].rsplit("/", 1)[-1]
        run_dir.mkdir(exist_ok=True)
        profile = dict(phase="profile", iters=2, wall_s=4.0, floor_s=None, wall_over_floor=None, unet_forward=8,
                       unet_forward_backward=4, vae_decode=2)
        text = "{not json\n" if len(calls) == 1 else json.dumps(profile) + '\n{"iter": 3, "lo'
        (run_dir / "metrics.jsonl").write_text(text)
        return (1 if len(calls) == 1 else "timeout"), 1.0
    monkeypatch.setattr(sd_profile, "run", fake_run)
    results = sd_profile.main(["--teacher", "tiny", "--cases", "dmdr-lora,redif-lora", "--out", str(tmp_path)])
    assert [r["status"] for r in results] == ["failed (1)", "failed (timeout)"] and len(calls) == 2
    assert sd_profile.read_metrics(tmp_path / "redif-lora") == [json.loads(json.dumps(
        dict(phase="profile", iters=2, wall_s=4.0, floor_s=None, wall_over_floor=None, unet_forward=8,
             unet_forward_backward=4, vae_decode=2)))]
    line = (tmp_path / "summary.md").read_text().splitlines()[-1]
    assert line.startswith("| redif-lora | failed (timeout) (1 s) | 2.00 | - | - |")
    monkeypatch.setattr(sd_profile, "run_case", lambda *args, **kw: {}["no such key"])
    results = sd_profile.main(["--teacher", "tiny", "--cases", "dmdr-lora,redif-lora", "--out", str(tmp_path)])
    assert [r["status"][:13] for r in results] == ["bench error: "] * 2 and (tmp_path / "summary.md").exists()


def test_image_counts_puts_each_dmdr_evaluation_in_its_cost_class():
    """dmdr's profile line -> fake-score training at the LoRA rate, the generator's at its own kind's, the scores'
    forwards as forwards, a decode with grad as 3 decodes, reward-model images nowhere."""
    row = {"evals": {"real score fwd": 7, "fake score fwd": 2, "fake score fwd+bwd": 5, "generator fwd+bwd": 3,
                     "generator fwd": 1, "rl fwd+bwd": 4, "vae decode fwd": 6, "vae decode fwd+bwd": 1,
                     "reward fwd+bwd": 9}}
    assert sd_profile.image_counts("dmdr.py", row) == {"forward": 10, "train": 7, "train lora": 5,
                                                        "vae decode": 9, "vae decode with grad": 1}


def test_unet_rate_prices_the_vae_per_decoded_image(monkeypatch):
    """The VAE's cost per image divides its timed call by --vae-batch, the images that call decodes."""
    import unet_rate
    monkeypatch.setattr(unet_rate, "timed", lambda fn, reps, device: 0.012)
    report = unet_rate.main(["--teacher", "tiny", "--device", "cpu", "--batch", "4", "--vae-batch", "3",
                             "--small-batches", "", "--reps", "1"])
    assert report["eager"]["vae decode"] == pytest.approx(0.004)


def test_a_case_starts_from_a_fresh_run_folder(tmp_path, monkeypatch):
    """A case rerun into the same --out first removes the last run's checkpoint.pt and metrics (the scripts
    refuse to start over a checkpoint) and its teacher cache (the profile would time another workload)."""
    run_dir = tmp_path / "redif-lora"
    run_dir.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl"):
        (run_dir / name).write_text("old")
    (run_dir / "teacher_cache").mkdir()  # cached teachers would skip the timed teacher phase
    (run_dir / "teacher_cache" / "0123.pt").write_text("old")
    left = []
    monkeypatch.setattr(sd_profile, "run", lambda cmd, log, timeout: left.extend(p.name for p in run_dir.iterdir())
                        or (1, 0.0))
    sd_profile.run_case("redif-lora", types.SimpleNamespace(teacher="tiny"), tmp_path, tmp_path / "log.txt",
                        deadline=1e12)
    assert left == []


def test_dmdrs_saved_generator_is_sampled_without_cfg(tmp_path, monkeypatch):
    """dmdr's generator has the guidance baked in (its config has no student_guidance): stock sampling at 0."""
    run_dir = tmp_path / "dmdr-train"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"steps": 4}))
    cmds = []
    monkeypatch.setattr(sd_profile, "run", lambda cmd, log, timeout: cmds.append(cmd) or (0, 0.0))
    sd_profile.sample_saved("dmdr-train", run_dir, 0, 1.0, types.SimpleNamespace(teacher="tiny"),
                            tmp_path / "log.txt", 10)
    assert cmds[0][-3:] == ["4", "0.0", "cpu"]
