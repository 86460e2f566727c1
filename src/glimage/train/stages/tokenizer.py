"""Stage `tokenizer`: the semantic-VQ image tokenizer (ViT `visual` + cosine codebook `vqmodel` of GlmImageAR).

Objective (VQ-VAE, van den Oord et al. 2017, with the quantiser exactly as inference runs it):
  ids, z, codes = vqmodel.encode(visual(pixels))      z, codes L2-normalised; id = nearest code by cosine
  e = codes[ids];  z_q = z + sg(e - z)                straight-through estimator
  recon = aux_decoder(post_quant_conv(z_q))           small conv decoder, 8 px per token, training only
  per token:  |recon - image_lowres|^2 (mean over its 8x8 RGB pixels)
              + |sg(z) - e|^2 (codebook) + commit_weight * |z - sg(e)|^2 (commitment)
  dead codes: every code no token of the micro-batch picked is pulled onto its nearest encoder output of the
              micro-batch (losses.revive_loss) -- a gradient restart from recent encoder outputs.
Both grids the AR generates are trained at once: the large grid (image at the inference geometry, image / 32)
and the preview grid (the same image resized so its grid is (ph, pw), see common.vq_pixels).

Why the tokens carry layout and meaning: one token per grid cell, in raster order, and the decoder must redraw
each cell from its token alone, so a token has to say what is where in its cell (colour, shape, which part of
it); the target is a low-resolution image (8 px per token), so the codebook spends its capacity on that and
not on texture or exact edges, which the DiT adds back; the ViT attends over the whole image, so a code can
depend on context (the part of a circle vs of a square). The cosine codebook quantises directions, as inference
does, so what is learned is what inference uses.

Why dead codes are revived by a loss rather than by overwriting rows: under FSDP the codebook is sharded and
the optimizer owns it; a gradient pull needs no extra state, resumes exactly, and a micro-batch gives the same
gradient on any rank. Code usage and perplexity of each micro-batch are logged as metrics.

With refit_codes = k, the export first moves up to k unused codes onto k-means centres of the 10% worst-quantised
outputs of the dataset's first 3000 images (refit_dead_codes): with the signs' letters in their own cells it
raised the share of letter cells whose code's most common letter is their own from 0.32 to 0.89.

Export writes `visual.*`, `vqmodel.*` (including post_quant_conv, the decoder's first layer) into the base AR
checkpoint; the rest of the auxiliary decoder is discarded (inference has no pixel decoder: the DiT is one).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ARConfig
from ...prompt import target_grids
from ...validate import InputError
from ..config import TrainConfig
from ..losses import code_usage, revive_loss, straight_through, vq_losses
from ..stage import StepOutput
from .common import (
    StageBase,
    VQEncoder,
    empty_output,
    export_ar,
    load_part,
    model_config,
    save_images,
    seeded_init,
    vq_pixels,
)

PX_PER_TOKEN = 8  # reconstruction resolution of the auxiliary decoder
REVIVE_POOL = 512  # encoder outputs a dead code may be pulled to (a random subset of the micro-batch's)
REFIT_IMAGES = 3000  # sample of the dataset whose outputs the export's code refit (refit_codes) clusters
CODE_NORM = 0.02  # codebook rows are rescaled to norm CODE_NORM * sqrt(embed_dim) at build (see build)


@torch.no_grad()
def refit_dead_codes(model: VQEncoder, batches, k: int, seed: int = 0, worst: float = 0.1,
                     iters: int = 30) -> int:
    """Move up to k codes no output of `batches` (pixel tensors) picks onto k-means centres (cosine, `iters`
    Lloyd steps, seeded) of the `worst` share of outputs farthest from their code. Returns how many moved.

    Why: the encoder tells the signs' letters apart (1-NN on its outputs reads every letter of 300 signs) but
    training leaves few codes among them (16 codes for 2100 letter cells; they are 2% of the tokens, so neither
    the reconstruction nor the revival pulls codes there; on a fine-tuned tokenizer, letter cells were 8x
    farther from their code than the rest). The worst-quantised outputs are mostly such lumped features; centres of them give those features
    their own ids without moving any code in use: outputs already well served keep their ids, and so what the
    AR and DiT learned of them (measured on the previous shipped tokenizer, k = all 615 unused codes, worst 10%: letter
    purity 0.32 -> 0.89, 88 codes; 12% of the ids of object images change, mostly on the objects' edges)."""
    zs, errs, ids_all = [], [], []
    for pixels in batches:
        ids, z, codes = model.vqmodel.encode(model.visual(pixels))
        z = F.normalize(z.reshape(-1, z.shape[-1]).float(), dim=-1)
        ids = ids.reshape(-1)
        zs.append(z)
        ids_all.append(ids)
        errs.append(1 - (z * F.normalize(codes[ids].float(), dim=-1)).sum(-1))
    z, err, ids = torch.cat(zs), torch.cat(errs), torch.cat(ids_all)
    weight = model.vqmodel.quantize.embedding.weight
    dead = (torch.bincount(ids, minlength=weight.shape[0]) == 0).nonzero().flatten()
    x = z[err.topk(max(1, int(worst * len(err)))).indices]  # (M, E)
    k = min(k, len(dead), len(x))
    if k == 0:
        return 0
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=g)[:k]].clone()  # (k, E)
    for _ in range(iters):
        assign = (x @ centres.T).argmax(1)  # (M,)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)  # the direction of a sum is its mean's
        filled = torch.bincount(assign, minlength=k) > 0  # an empty cluster keeps its centre
        centres[filled] = F.normalize(sums[filled], dim=-1)
    norm = weight.norm(dim=-1).mean()  # cosine codes: only the direction matters; keep the usual row norm
    weight[dead[:k]] = (centres * norm).to(weight.dtype)
    return k


