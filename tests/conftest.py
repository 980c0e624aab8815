"""Shared fixtures: small models built from config with an in-process tokenizer, and small data files."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from sparseft.models.tiny import build_tiny_model  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(arch) -> path of a saved tiny model + tokenizer of that family (built once per session)."""
    cache: dict[str, str] = {}

    def make(arch: str = "llama", **overrides) -> str:
        key = arch + repr(sorted(overrides.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = str(build_tiny_model(out, arch, **overrides))
        return cache[key]

    return make


@pytest.fixture(autouse=True)
def _torch_threads():
    # SPARSEFT_TEST_THREADS: fewer where test processes run side by side (make mutate runs two at once).
    torch.set_num_threads(int(os.environ.get("SPARSEFT_TEST_THREADS", "2")))
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` check paths only a CUDA device takes; without one they are skipped (scripts/gpu_check.sh
    runs them on a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_check.sh runs it on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
