"""AR sampling: temperature -> top-k -> top-p -> multinomial, and the prefill/decode loop.

The warpers are written op for op like transformers' (TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper keeping the boundary token, softmax, torch.multinomial), so that for the same seed and
fp32 logits on the CPU the draws are identical to the reference's. Unlike the reference, ids that can never
stand in a grid (image start/end and the unused visual slots >= codebook size) are masked while a grid is
generated, so a grid is always complete; end-of-image is appended, not sampled.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .prompt import PromptBatch
from .timing import NO_TIMER
from .validate import InputError


class Interrupted(Exception):
    """The caller's should_stop() asked the AR loop to stop (nobody waits for its tokens any more)."""


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature > 0:
        raise InputError(f"temperature={temperature} must be > 0 (greedy decoding repeats itself on this model)")
    if not isinstance(top_k, int) or top_k < 0:
        raise InputError(f"top_k={top_k} must be an int >= 0 (0 disables it)")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p={top_p} must be in (0, 1]")


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, n_valid: int | None = None):
    """logits (B, V) -> warped scores (B, V) with -inf on removed ids."""
    scores = logits.float()
    if n_valid is not None and n_valid < scores.shape[-1]:
        scores = scores.clone()
        scores[:, n_valid:] = float("-inf")
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        k = min(top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False  # keep at least one
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return scores


def sample(logits, temperature, top_k, top_p, n_valid=None, generator=None) -> torch.Tensor:
    """One id per row. generator: one for the batch (the reference's draws), or a list, one per row (a batch of
    independent requests: row b draws exactly what it would draw alone)."""
    probs = torch.softmax(warp(logits, temperature, top_k, top_p, n_valid), dim=-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(probs[b:b + 1], num_samples=1, generator=g)
                          for b, g in enumerate(generator)]).squeeze(1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)  # (B,)


def prefill_mask(attention_mask: torch.Tensor, total: int) -> torch.Tensor | None:
    """Bool (B, 1, L, total) mask for a left-padded prompt, or None when nothing is padded (plain causal)."""
    B, L = attention_mask.shape
    if bool(attention_mask.all()):
        return None
    keys = torch.ones(B, total, dtype=torch.bool, device=attention_mask.device)
    keys[:, :L] = attention_mask.bool()
    causal = torch.ones(L, total, dtype=torch.bool, device=attention_mask.device).tril()
    # pad rows attend to themselves so that no row is fully masked (a NaN there would reach real rows
    # through 0 * NaN in the next layer's attention)
    eye = torch.zeros(L, total, dtype=torch.bool, device=attention_mask.device)
    eye[:, :L] = torch.eye(L, dtype=torch.bool, device=attention_mask.device)
    return ((causal & keys[:, None, :]) | eye)[:, None]


def static_step(model, tok: torch.Tensor, position_ids: torch.Tensor, key_valid: torch.Tensor, cache,
                pos: torch.Tensor) -> torch.Tensor:
    """One decode step with the same shapes at every position (what torch.compile and CUDA graphs need): the
    token's K/V go into the cache at device position `pos`, attention runs over the whole cache with the
    slots after `pos` (and left padding) masked. tok (B,), position_ids (3, B, 1) -> logits (B, 1, V)."""
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    mask = (key_valid & (slots <= pos))[:, None, None, :]  # (B, 1, 1, S)
    return model(tok[:, None], position_ids, mask, cache, pos, last_only=True)


@torch.no_grad()
def generate_grid_tokens(model, batch: PromptBatch, temperature: float, top_k: int, top_p: float,
                         generator: torch.Generator | list[torch.Generator] | None = None,
                         progress: bool = True, timer=NO_TIMER, step=None, should_stop=None) -> torch.Tensor:
    """Prefill the prompt, then sample every grid token. Returns (B, n_grid) ids, generation order.

    step: None = the eager loop (the cache read up to the current length); else a function like static_step
    (or its torch.compile) that decodes one token with static shapes; the draws are the same.
    should_stop: called before each token (a server's deadlines and cancellations); True raises Interrupted."""
    check_sampling(temperature, top_k, top_p)
    device = model.device
    ids = batch.input_ids.to(device)
    B, L = ids.shape
    n_grid = sum(h * w for h, w in batch.grids)
    n_valid = model.cfg.vq.num_embeddings
    cache = model.new_cache(B, L + n_grid)
    # all masks and positions are built before the loop: the loop itself never waits on the host
    key_valid = torch.ones(B, L + n_grid, dtype=torch.bool, device=device)
    key_valid[:, :L] = batch.attention_mask.to(device).bool()
    padded = not bool(batch.attention_mask.all())
    decode_pos = batch.decode_position_ids.to(device).permute(1, 0, 2)  # (3, B, n_new)
    out = torch.empty(B, n_grid, dtype=torch.long, device=device)

    with timer("ar_prefill"):
        logits = model(ids, batch.position_ids.to(device), prefill_mask(batch.attention_mask.to(device), L), cache,
                       0, last_only=True)
    positions = torch.arange(L, L + n_grid, device=device)  # a 0-dim view per step: no host-to-device copy
    with timer("ar_decode"):
        for i in tqdm(range(n_grid), desc="AR tokens", disable=not progress, leave=False):
            if should_stop is not None and should_stop():
                raise Interrupted(f"stopped at AR token {i} of {n_grid}")
            tok = sample(logits[:, -1], temperature, top_k, top_p, n_valid, generator)
            out[:, i] = tok
            if i == n_grid - 1:
                break
            if step is not None:
                logits = step(model, tok, decode_pos[:, :, i: i + 1], key_valid, cache, positions[i])
                continue
            mask = key_valid[:, None, None, : L + i + 1] if padded else None
            logits = model(tok[:, None], decode_pos[:, :, i: i + 1], mask, cache, L + i, last_only=True)
    return out
