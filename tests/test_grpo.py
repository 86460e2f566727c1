"""GRPO on the AR (stage grpo) and the pipeline's prior_token_ids, on the tiny preset.

The policy draws the very tokens inference draws (same weights, same generator); advantages are normalised per
group; one gradient step on the stage's loss raises sum_i A_i log p_i of its own draw; a group without reward
spread gives no gradient; the stage runs through the training loop and exports a loadable folder. (2 ranks = 1
process and SIGKILL + rerun: tests/test_flow_grpo.py, for both RL stages.)
"""

import copy
import json

import numpy as np
import pytest
import torch

from glimage.models.ar import GlmImageAR
from glimage.pipeline import GlmImagePipeline
from glimage.prior import run_prior
from glimage.prompt import build_prompts
from glimage.sampling import generate_grid_tokens
from glimage.train.config import TrainConfig, load_config
from glimage.train.losses import clipped_policy_loss, group_advantages, token_logprobs
from glimage.train.stages.grpo import GRPOStage, _Sampler
from glimage.train.stages.rl import PromptRecords

SMALL_AR = {"ar.preview_side": 4}
TEXTS = ["a red circle", "a blue square at the top of a rather long caption"]  # the second forces left padding
DATA = [{"record": {"text": t}, "text": t, "index": i} for i, t in enumerate(TEXTS)]


def redness(images, prompts, records):
    return [float(np.asarray(im, dtype=np.float32)[..., 0].mean() / 255) for im in images]


def grpo_stage(tmp_path, reward=redness, **kw):
    cfg = TrainConfig(stage="grpo", out=str(tmp_path / "grpo"), model=SMALL_AR, image_size=64, group_size=3,
                      reward_steps=2, **kw)
    st = GRPOStage(cfg, DATA, reward=reward)
    st.setup(torch.device("cpu"), torch.float32)
    model = st.build()
    torch.manual_seed(0)
    with torch.no_grad():  # a random init with zero biases samples nearly uniform ids: give it structure
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    st.ref = copy.deepcopy(model).requires_grad_(False)  # the reference policy is the starting one
    return st, model


