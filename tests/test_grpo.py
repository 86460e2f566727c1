"""GRPO on the AR (stage grpo) and the pipeline's prior_token_ids, on the tiny preset.

The policy draws the very tokens inference draws (same weights, same generator); advantages are normalised per
group; one gradient step on the stage's loss raises sum_i A_i log p_i of its own draw; a group without reward
spread gives no gradient; the stage runs through the training loop and exports a loadable folder.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from glimage.models.ar import GlmImageAR
from glimage.pipeline import GlmImagePipeline
from glimage.prior import run_prior
from glimage.prompt import build_prompts
from glimage.sampling import generate_grid_tokens
from glimage.train.config import TrainConfig, load_config
from glimage.train.losses import group_advantages, policy_gradient_loss
from glimage.train.stages.grpo import GRPOStage, PromptRecords, _Sampler

SMALL_AR = {"ar.preview_side": 4}
TEXTS = ["a red circle", "a blue square at the top of a rather long caption"]  # the second forces left padding
DATA = [{"record": {"text": t}, "text": t, "index": i} for i, t in enumerate(TEXTS)]


def redness(images, records):
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
    return st, model


def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1], [0, 0.5, 1, 0]])
    a = group_advantages(r)
    torch.testing.assert_close(a.mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(a[0], torch.tensor([1.0, -1, -1, 1]), atol=1e-4, rtol=0)
    assert torch.equal(a[1], torch.zeros(4))  # no spread, no signal
    torch.testing.assert_close(a[2].std(unbiased=False), torch.tensor(1.0), atol=1e-4, rtol=0)


def test_policy_gradient_loss_is_advantage_weighted_log_likelihood():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 5))
    adv = torch.tensor([1.5, -0.5])
    loss, count = policy_gradient_loss(logits, tokens, adv, temperature=0.8)
    logp = torch.log_softmax(logits / 0.8, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(loss, -(adv[:, None] * logp).sum())
    assert count.item() == 10
    loss.backward()
    picked = logits.grad.gather(-1, tokens[..., None])[..., 0]
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
    adv = group_advantages(torch.tensor(redness(images, None)).view(2, 3)).flatten()
    assert adv.abs().sum() > 0
    loss, count = st.policy_loss(model, texts, tokens, prompts, adv)
    (loss / count).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-2 * p.grad
        after, _ = st.policy_loss(model, texts, tokens, prompts, adv)
    assert after < loss.detach()


def test_no_reward_spread_gives_no_gradient(tmp_path):
    st, model = grpo_stage(tmp_path, reward=lambda images, records: [1.0] * len(images))
    out = st.step(model, st.collate(DATA), torch.Generator().manual_seed(0))
    out.loss_sum.backward()
    assert out.loss_sum.item() == 0 and out.metrics["reward"].item() == out.count.item()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_positive_only_reinforces_the_better_draws_alone(tmp_path):
    st, model = grpo_stage(tmp_path, positive_only=True)
    out = st.step(model, st.collate(DATA), torch.Generator().manual_seed(0))
    assert out.loss_sum.item() > 0  # -A log p with A >= 0 (log p < 0): no term pushes a draw down
    plain, model2 = grpo_stage(tmp_path)
    both = plain.step(model2, plain.collate(DATA), torch.Generator().manual_seed(0))
    assert both.loss_sum.item() < out.loss_sum.item()  # same draws (same seeds); the negative terms lower it
    with pytest.raises(ValueError, match="positive_only"):
        TrainConfig(stage="ar", positive_only=True)


def test_grpo_runs_through_the_training_loop_and_exports(tmp_path):
    loop = pytest.importorskip("glimage.train.loop")
    cfg = load_config("shapes-grpo", ["preset=tiny", "base=", "steps=2", "data_n=4", "batch_size=2", "group_size=2",
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


def test_grpo_two_ranks_equal_one_process(tmp_path):
    """Each caption's group is drawn from its own seed (its place in the global batch), so 2 ranks under
    torchrun (gloo, FSDP2) draw, score and update exactly as one process."""
    from glimage.data.shapes import generate_shapes
    generate_shapes(tmp_path / "data", 8, seed=0)
    script = str(Path(__file__).parent / "grpo_dist_main.py")
    args = ["shapes-grpo", "--set", "preset=tiny", "base=", "steps=2", "batch_size=4", "group_size=2",
            "reward=redness", "reward_steps=1", "image_size=64", "model.ar.preview_side=4", "warmup=1",
            "lr=1e-3", "checkpoint_every=0", "tensorboard=false", f"data={tmp_path / 'data'}"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"r{n}"
        cmd = [sys.executable, script, *args, f"out={out}"]
        if n > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script,
                   *args, f"out={out}"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[n] = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for a, b in zip(runs[1], runs[2]):
        assert a["reward"] > 0 and abs(a["reward"] - b["reward"]) <= 1e-6, (a, b)
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)
    wa = load_file(tmp_path / "r1" / "export" / "vision_language_encoder" / "model.safetensors")
    wb = load_file(tmp_path / "r2" / "export" / "vision_language_encoder" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.endswith("k_proj.bias"):  # no gradient (softmax is shift-invariant per query): Adam turns its
            continue  # rounding noise into lr-sized steps, which differ with the batch's padding
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5)