class AuxDecoder(nn.Module):
    """Tokens -> pixels: 3x3 conv, then three (nearest x2, conv, GroupNorm, SiLU) stages, then RGB."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.ups = nn.ModuleList([nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                nn.Conv2d(width, width, 3, padding=1),
                                                nn.GroupNorm(min(8, width), width), nn.SiLU())
                                  for _ in range(3)])  # 2^3 = PX_PER_TOKEN
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, gh, gw) -> (B, 3, 8gh, 8gw)
        x = self.conv_in(x)
        for up in self.ups:
            x = up(x)
        return self.conv_out(x)


class TokenizerModel(VQEncoder):
    """visual + vqmodel (GlmImageAR names) + aux_decoder (training only)."""

    def __init__(self, cfg: ARConfig):
        super().__init__(cfg)
        self.aux_decoder = AuxDecoder(cfg.vision.hidden_size, max(32, min(256, cfg.vision.hidden_size)))

    def quantize(self, pixels: torch.Tensor):
        """-> ids (B, gh, gw), z (B, gh, gw, E), e (B, gh, gw, E), codes (K, E), recon (B, 3, 8gh, 8gw)."""
        ids, z, codes = self.vqmodel.encode(self.visual(pixels))  # exactly the inference quantiser
        e = codes[ids]
        zq = straight_through(z, e).permute(0, 3, 1, 2)  # (B, E, gh, gw)
        return ids, z, e, codes, self.aux_decoder(self.vqmodel.post_quant_conv(zq))

    def forward(self, *pixels: torch.Tensor) -> list[tuple]:
        """One quantize() per pixel batch (one per grid geometry), in a single forward: FSDP2 gathers the
        parameters around forward calls, and one call per step keeps its hooks simple."""
        return [self.quantize(p) for p in pixels]


class TokenizerStage(StageBase):
    name = "tokenizer"

    def __init__(self, cfg: TrainConfig, dataset=None):
        if cfg.lora_rank:
            raise InputError(f"lora_rank={cfg.lora_rank}: LoRA is supported for the ar and decoder stages only")
        self.cfg = cfg
        self.model_cfg, self.base_cfg = model_config(cfg, ("ar.vision.", "ar.vq."))
        self.ar_cfg = self.model_cfg.ar
        self._dataset = dataset
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def setup(self, device, dtype) -> None:
        self.device, self.dtype = torch.device(device), dtype

    def build(self) -> nn.Module:
        model = seeded_init(lambda: TokenizerModel(self.ar_cfg), self.cfg.seed)
        same = (self.ar_cfg.vision, self.ar_cfg.vq) == (self.base_cfg.ar.vision, self.base_cfg.ar.vq)
        if self.cfg.base and same:
            with torch.device("meta"):
                enc = VQEncoder(self.ar_cfg)
            load_part(enc, self.cfg.base, ("model.visual.", "model.vqmodel."))
            model.load_state_dict(enc.state_dict(), strict=False)
        with torch.no_grad():
            # Cosine codes ignore the row norms, but the norm sets how fast Adam turns a code: about
            # lr * sqrt(E) / norm radians per step. Rows of norm CODE_NORM * sqrt(E) turn ~lr / CODE_NORM.
            w = model.vqmodel.quantize.embedding.weight
            w.copy_(F.normalize(w, dim=-1) * (CODE_NORM * w.shape[1] ** 0.5))
        return model.train()

    def blocks(self, model: TokenizerModel) -> list[nn.Module]:
        return list(model.visual.blocks)


    def grids(self, height: int, width: int) -> list[tuple[int, int]]:
        th, tw, ph, pw = target_grids(height, width, self.ar_cfg)
        return [(th, tw), (ph, pw)]

    def step(self, model: TokenizerModel, batch, generator: torch.Generator) -> StepOutput:
        if batch["images"] is None:
            return empty_output(model)
        images = batch["images"]
        patch, K = self.ar_cfg.vision.patch_size, self.ar_cfg.vq.num_embeddings
        total = count = 0
        sums = {k: 0.0 for k in ("recon", "codebook", "commit", "revive", "perplexity", "usage")}
        grids = self.grids(images.shape[-2], images.shape[-1])
        outs = model(*[vq_pixels(images, gh, gw, patch).to(self.device, self.dtype) for gh, gw in grids])
        for (gh, gw), (ids, z, e, codes, recon) in zip(grids, outs):
            target = F.interpolate(images.float(), size=(gh * PX_PER_TOKEN, gw * PX_PER_TOKEN), mode="bilinear",
                                   antialias=True, align_corners=False).to(self.device)
            n = ids.numel()
            recon_sum = (recon.float() - target).pow(2).sum() / (3 * PX_PER_TOKEN ** 2)
            vq_sum, vq_parts = vq_losses(z.reshape(n, -1).float(), e.reshape(n, -1).float(), self.cfg.commit_weight)
            used, ppl, usage = code_usage(ids, K)
            flat = z.reshape(n, -1)
            pick = torch.randperm(n, generator=generator, device=generator.device)[:REVIVE_POOL]
            pool = flat[pick.to(flat.device)] if n > REVIVE_POOL else flat
            revive = revive_loss(pool, codes, used) * (n / K)  # scaled like a per-token term
            total = total + recon_sum + vq_sum + revive
            count += n
            for k, v in (("recon", recon_sum), ("codebook", vq_parts["codebook"]), ("commit", vq_parts["commit"]),
                         ("revive", revive), ("perplexity", ppl * n), ("usage", usage * n)):
                sums[k] = sums[k] + v.detach()
        return StepOutput(total, torch.tensor(float(count), device=self.device), sums)

    def export(self, model: TokenizerModel, out_dir: str) -> None:
        if self.cfg.refit_codes:
            moved = refit_dead_codes(model, self._refit_batches(model), self.cfg.refit_codes, self.cfg.seed)
            print(f"tokenizer export: {moved} unused codes refit onto the worst-quantised outputs", flush=True)
        parts = {k: v for k, v in model.state_dict().items() if k.startswith(("visual.", "vqmodel."))}
        export_ar(self.cfg, self.model_cfg, out_dir, parts, keep=("language_model.", "lm_head."))

    def _refit_batches(self, model: TokenizerModel, n: int = REFIT_IMAGES, batch: int = 50):
        """The large grid's pixels of the dataset's first n images, in batches (the refit's sample)."""
        ds = self.dataset()
        p = next(model.parameters())
        for i in range(0, min(n, len(ds)), batch):
            b = self.collate([ds[j] for j in range(i, min(i + batch, n, len(ds)))])
            if b["images"] is None:
                continue
            gh, gw = self.grids(b["images"].shape[-2], b["images"].shape[-1])[0]
            yield vq_pixels(b["images"], gh, gw, self.ar_cfg.vision.patch_size).to(p.device, p.dtype)

    @torch.no_grad()
    def samples(self, model: TokenizerModel, out_dir: str, step: int, n: int = 4) -> list[Path]:
        """Originals over the auxiliary decoder's redraw from the large grid's and the preview grid's tokens."""
        from ...pipeline import to_pil
        ds = self.dataset()
        b = self.collate([ds[i] for i in range(min(n, len(ds)))])
        if b["images"] is None:
            return []
        p = next(model.parameters())
        x = b["images"]
        rows = [torch.cat(list(x.float()), -1)]
        for gh, gw in self.grids(x.shape[-2], x.shape[-1]):
            recon = model.quantize(vq_pixels(x, gh, gw, self.ar_cfg.vision.patch_size).to(p.device, p.dtype))[-1]
            recon = F.interpolate(recon.float().cpu(), size=x.shape[-2:], mode="nearest")
            rows.append(torch.cat(list(recon), -1))
        return save_images(to_pil(torch.cat(rows, -2)[None]), out_dir, step, b["texts"])
