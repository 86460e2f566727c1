"""CPU weight layouts (glimage.layouts): the same bits out as nn.Linear, the same state dict, the same tokens."""

import numpy as np
import pytest
import torch
from torch import nn

from glimage.layouts import PackedLinear, can_pack, column_major_linears, pack_linears, unpack_linears
from glimage.models.ar import GlmImageAR
from glimage.pipeline import GlmImagePipeline
from glimage.prompt import build_prompts
from glimage.sampling import generate_grid_tokens

needs_onednn_bf16 = pytest.mark.skipif(not can_pack(torch.bfloat16), reason="oneDNN runs no bf16 on this CPU")


def bf16_linear(i: int, o: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias).to(torch.bfloat16)


@needs_onednn_bf16
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_gives_the_same_bits_as_linear(bias):
    lin = bf16_linear(96, 160, bias)
    p = PackedLinear(lin)
    assert p.packed is None  # reordered at the first call, not at load
    for shape in ((1, 96), (1, 1, 96), (3, 96), (2, 40, 96)):  # decode rows, prefill rows
        x = torch.randn(shape).to(torch.bfloat16)
        # the same oneDNN product: bit for bit on the CPUs measured (AMD EPYC); within bf16's rounding anywhere
        torch.testing.assert_close(p(x), lin(x), rtol=8e-3, atol=1e-2)
    assert p.plain is None and p.packed is not None
    assert torch.equal(p.weight, lin.weight)


@needs_onednn_bf16
def test_packed_state_dict_is_the_linears_and_loads_strictly():
    lin = bf16_linear(32, 48, True)
    p = PackedLinear(lin)
    p(torch.randn(1, 32).to(torch.bfloat16))
    sd = p.state_dict()
    assert sd.keys() == lin.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in lin.state_dict().items())
    other = PackedLinear(bf16_linear(32, 48, True, seed=1))
    x = torch.randn(2, 32).to(torch.bfloat16)
    assert not torch.equal(other(x), lin(x))
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), lin(x), rtol=8e-3, atol=1e-2)
    assert torch.equal(other.weight, lin.weight)
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        other.load_state_dict({"bias": sd["bias"]})
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        other.load_state_dict({**sd, "extra": sd["bias"]})
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        other.load_state_dict({**sd, "weight": sd["weight"][:10]})


def test_only_dtypes_onednn_runs_are_packed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16)))
    n = pack_linears(model)
    assert isinstance(model[0], nn.Linear)  # fp32: F.linear, whose bits the fp32 parity depends on
    assert n == int(can_pack(torch.bfloat16)) and isinstance(model[1][0], PackedLinear) == can_pack(torch.bfloat16)
    back = unpack_linears(model)
    assert all(type(m) is nn.Linear for m in (back[0], back[1][0]))
    column_major_linears(back)
    assert back[0].weight.t().is_contiguous() and back[1][0].weight.is_contiguous()  # column-major: fp32 only


@needs_onednn_bf16
def test_bf16_pipeline_packs_its_ar_and_draws_the_reference_layouts_tokens(tmp_path):
    pipe = GlmImagePipeline.from_config("tiny", seed=0, device="cpu", dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.ar.lm_head, PackedLinear)
    assert isinstance(pipe.ar.language_model.layers[0].mlp.gate_up_proj, PackedLinear)
    # the same weights as plain nn.Linears, loaded strictly from the packed model's state dict
    plain = GlmImageAR(pipe.ar.cfg).to(torch.bfloat16)
    plain.load_state_dict(pipe.ar.state_dict())
    batch = build_prompts(["a red circle"], 64, 64, pipe.tokenizer, pipe.ar.cfg)
    draw = [generate_grid_tokens(m, batch, 0.9, 50, 0.95, torch.Generator().manual_seed(1), progress=False)
            for m in (pipe.ar, plain)]
    assert torch.equal(draw[0], draw[1])
    pipe.save_pretrained(tmp_path)  # the checkpoint holds plain weights, bit for bit
    again = GlmImagePipeline.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    for (k, a), b in zip(pipe.ar.state_dict().items(), again.ar.state_dict().values()):
        assert torch.equal(a, b), k
    pipe.enable_fast(ar_int8=True)  # the int8 mode reads the packed weights' values
    out = pipe("a red circle", height=64, width=64, num_inference_steps=2, seed=0, output_type="np")
    assert np.isfinite(out.images).all()


@needs_onednn_bf16
def test_a_lora_merges_into_a_packed_ar_as_into_a_plain_one(tmp_path):
    from glimage.train.lora import apply_lora, save_lora
    cfg = GlmImagePipeline.from_config("tiny", seed=0, device="cpu", dtype=torch.bfloat16).ar.cfg
    donor = GlmImageAR(cfg)
    apply_lora(donor, rank=2, alpha=4.0, targets=("language_model.layers.*.mlp.*",))
    for n, p in donor.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.5)  # B starts at zero: make the adapter change something
    save_lora(donor, tmp_path)
    pipe = GlmImagePipeline.from_config("tiny", seed=0, device="cpu", dtype=torch.bfloat16)
    plain = GlmImageAR(cfg).to(torch.bfloat16)
    plain.load_state_dict(pipe.ar.state_dict())
    key = "language_model.layers.0.mlp.gate_up_proj.weight"
    before = plain.state_dict()[key].clone()
    pipe.load_lora_weights(tmp_path, "vision_language_encoder")
    from glimage.train.lora import apply_lora_file
    apply_lora_file(plain, tmp_path)
    assert isinstance(pipe.ar.language_model.layers[0].mlp.gate_up_proj, PackedLinear)  # packed again after
    for (k, a), b in zip(pipe.ar.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(pipe.ar.state_dict()[key], before)


@needs_onednn_bf16
def test_first_calls_from_two_threads_pack_once_and_agree():
    from concurrent.futures import ThreadPoolExecutor
    lin = bf16_linear(256, 512, True)
    p = PackedLinear(lin)
    x = torch.randn(1, 256).to(torch.bfloat16)
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: p(x), range(8)))
    assert all(torch.equal(o, outs[0]) for o in outs) and p.plain is None
    torch.testing.assert_close(outs[0], lin(x), rtol=8e-3, atol=1e-2)
