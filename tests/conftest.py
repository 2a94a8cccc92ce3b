import os

import torch

# triton.jit reads TRITON_INTERPRET when a kernel is decorated (module import), so set it before any test imports one
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite is many small ops on a 2-core machine: extra intra-op threads only spin against each
# other (measured: one align step 2.4 s with the default threads on a busy machine, 30 ms with one).
torch.set_num_threads(1)
