import logging
import os
import signal
import sys

import pytest
import torch
from hypothesis import settings

# The SD scripts live at the repo root and are imported as modules (`import redif`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Every tensor in the suite is small: one thread avoids OpenMP spin-waits that cost more than they save.
torch.set_num_threads(1)
# CI replays the same examples every run (a red CI is then a real, reproducible failure); locally hypothesis
# explores new ones each run.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture
def dynamo_graphs(monkeypatch):
    """compile_traced(script, function_name) -> a list that gets, after each call of that function, the number of
    graphs dynamo has compiled so far; the script's --compile traces with the "eager" backend (the same guards
    and graphs as inductor, without its code generation, which takes minutes per graph on CPU)."""
    from torch._dynamo.utils import counters

    def compile_traced(script, name):
        monkeypatch.setattr(script, "COMPILE_BACKEND", "eager")
        torch._dynamo.reset()
        counters.clear()
        graphs, real = [], getattr(script, name)

        def counting(*args, **kwargs):
            result = real(*args, **kwargs)
            graphs.append(counters["stats"]["unique_graphs"])
            return result
        monkeypatch.setattr(script, name, counting)
        return graphs
    yield compile_traced
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def sd15_hub_cache(tmp_path_factory):
    """A Hugging Face hub cache holding the tiny random pipeline under SD1.5's hub id, so that `--teacher sd15`
    (the users' hub path: alias -> hub id -> from_pretrained) runs offline: HF_HUB_OFFLINE=1, HF_HUB_CACHE=this.
    -> (cache folder, the pipeline that was saved)."""
    import redif
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    commit = "0" * 40
    pipe = redif.build_offline_pipeline("tiny")
    pipe.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache, pipe


def run_offline_hub(cache, code):
    """Run python `code` in the repo root with the hub offline and `cache` as its cache -> its stdout."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def modeling_log():
    """diffusers' modeling logger and the records that pass its filters during the test -> (logger, records)."""
    log, records = logging.getLogger("diffusers.models.modeling_utils"), []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    yield log, records
    log.removeHandler(handler)


@pytest.fixture(autouse=True)
def sigint_raises_keyboard_interrupt():
    """Tests that press Ctrl-C (raise SIGINT) need Python's default handler, which a shell script's background
    job (`pytest &`) starts without: bash sets such a job's SIGINT to ignored, and the scripts keep it so."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
