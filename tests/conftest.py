import os
import sys

import torch

# The SD scripts live at the repo root and are imported as modules (`import redif`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Every tensor in the suite is small: one thread avoids OpenMP spin-waits that cost more than they save.
torch.set_num_threads(1)
