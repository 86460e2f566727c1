"""Flow-matching schedule/sampler functions against FlowMatchEulerDiscreteScheduler and GlmImagePipeline."""

import numpy as np
import pytest
import torch

from glimage.config import SchedulerConfig
from glimage.flow import cfg_combine, compute_mu, euler_step, get_schedule, image_seq_len, shift_sigmas

SIZES = [(64, 96), (512, 512), (1024, 1024), (2048, 2048), (1152, 768), (1024, 1152), (2048, 512)]


def reference_schedule(num_steps, height, width, cfg):
    """What GlmImagePipeline.__call__ does before its denoising loop (step 7, 'Prepare timesteps')."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=cfg.num_train_timesteps, use_dynamic_shifting=True, time_shift_type=cfg.time_shift_type,
        base_image_seq_len=cfg.base_image_seq_len, base_shift=cfg.base_shift, max_shift=cfg.max_shift)
    seq = ((height // 8) * (width // 8)) // 2 ** 2
    t = np.linspace(cfg.num_train_timesteps, 1.0, num_steps + 1)[:-1].astype(np.int64).astype(np.float32)
    mu = calculate_shift(seq, cfg.base_image_seq_len, cfg.base_shift, cfg.max_shift)
    retrieve_timesteps(sched, num_steps, "cpu", t, t / cfg.num_train_timesteps, mu=mu)
    return sched


@pytest.mark.parametrize("kind", ["linear", "exponential"])
@pytest.mark.parametrize("num_steps", [1, 4, 28, 50, 999])
def test_schedule_matches_scheduler(kind, num_steps):
    cfg = SchedulerConfig(time_shift_type=kind)
    for height, width in SIZES:
        sched = reference_schedule(num_steps, height, width, cfg)
        timesteps, sigmas = get_schedule(num_steps, height, width, cfg)
        assert sigmas.dtype == timesteps.dtype == torch.float32
        # float32 against diffusers' own arithmetic: equal here, but libm/SIMD paths differ between CPUs, so
        # allow a few ulps (sigmas <= 1, timesteps <= 1000)
        torch.testing.assert_close(sigmas, sched.sigmas, rtol=0, atol=1e-6, msg=f"{height}x{width}")
        torch.testing.assert_close(timesteps, sched.timesteps - 1, rtol=0, atol=1e-3, msg=f"{height}x{width}")
        assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())


def test_mu_values():
    cfg = SchedulerConfig()
    for (h, w), mu in {(512, 512): 1.75, (1024, 1024): 3.25, (2048, 2048): 6.25}.items():
        assert compute_mu(image_seq_len(h, w), cfg) == mu
    assert image_seq_len(1152, 768) == 3456 and compute_mu(3456, cfg) == pytest.approx(3.0057, abs=1e-4)
    timesteps, sigmas = get_schedule(4, 64, 96, cfg)
    assert timesteps.tolist() == [999, 749, 499, 249]  # the unshifted grid 1000, 750, ... minus one
    torch.testing.assert_close(sigmas, torch.tensor([1, .590, .324, .138, 0]), atol=1e-3, rtol=0)


def test_shift_sigmas():
    s = torch.linspace(1, 0, 11)
    lin, exp = shift_sigmas(s, 1.5), shift_sigmas(s, 1.5, "exponential")
    for out in (lin, exp):
        assert out[0] == 1 and out[-1] == 0 and bool((out[1:-1] > s[1:-1]).all())
    torch.testing.assert_close(shift_sigmas(s, 0.0, "exponential"), s)  # e^0 = 1: identity
    assert bool((exp[1:-1] > lin[1:-1]).all())  # e^mu > mu
    with pytest.raises(ValueError, match="'cosine'"):
        shift_sigmas(s, 1.0, "cosine")


def test_euler_step_matches_scheduler():
    cfg = SchedulerConfig()
    sched = reference_schedule(4, 64, 96, cfg)
    _, sigmas = get_schedule(4, 64, 96, cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 12, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(1, 4, 8, 12, generator=g)
        expected = sched.step(v, t, x, return_dict=False)[0]
        x_new = euler_step(x, v, sigmas[i], sigmas[i + 1])
        assert torch.equal(x_new, expected)
        assert euler_step(x.bfloat16(), v, sigmas[i], sigmas[i + 1]).dtype == torch.float32
        x = x_new


def test_validation():
    cfg = SchedulerConfig()
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError, match=rf"\[1, 1000\], got {bad}"):
            get_schedule(bad, 512, 512, cfg)
    with pytest.raises(ValueError, match="positive"):
        get_schedule(4, 0, 512, cfg)
    v = torch.ones(2)
    with pytest.raises(ValueError, match=">= 0, got -0.5"):
        cfg_combine(v, v, -0.5)
    with pytest.raises(ValueError, match="nan"):
        cfg_combine(v, v, float("nan"))
    torch.testing.assert_close(cfg_combine(torch.zeros(2), v, 1.5), torch.full((2,), 1.5))


@torch.no_grad()
def test_denoising_loop_matches_pipeline(ref_pipe, ref_dir, tiny_cfg):
    """Run the reference pipeline (prior ids given, so no AR), record every DiT call, then replay the loop
    with get_schedule / cfg_combine / euler_step and our DiT: same DiT inputs, same final latents."""
    from glimage.convert.dit import load_dit
    height, width, steps, guidance = 64, 96, 4, 1.5
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, height // 8, width // 8, generator=g)
    prior = torch.randint(0, 16384, (1, (height // 16) * (width // 16)), generator=g)
    calls = []
    hook = ref_pipe.transformer.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True)
    try:
        expected = ref_pipe(prompt='a sign that says "hi"', height=height, width=width, num_inference_steps=steps,
                            guidance_scale=guidance, latents=latents.clone(), prior_token_ids=prior,
                            output_type="latent").images
    finally:
        hook.remove()
    assert len(calls) == 2 * steps

    dit = load_dit(ref_dir / "transformer").eval()
    timesteps, sigmas = get_schedule(steps, height, width, tiny_cfg.scheduler)
    x, x_replay = latents, latents
    for i in range(steps):
        (cond_kw, cond_out), (uncond_kw, uncond_out) = calls[2 * i], calls[2 * i + 1]
        t = timesteps[i:i + 1]
        assert torch.equal(cond_kw["timestep"], t) and torch.equal(uncond_kw["timestep"], t)
        # replaying the recorded DiT outputs through our sampler functions is bit-exact
        v = cfg_combine(uncond_out.float(), cond_out.float(), guidance)
        x_replay = euler_step(x_replay, v, sigmas[i], sigmas[i + 1])
        inputs = dict(prior_token_id=prior, timestep=t, target_size=torch.tensor([[float(height), float(width)]]),
                      crop_coords=torch.zeros(1, 2))
        keep, drop = torch.zeros_like(prior, dtype=torch.bool), torch.ones_like(prior, dtype=torch.bool)
        v_c = dit(x, cond_kw["encoder_hidden_states"], prior_token_drop=keep, **inputs)
        v_u = dit(x, uncond_kw["encoder_hidden_states"], prior_token_drop=drop, **inputs)
        x = euler_step(x, cfg_combine(v_u, v_c, guidance), sigmas[i], sigmas[i + 1])
    assert torch.equal(x_replay, expected)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
