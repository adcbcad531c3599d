import os
import sys

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
