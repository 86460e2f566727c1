"""Flow-matching schedule and sampler steps of the GLM-Image decoder, as small functions.

Reproduces what `GlmImagePipeline.__call__` does with `FlowMatchEulerDiscreteScheduler`
(use_dynamic_shifting=True): an integer timestep grid linspace(1000, 1, N+1)[:-1], sigmas = t/1000 shifted by a
resolution-dependent mu, terminal sigma 0. The quirk to keep: only the *sigmas* are shifted. The DiT is
conditioned on the unshifted grid minus one (999, ...), while the Euler update moves the latents by the
shifted sigmas: x <- x + (sigma_next - sigma) * v, in fp32. Velocity v ~ noise - x0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from glimage.config import SchedulerConfig

from .validate import InputError


def shift_sigmas(sigmas: torch.Tensor, mu: float, kind: str = "linear") -> torch.Tensor:
    """Resolution-dependent time shift: a / (a + (1/sigma - 1)) with a = mu ("linear") or e^mu ("exponential").

    sigma 1 stays 1, sigma 0 stays 0, everything in between moves towards 1 (noisier) for mu > 0."""
    if kind == "linear":
        a = mu
    elif kind == "exponential":
        a = math.exp(mu)
    else:
        raise InputError(f"shift kind must be 'linear' or 'exponential', got {kind!r}")
    # Explicit tensor ops in the sigmas' dtype: the reference computes in float32 numpy, and `scalar / tensor`
    # in torch multiplies by a reciprocal (one rounding more).
    a = torch.full_like(sigmas, a)
    return a / (a + (torch.ones_like(sigmas) / sigmas - 1))


def image_seq_len(height: int, width: int, vae_scale: int = 8, patch: int = 2) -> int:
    """Number of DiT image tokens for a height x width pixel image (the pipeline's floor arithmetic)."""
    return ((height // vae_scale) * (width // vae_scale)) // (patch ** 2)


def compute_mu(image_seq_len: int, cfg: SchedulerConfig) -> float:
    """mu = sqrt(seq / base_image_seq_len) * max_shift + base_shift (pipeline's `calculate_shift`).

    Note: max_shift is the slope, not a cap (1024^2: mu = 2 * 0.75 + 0.25 = 3.25)."""
    m = (image_seq_len / cfg.base_image_seq_len) ** 0.5
    return m * cfg.max_shift + cfg.base_shift


def get_schedule(num_steps: int, height: int, width: int, cfg: SchedulerConfig, vae_scale: int = 8,
                 patch: int = 2, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (N,), sigmas (N+1,)), both float32.

    timesteps are the values the reference pipeline feeds the DiT at step i: its unshifted integer grid
    t_i = int(linspace(T, 1, N+1)[i]) minus one (T = num_train_timesteps; 999 first). sigmas are
    shift_sigmas(t_i / T, mu) with a terminal 0, bit-equal to the scheduler's `sigmas`."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) \
            or not 1 <= num_steps <= cfg.num_train_timesteps:
        raise InputError(f"num_steps must be an integer in [1, {cfg.num_train_timesteps}], got {num_steps!r}")
    if height <= 0 or width <= 0:
        raise InputError(f"height and width must be positive, got {height}x{width}")
    # numpy on purpose: torch.linspace rounds differently, and the int64 truncation below exposes it.
    t = np.linspace(cfg.num_train_timesteps, 1.0, num_steps + 1)[:-1].astype(np.int64).astype(np.float32)
    sigmas = torch.from_numpy(t / np.float32(cfg.num_train_timesteps))
    mu = compute_mu(image_seq_len(height, width, vae_scale, patch), cfg)
    sigmas = torch.cat([shift_sigmas(sigmas, mu, cfg.time_shift_type), torch.zeros(1)])
    timesteps = torch.from_numpy(t) - 1
    return timesteps.to(device), sigmas.to(device)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """x + (sigma_next - sigma) * v in fp32 (the scheduler upcasts the sample; returns fp32)."""
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    return x.float() + dt * v.float()  # a 0-dim CPU dt acts as a scalar on any device


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance: float | torch.Tensor) -> torch.Tensor:
    """v_u + g (v_c - v_u); g a number or one per sample, (B,) (a batch of requests with their own scales).
    The reference pipeline only runs the unconditional branch when g > 1 (and then uses v_cond alone), so
    callers should skip this for g <= 1 to match it bit for bit."""
    if isinstance(guidance, torch.Tensor):
        if not bool((guidance >= 0).all()):  # also rejects NaN
            raise InputError(f"guidance must be >= 0, got {guidance.tolist()}")
        guidance = guidance.to(v_cond.dtype).view(-1, *[1] * (v_cond.ndim - 1))
    elif not guidance >= 0:
        raise InputError(f"guidance must be >= 0, got {guidance!r}")
    return v_uncond + guidance * (v_cond - v_uncond)


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, noise_level: float, sigma_cap,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of Flow-GRPO's SDE sampler (Liu et al. 2025, eq. 8): the reverse-time SDE with the Euler ODE's
    marginals, discretised with Euler-Maruyama. -> (x_next, mean, std), x_next = mean + std * noise.

    With s = sigma, dt = sigma_next - s < 0 and the diffusion g = noise_level * sqrt(s / (1 - s)):
        mean = x (1 + g^2 dt / 2s) + v (1 + g^2 (1 - s) / 2s) dt,    std = g sqrt(-dt)
    so each step is a Gaussian policy N(mean, std^2) over x_next. noise_level 0 is the Euler step exactly.
    sigma_cap stands in for s where s = 1 (the first step, where g would be infinite): Flow-GRPO's sigmas[1].
    noise None: x_next = mean (compute the mean of a recorded step)."""
    s = torch.as_tensor(sigma, dtype=torch.float32)
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - s
    g2 = noise_level ** 2 * s / (1 - torch.where(s >= 1, torch.as_tensor(sigma_cap, dtype=torch.float32), s))
    x, v = x.float(), v.float()
    mean = x * (1 + g2 * dt / (2 * s)) + v * (1 + g2 * (1 - s) / (2 * s)) * dt
    std = (g2 * -dt).sqrt()
    x_next = mean if noise is None else mean + std * noise.float()
    return x_next, mean, std


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) averaged over all but the first dim, (B,): the per-step log-probability of
    Flow-GRPO (a mean, not a sum, over the latent's values, so ratios stay near 1 at any resolution)."""
    std = torch.as_tensor(std, dtype=torch.float32)
    lp = -((x.float() - mean.float()) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)
