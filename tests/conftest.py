import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test models are dominated by per-op overhead; on a shared 2-core machine one thread is much faster.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> str:
    """A tiny random CLIP vision encoder saved with `save_pretrained`, as a user's local checkpoint."""
    from helpers import tiny_clip_config
    from transformers import CLIPVisionModel

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("clip")
    CLIPVisionModel(tiny_clip_config()).save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
