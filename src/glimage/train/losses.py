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


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantages: rewards (B, G) of G samples per prompt, normalised within each group (minus the group
    mean, over its std). A group whose samples all score alike carries no signal and gets 0."""
    r = rewards.float()
    std = r.std(dim=1, keepdim=True, unbiased=False)
    return (r - r.mean(dim=1, keepdim=True)) / (std + eps)


def policy_gradient_loss(logits: torch.Tensor, tokens: torch.Tensor, advantages: torch.Tensor,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """-A_i * log p(token) summed over every sampled token (B, N) of every sample i, count = B * N.

    On-policy GRPO with one update per batch of samples: the clipped ratio pi/pi_old is 1, so the objective is
    the group-normalised REINFORCE term, averaged per token (DAPO's token-level normalisation). log p is taken
    under the temperature the tokens were sampled with (logits (B, N, V))."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens[..., None])[..., 0]
    loss = -(advantages.float()[:, None].to(logp.device) * logp).sum()
    return loss, torch.tensor(float(tokens.numel()), device=logits.device)
