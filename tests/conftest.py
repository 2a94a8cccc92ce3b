import os

import torch

# triton.jit reads TRITON_INTERPRET when a kernel is decorated (module import), so set it before any test imports one
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
