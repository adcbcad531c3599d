import os
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
