import os
import sys

import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)
settings.register_profile("default", max_examples=40, deadline=None)
settings.load_profile("default")
