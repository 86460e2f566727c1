"""The real `glimage train` command under torchrun (2 CPU ranks, gloo, FSDP2) == one process.

The decoder stage is the stochastic one (posterior noise, timesteps, flow noise, condition dropout): its
noise is drawn per sample from seeds of the sample's place in the global batch, so 2 ranks x 1 micro-batch
and 1 process x 1 micro-batch see identical numbers for the same global batch.
"""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

ARGS = ["tiny-decoder", "--set", "base=", "steps=3", "batch_size=4", "data_n=8", "image_size=64", "checkpoint_every=0",
        "cache=false", "ema=0.5", "cond_drop=0.5", "tensorboard=false"]


def _train(out, nproc):
    cmd = [sys.executable, "-m", "glimage.cli", "train", *ARGS, f"out={out}", f"data={out.parent / 'data'}"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "glimage.cli", "train", *ARGS, f"out={out}", f"data={out.parent / 'data'}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_decoder_two_ranks_equal_one_process(tmp_path):
    from glimage.data.shapes import generate_shapes
    generate_shapes(tmp_path / "data", 8, seed=0)
    one = _train(tmp_path / "one", 1)
    two = _train(tmp_path / "two", 2)
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)
    wa = load_file(tmp_path / "one" / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "two" / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5)
