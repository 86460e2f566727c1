"""Losses of the training stages, as small functions returning (sum, count) pairs.

Every loss is a *sum* over its elements plus the number of elements, so the loop can normalise by the count of
the whole global batch (see stage.py): any split over ranks and accumulation steps gives the same gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.vae import DiagonalGaussian

IGNORE = -100


def ar_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token CE over the visual head: logits (B, N, V), targets (B, N) with IGNORE where masked.
    Computed in fp32 (logits may be bf16) over the whole head, so the model also learns to keep the ids that
    never stand in a grid (specials, unused codes) improbable -- the reference samples without masking them."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, (targets != IGNORE).sum().to(torch.float32)


def flow_loss(v_pred: torch.Tensor, v_target: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE of the velocity, one term per DiT token: mean over the token's C*p*p values, summed over tokens.
    v (B, C, h, w); count = B * (h/p) * (w/p), so tokens/s in the logs are DiT tokens."""
    se = (v_pred.float() - v_target.float()).pow(2)
    n_tokens = se.shape[0] * (se.shape[2] // patch) * (se.shape[3] // patch)
    return se.sum() / (se.shape[1] * patch * patch), torch.tensor(float(n_tokens), device=se.device)


def vae_loss(x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian,
             kl_weight: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per pixel: L1 + L2 (mean over RGB) + kl_weight * KL of the image / number of its pixels.

    Sum over pixels; count = pixels. The KL is per image summed over the latent (LDM/diffusers convention), spread
    evenly over the image's pixels, so loss_sum / count = mean L1 + mean L2 + kl_weight * KL_image / pixels."""
    B, C, H, W = x.shape
    diff = recon.float() - x.float()
    l1 = diff.abs().sum() / C
    l2 = diff.pow(2).sum() / C
    kl = posterior.kl().float().sum()
    loss = l1 + l2 + kl_weight * kl
    # metrics are sums normalised by the count (pixels) in the logs: kl * H * W logs the mean KL per image
    return loss, torch.tensor(float(B * H * W), device=x.device), {"l1": l1.detach(), "l2": l2.detach(),
                                                                   "kl": kl.detach() * (H * W)}


def vq_losses(z: torch.Tensor, e: torch.Tensor, commit_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VQ-VAE codebook + commitment terms on the (L2-normalised) features z and their codes e, both (N, E):
    sum_n |sg(z) - e|^2 + beta |z - sg(e)|^2. The straight-through estimator is applied by the caller."""
    codebook = (z.detach() - e).pow(2).sum()
    commit = (z - e.detach()).pow(2).sum()
    return codebook + commit_weight * commit, {"codebook": codebook.detach(), "commit": commit.detach()}


def straight_through(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Forward value e, gradient of z (van den Oord et al. 2017)."""
    return z + (e - z).detach()


def revive_loss(z: torch.Tensor, codes: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Dead-code handling: sum over the codes no token picked (`used` False) of the squared distance to their
    nearest feature in z (N, E) (detached). Every unused code is pulled onto the data it is closest to, so it
    becomes selectable again -- a gradient form of "restart unused codes from recent encoder outputs"."""
    dead = codes[~used]  # (K_dead, E)
    if dead.shape[0] == 0 or z.shape[0] == 0:
        return codes.sum() * 0
    d = torch.cdist(dead.float(), z.detach().float()).pow(2)  # (K_dead, N)
    return d.min(dim=1).values.sum()


def code_usage(ids: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(used mask (K,), perplexity exp(H(p)) of the code histogram, fraction of codes used) of one batch."""
    counts = torch.bincount(ids.reshape(-1), minlength=num_codes).float()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
    used = counts > 0
    return used, entropy.exp(), used.float().mean()


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """GRPO's advantages: rewards (B, G) of G samples per prompt, normalised within each group (minus the group
    mean, over its std). A group whose samples all score alike (std <= eps) carries no signal and gets exactly
    0: dividing its rounding residue by a near-zero std would turn float noise into unit-sized advantages.
    Computed in float64. scale=False keeps the reward's own scale (minus the mean only, Dr. GRPO): a group that
    differs by a hair is not blown up to unit spread."""
    r = rewards.double()
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    flat = std <= eps
    if scale:
        centred = centred / torch.where(flat, torch.ones_like(std), std)
    return centred.masked_fill(flat, 0.0).float()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """(log p of the sampled tokens (B, N), entropy of each position's distribution (B, N)), both in fp32 under
    the temperature the tokens were drawn with; logits (B, N, V)."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, tokens[..., None])[..., 0], entropy


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO/GRPO's clipped surrogate: sum over samples i and their actions k (tokens, denoising steps) of
    max(-A_i r_ik, -A_i clip(r_ik, 1 - c, 1 + c)), r = exp(logp - old_logp); logp, old_logp (B, K), A (B,).
    -> (sum, count B * K, number of clipped terms). On-policy (old_logp = logp.detach()) its value is -sum A and
    its gradient that of the REINFORCE term -A log p (per token, as DAPO normalises)."""
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.float()[:, None].to(logp.device)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    clipped = ((ratio - 1).abs() > clip_range).sum().float()
    return loss.sum(), torch.tensor(float(logp.numel()), device=logp.device), clipped.detach()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-action KL(pi || pi_ref) estimate from the sampled actions (Schulman's k3, as DeepSeek's GRPO):
    exp(d) - d - 1 with d = ref_logp - logp; >= 0, unbiased, 0 where the policies agree."""
    d = ref_logp.detach() - logp
    return torch.exp(d) - d - 1


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL of two Gaussian steps with the same std: |mean - ref_mean|^2 / 2 std^2, averaged over all but the first
    dim like flow.gaussian_logprob, (B,)."""
    std = torch.as_tensor(std, dtype=torch.float32)
    return ((mean.float() - ref_mean.detach().float()) ** 2).flatten(1).mean(1) / (2 * std ** 2)


def sampling_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, top_k: int, top_p: float,
                      n_valid: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p of the sampled tokens under the distribution the sampler draws from (temperature, then the
    top-k / top-p nucleus renormalised: glimage.sampling.warp), with the entropy of that distribution and the
    softmax mass outside the nucleus (the tail that is never sampled), each (B, N); logits (B, N, V).

    Under the plain softmax, lowering a bad draw's log p moves its mass anywhere, also into the tail, which no
    draw ever samples and so no gradient ever takes back; within the nucleus the gradient only moves mass
    between ids the sampler can draw. The sampled id always stays in (recomputed logits may differ in the last
    bit from the decode loop's at the nucleus' edge)."""
    from ..sampling import warp
    B, N, V = logits.shape
    flat = logits.float().reshape(B * N, V)
    with torch.no_grad():
        removed = torch.isinf(warp(flat, temperature, top_k, top_p, n_valid))
        removed.scatter_(1, tokens.reshape(-1, 1), False)
    scores = flat / temperature
    full = torch.log_softmax(scores, dim=-1)
    logp_all = torch.log_softmax(scores.masked_fill(removed, float("-inf")), dim=-1)
    p = logp_all.exp()
    entropy = -(p * logp_all.masked_fill(removed, 0)).sum(-1)
    tail = (full.exp() * removed).sum(-1)
    logp = logp_all.gather(-1, tokens.reshape(-1, 1))[:, 0]
    return logp.view(B, N), entropy.view(B, N), tail.detach().view(B, N)
