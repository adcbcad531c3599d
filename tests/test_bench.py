"""bench/sd_profile.py, the GPU benchmark: its cases run on the tiny teacher, and the floor it computes from a
profile line's image counts is the scripts' own floor (same counts, same per-image costs)."""
import json
import os
import sys

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
@pytest.mark.parametrize("obj", ["text", "tensors"])
def test_a_failed_write_keeps_the_old_file_leaves_no_temp_file_and_says_so_in_one_line(script, obj, tmp_path,
                                                                                          monkeypatch):
    """A full disk (or a read-only folder) while a checkpoint, config or metrics file is written: the previous
    file stays whole, the temp file (GBs for a full fine-tune's checkpoint) is removed, and one line names the fix."""
    mod = {"dmdr": dmdr, "redif": redif}[script]
    path = tmp_path / "checkpoint.pt"
    path.write_text("the last good checkpoint")

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(SystemExit) as stopped:
        mod.atomic_write(path, "new" if obj == "text" else {"x": torch.zeros(3)})
    assert str(stopped.value).startswith(f"error: could not write {path}: No space left on device (fix: free disk")
    assert "\n" not in str(stopped.value)
    assert path.read_text() == "the last good checkpoint" and [p.name for p in tmp_path.iterdir()] == [path.name]


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
