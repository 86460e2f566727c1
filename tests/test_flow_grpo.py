"""The RL stages' mathematics and their runs: Flow-GRPO of the DiT (stage flow_grpo) and the GRPO losses of the AR.

The SDE sampler at noise level 0 is the pipeline's Euler ODE (one step and a whole trajectory); a step's
log-probability is the Gaussian's closed form; a group shares one AR draw and differs in the diffusion noise;
zero advantages leave the weights unchanged apart from the KL term; the clip cuts the gradient of ratios
outside the range; the sampler-side log p of the AR is the sampler's own distribution; 2 ranks equal one
process, and a run killed by SIGKILL resumes exactly (both RL stages).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from glimage.flow import euler_step, gaussian_logprob, get_schedule, sde_step
from glimage.glyph_text import encode_glyphs
from glimage.models.dit import GlmImageDiT
from glimage.sampling import sample, warp
from glimage.train.config import TrainConfig
from glimage.train.losses import clipped_policy_loss, gaussian_kl, kl_k3, sampling_logprobs
from glimage.train.stages.flow_grpo import FlowGRPOStage

TEXTS = ["a red circle", 'a sign that says "AB"']
DATA = [{"record": {"text": t}, "text": t, "index": i} for i, t in enumerate(TEXTS)]
MAIN = str(Path(__file__).parent / "grpo_dist_main.py")


def redness(images, prompts, metadata):
    return [float(np.asarray(im, np.float32)[..., 0].mean() / 255) for im in images]


def flow_stage(tmp_path, reward=redness, **kw):
    cfg = TrainConfig(**{"stage": "flow_grpo", "out": str(tmp_path / "fg"), "image_size": 64, "group_size": 3,
                         "reward_steps": 3, **kw})
    st = FlowGRPOStage(cfg, DATA, reward=reward)
    st.setup(torch.device("cpu"), torch.float32)
    return st, st.build()


def test_sde_step_at_noise_zero_is_the_euler_step_and_its_logprob_the_gaussian():
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    x_next, mean, std = sde_step(x, v, 0.7, 0.45, 0.0, 0.9, noise)
    assert std == 0 and torch.equal(x_next, euler_step(x, v, 0.7, 0.45))  # same process, same ops
    s, dt, a = 0.7, 0.45 - 0.7, 0.8
    x_next, mean, std = sde_step(x, v, s, 0.45, a, 0.9, noise)
    g2 = a * a * s / (1 - s)  # the closed form of Flow-GRPO's eq. 8
    torch.testing.assert_close(mean, x * (1 + g2 * dt / (2 * s)) + v * (1 + g2 * (1 - s) / (2 * s)) * dt)
    torch.testing.assert_close(std, torch.tensor((g2 * -dt) ** 0.5))
    torch.testing.assert_close(x_next, mean + std * noise)
    want = torch.distributions.Normal(mean, std).log_prob(x_next).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_logprob(x_next, mean, std), want)
    _, _, first = sde_step(x, v, 1.0, 0.9, a, 0.9, noise)  # sigma = 1: the cap stands in for it
    torch.testing.assert_close(first, torch.tensor((a * a * 1.0 / 0.1 * 0.1) ** 0.5))
    other = mean + 0.1
    torch.testing.assert_close(gaussian_kl(other, mean, std), (0.01 / (2 * std ** 2)).expand(2))


def test_rollout_at_noise_zero_is_the_pipelines_ode(tmp_path):
    """The whole SDE trajectory at noise level 0 (CFG included) is the pipeline's Euler loop from the same
    prior ids and initial noise."""
    st, model = flow_stage(tmp_path, noise_level=0.0)
    roll = st.rollout(model, TEXTS[1], torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    torch.randint(0, 2**62, (1,), generator=g)  # the AR's seed, drawn first
    x0 = torch.randn(roll.latents.shape, generator=g)
    pipe = st.pipe
    pipe.dit = GlmImageDiT(st.model_cfg.dit).eval()
    pipe.dit.load_state_dict(model.state_dict(), strict=True)
    glyph = encode_glyphs(st.glyph, [TEXTS[1]] * 3, st.device, st.dtype)
    neg = encode_glyphs(st.glyph, [""] * 3, st.device, st.dtype)
    assert st.guidance > 1
    ode = pipe.denoise(x0, glyph, neg, roll.prior, 64, 64, 3, st.guidance)
    torch.testing.assert_close(roll.latents, ode, rtol=0, atol=1e-6)
    assert (roll.prior == roll.prior[:1]).all()


def test_a_group_shares_its_prior_and_differs_in_the_noise(tmp_path):
    st, model = flow_stage(tmp_path, noise_level=0.7, kl_coef=0.1)
    roll = st.rollout(model, TEXTS[0], torch.Generator().manual_seed(1))
    assert (roll.prior == roll.prior[:1]).all() and len(roll.images) == 3
    assert (roll.latents[0] - roll.latents[1]).abs().mean() > 1e-3
    assert roll.logp.shape == (3, 3) and roll.logp.requires_grad
    assert torch.equal(roll.kl.detach(), torch.zeros(3, 3))  # the policy is still the reference


def test_zero_advantages_leave_the_weights_unchanged_apart_from_the_kl_term(tmp_path):
    const = lambda images, prompts, metadata: [0.5] * len(images)  # noqa: E731
    st, model = flow_stage(tmp_path, reward=const)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = st.step(model, st.collate(DATA), torch.Generator().manual_seed(0))
    out.loss_sum.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # with a KL term and a policy moved off the reference, the loss is the KL term alone
    st, model = flow_stage(tmp_path, reward=const, kl_coef=0.5)
    with torch.no_grad():
        model.proj_out.weight.add_(0.05)
    out = st.step(model, st.collate(DATA), torch.Generator().manual_seed(0))
    assert out.metrics["kl"] > 0
    torch.testing.assert_close(out.loss_sum.detach(), 0.5 * out.metrics["kl"], rtol=1e-5, atol=1e-6)
    out.loss_sum.backward()
    assert model.proj_out.weight.grad.abs().sum() > 0


def test_clipped_ratio_cuts_the_gradient_outside_the_range():
    logp = torch.tensor([[0.0, 0.5], [0.0, -0.5]], requires_grad=True)
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    loss, count, clipped = clipped_policy_loss(logp, old, adv, 0.2)
    loss.backward()
    assert count.item() == 4 and clipped.item() == 2
    # A > 0 with r = e^0.5 > 1.2, and A < 0 with r = e^-0.5 < 0.8: clipped, no gradient; r = 1: -A
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    on, _, _ = clipped_policy_loss(logp, logp.detach(), adv, 0.2)
    torch.testing.assert_close(on, -adv.sum() * 2)  # on-policy: r = 1, the value is -sum A
    a = torch.tensor([-1.0, 0.0, 2.0])
    assert torch.equal(kl_k3(a, a), torch.zeros(3)) and (kl_k3(a, torch.zeros(3))[[0, 2]] > 0).all()


def test_ar_logp_is_the_samplers_own_distribution():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 40) * 3
    probs = torch.softmax(warp(logits.reshape(15, 40), 0.9, 8, 0.75, 32), -1)
    tokens = sample(logits.reshape(15, 40), 0.9, 8, 0.75, 32, torch.Generator().manual_seed(0)).view(3, 5)
    logp, entropy, tail = sampling_logprobs(logits, tokens, 0.9, 8, 0.75, 32)
    torch.testing.assert_close(logp.exp().flatten(), probs.gather(1, tokens.reshape(15, 1))[:, 0])
    p = probs.clamp(min=1e-30)
    torch.testing.assert_close(entropy.flatten(), -(probs * p.log()).sum(-1))
    kept = probs > 0
    full = torch.softmax(logits.reshape(15, 40) / 0.9, -1)
    torch.testing.assert_close(tail.flatten(), (full * ~kept).sum(-1))
    # a token just outside the recomputed nucleus (last-bit differences) keeps a finite log p
    outside = torch.where(kept, -1.0, 1.0).argmax(-1).view(3, 5)
    assert torch.isfinite(sampling_logprobs(logits, outside, 0.9, 8, 0.75, 32)[0]).all()


def _args(tmp_path, stage):
    common = ["--set", "preset=tiny", "base=", "steps=3", "batch_size=4", "group_size=2", "reward=redness",
              "reward_steps=2", "image_size=64", "warmup=1", "lr=1e-3", "checkpoint_every=1", "tensorboard=false",
              f"data={tmp_path / 'data'}", "kl_coef=0.1"]
    if stage == "grpo":
        return ["shapes-grpo", *common, "model.ar.preview_side=4"]
    return ["shapes-flow-grpo", *common, "grad_accum=1", "train_glyph=false"]


def _run(cmd, env=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("stage", ["flow_grpo", "grpo"])
def test_sigkill_then_rerun_resumes_exactly_and_two_ranks_equal_one(tmp_path, stage):
    from glimage.data.shapes import generate_shapes
    generate_shapes(tmp_path / "data", 12, seed=0)
    args = _args(tmp_path, stage)
    runs = {}
    for name, n in (("one", 1), ("two", 2)):
        out = tmp_path / name
        cmd = [sys.executable, MAIN, *args, f"out={out}"]
        if n > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", MAIN,
                   *args, f"out={out}"]
        res = _run(cmd, {"OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = [json.loads(line) for line in open(out / "metrics.jsonl")]
    killed = tmp_path / "killed"
    res = _run([sys.executable, MAIN, *args, f"out={killed}"], {"OMP_NUM_THREADS": "1",
                                                               "GLIMAGE_TRAIN_FAULT": "after_step:2"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    res = _run([sys.executable, MAIN, *args, f"out={killed}"], {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    runs["killed"] = [json.loads(line) for line in open(killed / "metrics.jsonl")]
    assert (killed / "curves.png").is_file() and (tmp_path / "one" / "curves.png").stat().st_size > 1000
    for other in ("two", "killed"):
        assert [r["step"] for r in runs[other]] == [1, 2, 3]
        for a, b in zip(runs["one"], runs[other]):
            for k in ("reward", "loss", "kl", "clip_frac"):
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (other, k, a, b)
    assert runs["one"][-1]["kl"] > 0  # the policy moved off the reference
    part = "transformer" if stage == "flow_grpo" else "vision_language_encoder"
    name = "diffusion_pytorch_model.safetensors" if stage == "flow_grpo" else "model.safetensors"
    ref = load_file(tmp_path / "one" / "export" / part / name)
    for other in ("two", "killed"):
        w = load_file(tmp_path / other / "export" / part / name)
        assert w.keys() == ref.keys()
        for k in ref:
            if k.endswith("k_proj.bias"):  # no gradient; Adam turns rounding noise into lr-sized steps
                continue
            torch.testing.assert_close(w[k], ref[k], rtol=1e-5, atol=1e-5, msg=f"{other} {k}")


def test_noise_level_zero_cannot_train(tmp_path):
    st, model = flow_stage(tmp_path, noise_level=0.0)
    with pytest.raises(ValueError, match="noise_level=0"):
        st.step(model, st.collate(DATA), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="noise_level"):
        TrainConfig(stage="flow_grpo", noise_level=-1)
    with pytest.raises(ValueError, match="group_size=1"):
        TrainConfig(stage="flow_grpo", group_size=1)
    with pytest.raises(ValueError, match="kl_coef=0.1 is for the RL stages"):
        TrainConfig(stage="decoder", kl_coef=0.1)
    assert get_schedule(3, 64, 64, st.model_cfg.scheduler)[1][0] == 1.0  # the step the cap is for


def test_lora_trains_the_adapters_alone_and_the_glyph_encoder_can_train(tmp_path):
    st, model = flow_stage(tmp_path, lora_rank=4)
    with torch.no_grad():  # B = 0 at the start: give the adapters a value so A receives a gradient too
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.01)
    out = st.step(model, st.collate(DATA), torch.Generator().manual_seed(0))
    out.loss_sum.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
    # the reference policy of a LoRA run is the model with its adapters off, not a second copy
    st, model = flow_stage(tmp_path, lora_rank=4, kl_coef=0.1)
    assert st.ref is None and st.has_reference
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    base = flow_stage(tmp_path)[1].eval()  # the same seeded init, no adapters
    x = torch.randn(3, st.model_cfg.dit.in_channels, 8, 8)  # 64 px, VAE x8
    prior, t = torch.zeros(3, 16, dtype=torch.long), torch.full((3,), 500.0)
    glyphs = st.glyph_inputs(model, TEXTS[:1] * 3)
    with torch.no_grad(), st.reference(model) as ref:
        v_ref = st.velocity(ref, x, glyphs, prior, t)
    torch.testing.assert_close(v_ref, st.velocity(base, x, glyphs, prior, t))
    assert not torch.allclose(st.velocity(model, x, glyphs, prior, t), v_ref)  # adapters back on
    roll = st.rollout(model, TEXTS[0], torch.Generator().manual_seed(2))
    assert roll.kl.detach().sum() > 0
    st, model = flow_stage(tmp_path, train_glyph=True)
    out = st.step(model, st.collate(DATA), torch.Generator().manual_seed(0))
    out.loss_sum.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.glyph_encoder.parameters())
