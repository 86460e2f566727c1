import os

import pytest
import torch

# One thread in this process and in the CLI subprocesses the tests start (`--threads auto` respects it).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    # Parity tests compare against the reference bit-for-bit where possible; one thread makes CPU
    # reductions deterministic (the reference oracle itself is deterministic only this way).
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_cfg():
    from glimage.config import PRESETS
    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def ref_pipe(tiny_cfg):
    """The reference GlmImagePipeline (transformers + diffusers) at the tiny preset, random weights."""
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    from reference import build_reference_pipeline
    return build_reference_pipeline(tiny_cfg)


@pytest.fixture(scope="session")
def ref_dir(ref_pipe, tmp_path_factory):
    """The reference pipeline written by its own save_pretrained (the official folder layout)."""
    path = tmp_path_factory.mktemp("tiny_reference")
    ref_pipe.save_pretrained(path)
    return path
