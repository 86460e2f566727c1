"""Stage `decoder`: flow matching of the DiT, conditioned exactly as the pipeline conditions it at inference.

Per sample (all random draws from the loop's generator):
  x0 = (z - latents_mean) / latents_std,  z ~ q(z | image) of the frozen VAE (a posterior sample, as diffusers'
       training scripts do; the posterior is nearly a point at the small KL weights used)
  t  ~ uniform integer in [1, T] (T = num_train_timesteps): the grid inference walks, t_i = linspace(T, 1, N+1)
  sigma = shift_sigmas(t / T, mu(H, W))   the pipeline's resolution-dependent shift (glimage.flow)
  x_sigma = (1 - sigma) x0 + sigma eps,    target v = eps - x0,   DiT timestep = t - 1 (0..999, as inference feeds)
  prior ids = the frozen tokenizer's large grid of the ground-truth image (image / 32), upsampled x2 (one per
       DiT patch, `glimage.prior.upsample_ids`); glyph = ByT5 of the caption's quoted text (`encode_glyphs`);
       target_size = (H, W), crop = (0, 0) (the data is resized/centre-cropped, as inference assumes).
  condition dropout (cfg.cond_drop): ALL prior tokens dropped (prior_token_drop = True), glyph = the empty
       string's embedding, no reference images -- exactly the unconditional branch of the pipeline's CFG.
  glyph prior dropout (cfg.glyph_prior_drop, off by default): in the other samples that quote text, each
       prior token is dropped with this probability and the glyphs are kept. The VQ tokens of a sign carry
       its letters roughly, and a DiT trained without this copies them and hardly reads the glyphs.
  glyph prior swap (cfg.glyph_prior_swap, off by default): each other sample that quotes text is picked with
       this probability, and the picked ones of a batch pass their prior tokens round (a cycle, when two or
       more are picked): each gets another word's sign tokens and keeps its own glyphs and target. At inference
       the AR writes sign tokens for a word it cannot spell; trained on true tokens only, the DiT copies them.
Reference images (image-to-image samples): each source -> its VQ grid (inference preprocessing) and VAE latents
of the source resized to that grid (as `GlmImagePipeline._reference_kv`) -> the DiT's write pass
(`encode_reference`, timestep 0, with gradients) -> K/V the denoising pass reads.
Loss: MSE of the velocity, one term per DiT token (losses.flow_loss). EMA of the weights is the loop's.
Glyph lengths differ within a batch: shorter ones are left-padded (as encode_glyphs does) and the pads are
masked out of the attention keys, so each sample sees what a batch-1 inference call would see.
The glyph encoder is frozen, as officially (a pretrained ByT5). A model trained from scratch has no pretrained
one: `train_glyph` makes it a submodule of the trained model (`glyph_encoder.*`, in the checkpoints and the EMA)
that encodes the prompts inside forward, so the DiT loss trains it too; the export writes it to text_encoder/.
A random frozen ByT5 gives the DiT little to read: its tokens carry no RoPE, so the order of the letters is only
in what T5's random relative-position biases mix into each token.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ...checkpoint import load_strict, read_state_dict
from ...convert.dit import save_dit
from ...convert.glyph import load_glyph_encoder, save_glyph_encoder
from ...convert.vae import load_vae
from ...flow import compute_mu, image_seq_len, shift_sigmas
from ...glyph_text import encode_glyphs, glyph_texts, glyph_token_ids
from ...models.dit import GlmImageDiT, RefKV
from ...models.glyph import GlyphEncoder
from ...prior import upsample_ids
from ...validate import InputError
from ..config import TrainConfig
from ..lora import DIT_TARGETS, apply_lora, merged_state_dict, save_lora
from ..losses import flow_loss
from ..stage import StepOutput
from .common import (
    SAMPLE_PROMPTS,
    StageBase,
    empty_output,
    export_folder,
    frozen_vq_encoder,
    groups_by,
    model_config,
    random_pipeline,
    sample_generators,
    save_images,
    seeded_init,
    to_pil,
    tokenize_sources,
    vq_pixels,
)


class TrainableDiT(GlmImageDiT):
    """GlmImageDiT whose forward also runs the reference-image write passes (and, with a `glyph_encoder`
    submodule, the glyph encoder): FSDP2 gathers the root's parameters around `forward` only. Same state dict
    as GlmImageDiT, plus `glyph_encoder.*` when the stage trains it."""

    def forward(self, latents, glyph, prior_token_id, prior_token_drop, timestep, target_size, crop_coords,
                refs=None, glyph_mask=None):
        """refs: per sample a list of (latents (1, C, h, w), prior ids (1, N), size (1, 2)) or None.
        glyph: embeddings (B, T, D), or the B prompts when the model owns its glyph encoder."""
        if isinstance(glyph, list):
            glyph = encode_glyphs(self.glyph_encoder, glyph, latents.device, latents.dtype)  # (B, T, D)
        kv = None
        if refs:
            kv = RefKV.stack([RefKV.concat([self.encode_reference(z, ids, size) for z, ids, size in sample])
                              for sample in refs])
        v = super().forward(latents, glyph, prior_token_id, prior_token_drop, timestep, target_size, crop_coords,
                            kv, glyph_mask)
        return v.clone()  # the unpatchified output is a view; FSDP2 warns about hooking views for backward


class DecoderStage(StageBase):
    name = "decoder"

    def __init__(self, cfg: TrainConfig, dataset=None):
        for name in ("cond_drop", "glyph_prior_drop", "glyph_prior_swap"):
            if not 0 <= getattr(cfg, name) <= 1:
                raise InputError(f"{name}={getattr(cfg, name)} must be in [0, 1]")
        self.cfg = cfg
        # a trained glyph encoder may take another shape than the base's (it then starts from random weights)
        trained = ("dit.", "scheduler.", "glyph.") if cfg.train_glyph else ("dit.", "scheduler.")
        self.model_cfg, self.base_cfg = model_config(cfg, trained)
        if self.model_cfg.glyph.d_model != self.model_cfg.dit.text_embed_dim:
            raise InputError(f"glyph.d_model={self.model_cfg.glyph.d_model} must equal dit.text_embed_dim="
                             f"{self.model_cfg.dit.text_embed_dim} (the DiT projects the glyph tokens)")
        self._dataset = dataset
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def setup(self, device, dtype) -> None:
        self.device, self.dtype = torch.device(device), dtype
        if self.cfg.base:
            root = Path(self.cfg.base)
            self.vae = load_vae(root / "vae", self.device, dtype)
            if self.model_cfg.glyph == self.base_cfg.glyph:
                self.glyph = load_glyph_encoder(root / "text_encoder", self.device, dtype)
            else:
                self.glyph = seeded_init(lambda: GlyphEncoder(self.model_cfg.glyph), self.cfg.seed + 2)
                self.glyph.to(self.device, dtype)
        else:
            pipe = random_pipeline(self.model_cfg, self.cfg.seed)
            self.vae, self.glyph = pipe.vae.to(self.device, dtype), pipe.glyph_encoder.to(self.device, dtype)
        self.vae.eval().requires_grad_(False)
        self.glyph.eval().requires_grad_(False)
        self.enc = frozen_vq_encoder(self.cfg, self.model_cfg, self.device, dtype)

    def build(self) -> nn.Module:
        if self.cfg.base and self.model_cfg.dit == self.base_cfg.dit:
            folder = Path(self.cfg.base) / "transformer"
            with torch.device("meta"):
                model = TrainableDiT(self.model_cfg.dit)
            load_strict(model, read_state_dict(folder), what=f"DiT checkpoint {folder}")
        else:
            model = seeded_init(lambda: TrainableDiT(self.model_cfg.dit), self.cfg.seed)
        if self.cfg.train_glyph:
            model.glyph_encoder = copy.deepcopy(self.glyph).requires_grad_(True)  # starts from the base's
        if self.cfg.lora_rank:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed + 1)
                apply_lora(model, self.cfg.lora_rank, self.cfg.lora_alpha, DIT_TARGETS)
        return model.float().train()  # fp32 master weights, also from a float16 folder

    def blocks(self, model: GlmImageDiT) -> list[nn.Module]:
        return list(model.transformer_blocks)


    # -- frozen encoders (memoised per dataset index with cfg.cache; the posterior is kept, not a sample)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor, index: list):
        """-> posterior mean, logvar (B, C, h, w) and prior ids (B, 4*th*tw) of the ground-truth images."""
        key, cache = tuple(images.shape[-2:]), self.encoded()
        if cache is not None and (hit := cache.get(key, index, self.device)) is not None:
            return hit
        x = images.to(self.device, self.dtype)
        post = self.vae.encode(x)
        th, tw = images.shape[-2] // self.model_cfg.ar.grid_factor, images.shape[-1] // self.model_cfg.ar.grid_factor
        ids = self.enc(vq_pixels(images, th, tw, self.model_cfg.ar.vision.patch_size).to(self.device, self.dtype))
        prior = upsample_ids(ids.reshape(len(index), -1), th, tw)
        out = [post.mean, post.logvar, prior]
        if cache is not None:
            cache.put(key, index, out)
        return out

    @torch.no_grad()
    def _references(self, sources: list[torch.Tensor]) -> list[tuple]:
        """One sample's sources -> [(normalised VAE latents, upsampled prior ids, size)], as _reference_kv."""
        from ...pipeline import vae_input
        grids = tokenize_sources(self.enc, [sources])[0]
        px = 2 * self.model_cfg.dit.patch_size * self.vae.cfg.downsample  # pixels per VQ cell
        out = []
        for src, ids in zip(sources, grids):
            gh, gw = ids.shape
            x = vae_input(to_pil(src), gh * px, gw * px).to(self.device, self.dtype)
            z = self.vae.normalize_latents(self.vae.encode(x).mode())
            size = torch.tensor([[gh * px, gw * px]], device=self.device, dtype=self.dtype)
            out.append((z, upsample_ids(ids.reshape(1, -1), gh, gw).to(self.device), size))
        return out

    def _glyph_mask(self, texts: list[str]) -> torch.Tensor | None:
        """(B, T) True on the real tokens of encode_glyphs' left-padded layout; None if nothing is padded."""
        n = torch.tensor([sum(len(s) for s in glyph_token_ids(t, self.glyph.cfg.max_length)) for t in texts],
                         device=self.device)
        T = int(n.max())
        if bool((n == T).all()):
            return None
        return torch.arange(T, device=self.device)[None] >= (T - n)[:, None]

    def step(self, model: GlmImageDiT, batch, generator: torch.Generator) -> StepOutput:
        if batch["images"] is None:
            return empty_output(model)
        loss = count = 0
        for args, kw, target in self.model_inputs(batch, generator):
            s, c = flow_loss(model(*args, **kw), target, self.model_cfg.dit.patch_size)
            loss, count = loss + s, count + c
        return StepOutput(loss, count)

    def model_inputs(self, batch, generator: torch.Generator) -> list[tuple[list, dict, torch.Tensor]]:
        """The micro-batch's conditioned model inputs, in the groups the model runs (samples reading reference
        images apart): [(args, kwargs of TrainableDiT.forward, target velocity)]. Every random draw happens
        here, so any backend computing the loss from these trains on the same numbers."""
        images = batch["images"]
        B, _, H, W = images.shape
        sched = self.model_cfg.scheduler
        mean, logvar, prior = self._encode(images, batch["index"])
        # per-sample draws, in a fixed order per sample: posterior noise, t, flow noise, condition dropout
        gens = sample_generators(batch, generator, B)
        eps_z = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(self.device, self.dtype)
        x0 = self.vae.normalize_latents(mean + torch.exp(0.5 * logvar) * eps_z)
        T = sched.num_train_timesteps
        t = torch.stack([torch.randint(1, T + 1, (), generator=g) for g in gens]).to(self.device)
        mu = compute_mu(image_seq_len(H, W, self.vae.cfg.downsample, self.model_cfg.dit.patch_size), sched)
        sigma = shift_sigmas(t.float() / T, mu, sched.time_shift_type).view(B, 1, 1, 1).to(self.dtype)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(self.device, self.dtype)
        x_t = (1 - sigma) * x0 + sigma * noise
        target = noise - x0
        drop = [bool(torch.rand((), generator=g) < self.cfg.cond_drop) for g in gens]

        texts = ["" if d else s for d, s in zip(drop, batch["texts"])]
        size = torch.tensor([[H, W]], device=self.device, dtype=self.dtype).repeat(B, 1)
        crop = torch.zeros(B, 2, device=self.device, dtype=self.dtype)
        prior = prior.to(self.device)
        prior_drop = torch.tensor(drop)[:, None].expand_as(prior).clone()
        if self.cfg.glyph_prior_drop:
            for i, (d, s, g) in enumerate(zip(drop, texts, gens)):
                if not d and glyph_texts(s):
                    prior_drop[i] = torch.rand(prior.shape[1], generator=g) < self.cfg.glyph_prior_drop
        prior_drop = prior_drop.to(self.device)
        if self.cfg.glyph_prior_swap:
            picked = [i for i, (d, s, g) in enumerate(zip(drop, texts, gens))
                      if not d and glyph_texts(s) and bool(torch.rand((), generator=g) < self.cfg.glyph_prior_swap)]
            perm = list(range(B))
            for i, j in zip(picked, picked[1:] + picked[:1]):
                perm[i] = j
            prior = prior[perm]  # a new tensor: the cached ids stay the image's own
        # samples that read reference images run apart from the others (the K/V path is per batch)
        refs = [None if d or not s else self._references(s) for d, s in zip(drop, batch["sources"])]
        keys = [None if r is None else tuple(tuple(z.shape) for z, _, _ in r) for r in refs]
        out = []
        for key, rows in groups_by(keys).items():
            r = torch.tensor(rows, device=self.device)
            # glyphs left-padded to the group's own longest; a trained encoder runs inside the model's forward
            rows_text = [texts[i] for i in rows]
            g = rows_text if self.cfg.train_glyph else encode_glyphs(self.glyph, rows_text, self.device, self.dtype)
            args = [x_t[r], g, prior[r], prior_drop[r], (t[r] - 1).to(self.dtype), size[r], crop[r]]
            kw = dict(refs=[refs[i] for i in rows] if key is not None else None, glyph_mask=self._glyph_mask(rows_text))
            out.append((args, kw, target[r]))
        return out

    # -- export


    def _split(self, state: dict) -> tuple[GlmImageDiT, GlyphEncoder | None]:
        """A trained state dict -> the DiT and (train_glyph) the glyph encoder, both loaded strictly."""
        prefix = "glyph_encoder."
        with torch.device("meta"):
            dit = GlmImageDiT(self.model_cfg.dit)
            glyph = GlyphEncoder(self.glyph.cfg) if self.cfg.train_glyph else None
        load_strict(dit, {k: v for k, v in state.items() if not k.startswith(prefix)}, what="trained DiT")
        if glyph is not None:
            load_strict(glyph, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                        what="trained glyph encoder")
        return dit, glyph

    def export(self, model: nn.Module, out_dir: str) -> None:
        dit, glyph = self._split({k: v.cpu() for k, v in self.trained_state(model).items()})

        def write(root: Path) -> None:
            save_dit(dit, root / "transformer")
            if glyph is not None:
                save_glyph_encoder(glyph, root / "text_encoder")
            if self.cfg.lora_rank and not self.cfg.lora_merge:
                save_lora(model, root / "transformer", DIT_TARGETS)

        replaced = ("transformer", "text_encoder") if glyph is not None else ("transformer",)
        export_folder(self.cfg, self.model_cfg, out_dir, replaced, write)

    @torch.no_grad()
    def samples(self, model: nn.Module, out_dir: str, step: int, steps: int | None = None) -> list[Path]:
        """Images of SAMPLE_PROMPTS through GlmImagePipeline: the base folder's AR with this DiT."""
        from ...pipeline import GlmImagePipeline
        pipe = (GlmImagePipeline.from_pretrained(self.cfg.base, device="cpu", dtype=torch.float32) if self.cfg.base
                else random_pipeline(self.model_cfg, self.cfg.seed))
        sd = merged_state_dict(model) if self.cfg.lora_rank else model.state_dict()  # adapters applied
        pipe.dit, glyph = self._split({k: v.detach().cpu().float() for k, v in sd.items()})  # config may override
        if glyph is not None:
            pipe.glyph_encoder = glyph.eval()
        pipe.scheduler = self.model_cfg.scheduler
        pipe.set_progress_bar_config(disable=True)
        size = self.cfg.image_size
        steps = steps if steps is not None else self.cfg.sample_steps
        images = [pipe(p, height=size, width=size, num_inference_steps=steps, guidance_scale=self.cfg.sample_guidance,
                       seed=self.cfg.seed + i).images[0] for i, p in enumerate(SAMPLE_PROMPTS)]
        return save_images(images, out_dir, step, list(SAMPLE_PROMPTS))
