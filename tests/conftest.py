import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None)
settings.register_profile("dev", max_examples=15, deadline=None)
settings.register_profile("thorough", max_examples=400, deadline=None)  # before a release: flush out rare cases
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