def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1], [0, 0.5, 1, 0]])
    a = group_advantages(r)
    torch.testing.assert_close(a.mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(a[0], torch.tensor([1.0, -1, -1, 1]), atol=1e-4, rtol=0)
    assert torch.equal(a[1], torch.zeros(4))  # no spread, no signal
    torch.testing.assert_close(a[2].std(unbiased=False), torch.tensor(1.0), atol=1e-4, rtol=0)
    # a group that differs only by rounding: no signal, not float noise blown up to unit advantages
    near = torch.tensor([[1.0, 1.0, 1.0, 1.0 - 1e-7], [0.7, 0.7, 0.7, 0.7]])
    assert torch.equal(group_advantages(near), torch.zeros(2, 4))
    torch.testing.assert_close(group_advantages(r, scale=False)[2], torch.tensor([-0.375, 0.125, 0.625, -0.375]))


def test_on_policy_loss_is_advantage_weighted_log_likelihood():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 5))
    adv = torch.tensor([1.5, -0.5])
    logp, _ = token_logprobs(logits, tokens, temperature=0.8)
    loss, count, clipped = clipped_policy_loss(logp, logp.detach(), adv, 0.2)
    want = torch.log_softmax(logits / 0.8, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(logp, want)
    assert count.item() == 10 and clipped.item() == 0
    (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g_want,) = torch.autograd.grad(-(adv[:, None] * want).sum(), logits)
    torch.testing.assert_close(g, g_want)  # the gradient of -A log p
    picked = g.gather(-1, tokens[..., None])[..., 0]
    assert (picked[0] < 0).all() and (picked[1] > 0).all()  # descent raises the good draw, lowers the bad one


def test_policy_draws_the_tokens_inference_draws(tmp_path):
    st, model = grpo_stage(tmp_path)
    ar = GlmImageAR(st.ar_cfg).eval()
    ar.load_state_dict({**model.state_dict(), **st.enc.state_dict()}, strict=True)
    prompts = build_prompts(TEXTS, 64, 64, st.tok, st.ar_cfg)
    cfg = st.ar_cfg
    with torch.no_grad():
        ours = generate_grid_tokens(_Sampler(model), prompts, cfg.temperature, cfg.top_k, cfg.top_p,
                                    torch.Generator().manual_seed(3), progress=False)
    ref = run_prior(ar, st.tok, TEXTS, 64, 64, None, torch.Generator().manual_seed(3), progress=False).tokens
    assert torch.equal(ours, ref)
    assert len(set(ours[0].tolist())) > 1


def test_a_step_raises_the_advantage_weighted_likelihood_of_its_draw(tmp_path):
    st, model = grpo_stage(tmp_path)
    texts = [t for t in TEXTS for _ in range(3)]
    tokens, prompts, images = st.draw(model, texts, torch.Generator().manual_seed(0))
    assert len(images) == 6 and images[0].size == (64, 64)
    adv = group_advantages(torch.tensor(redness(images, None, None)).view(2, 3)).flatten()
    assert adv.abs().sum() > 0
    loss, count, metrics = st.policy_loss(model, texts, tokens, prompts, adv)
    assert metrics["kl"].item() == 0  # the policy is still the reference
    (loss / count).backward()
    before = (adv[:, None] * st.token_logprobs(model, texts, tokens, prompts)[0]).sum().item()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-2 * p.grad
        after = (adv[:, None] * st.token_logprobs(model, texts, tokens, prompts)[0]).sum().item()
        assert st.policy_loss(model, texts, tokens, prompts, adv)[2]["kl"].item() > 0
    assert after > before


def test_no_reward_spread_gives_no_gradient(tmp_path):
    st, model = grpo_stage(tmp_path, reward=lambda images, prompts, records: [1.0] * len(images))
    out = st.step(model, st.collate(DATA), torch.Generator().manual_seed(0))
    out.loss_sum.backward()
    assert out.loss_sum.item() == 0 and out.metrics["reward"].item() == out.count.item()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_positive_only_reinforces_the_better_draws_alone(tmp_path):
    st, model = grpo_stage(tmp_path, positive_only=True)
    out = st.step(model, st.collate(DATA), torch.Generator().manual_seed(0))
    # on-policy the surrogate's value is -sum of the advantages (r = 1): negative when only A >= 0 are kept,
    # zero when the group-centred ones all are (same draws: same seeds)
    assert out.loss_sum.item() < -1
    plain, model2 = grpo_stage(tmp_path)
    both = plain.step(model2, plain.collate(DATA), torch.Generator().manual_seed(0))
    assert abs(both.loss_sum.item()) < 1e-3 * both.count.item()
    assert out.metrics["reward"].item() == both.metrics["reward"].item()
    with pytest.raises(ValueError, match="positive_only"):
        TrainConfig(stage="ar", positive_only=True)


def test_grpo_runs_through_the_training_loop_and_exports(tmp_path):
    loop = pytest.importorskip("glimage.train.loop")
    cfg = load_config("shapes-grpo", ["preset=tiny", "base=", "steps=2", "data_n=12", "batch_size=2", "group_size=2",
                                      "reward_steps=1", "image_size=64", "model.ar.preview_side=4", "warmup=1",
                                      "checkpoint_every=0", "tensorboard=false", f"out={tmp_path / 'g'}"])
    export = loop.train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and all(0 <= x["reward"] <= 1 for x in lines)
    pipe = GlmImagePipeline.from_pretrained(export, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", height=64, width=64, num_inference_steps=1, seed=0).images[0].size == (64, 64)


def test_prompt_records_need_metadata(tmp_path):
    with pytest.raises(ValueError, match="metadata.jsonl"):
        PromptRecords(tmp_path)
    with pytest.raises(ValueError, match="group_size=1"):
        TrainConfig(stage="grpo", group_size=1)


def test_prior_token_ids_skip_the_ar():
    pipe = GlmImagePipeline.from_config("tiny", seed=0, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.generate_prior_tokens("a red circle", 64, 64, seed=5)
    ds = 2 ** (len(pipe.vae.cfg.block_out_channels) - 1)
    latents = torch.randn(1, pipe.dit.cfg.in_channels, 64 // ds, 64 // ds, generator=torch.Generator().manual_seed(1))
    kw = dict(height=64, width=64, num_inference_steps=2, latents=latents, output_type="np")
    full = pipe("a red circle", seed=5, **kw).images
    given = pipe("a red circle", prior_token_ids=ids, seed=99, **kw).images
    np.testing.assert_array_equal(full, given)
    with pytest.raises(ValueError, match=r"shape \(1, 16\)"):
        pipe("a red circle", prior_token_ids=ids[:, :3], **kw)
    with pytest.raises(ValueError, match="text-to-image"):
        pipe("a red circle", image=[np.zeros((64, 64, 3), np.uint8)], prior_token_ids=ids, **kw)
