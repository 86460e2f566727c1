"""Stage `ar`: next-token cross-entropy of the GLM-4 decoder on the visual head, on the inference sequence.

Sequence (text-to-image), built by the inference code itself (`glimage.prompt.build_prompts`):
    {prompt}<sop>{th} {tw}<eop><sop>{ph} {pw}<eop><image start> | preview ids (ph*pw) | large ids (th*tw) | <eoi>
Targets are the tokens after the bar: the frozen tokenizer's ids of the ground-truth image, preview grid
first, then the large grid, then end-of-image (16385, when the head covers it: the tiny preset's 16384-wide
head does not, and inference appends it anyway). The large grid is the image at the geometry inference
tokenises (image / 32); the preview grid is the same image resized so that its grid is (ph, pw), i.e. the
picture of the large grid at about 16x16 tokens -- what the reference's layout implies: the model first
sketches the whole image coarsely, then draws it at full grid resolution conditioned on the sketch
(common.vq_pixels). Image-to-image samples put their sources' VQ ids in `<image start><|image|>*n<image end>`
spans (exactly as `glimage.prior.run_prior` does) and have no preview grid.

Positions and masks are those of inference: prompt MRoPE positions from build_prompts; the token fed at decode
step k (the k-th generated token, teacher-forced) gets `decode_position_ids[k]`, as in the decode loop
(`glimage.sampling.generate_grid_tokens`); left padding is masked with `prefill_mask` over the whole sequence,
which is row for row the mask prefill and every decode step use. Prompt positions carry no loss.
tests/test_train_stages.py checks that the training logits equal the decode loop's, position by position.

The trained module holds `language_model` + `lm_head` (GlmImageAR's names); the tokenizer is frozen and kept
outside it. LoRA (cfg.lora_rank > 0) adapts the attention and MLP linears of the decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...checkpoint import load_strict
from ...config import ARConfig
from ...models.ar import GlmImageAR, KVCache, TextModel
from ...prompt import GlmTokenizer, build_prompts, target_grids
from ...sampling import prefill_mask
from ...validate import InputError, check_target_size
from ..config import TrainConfig
from ..lora import AR_TARGETS, apply_lora, merged_state_dict, save_lora
from ..losses import ar_loss
from ..stage import StepOutput
from .common import (
    SAMPLE_PROMPTS,
    StageBase,
    VQEncoder,
    empty_output,
    export_ar,
    frozen_vq_encoder,
    groups_by,
    load_part,
    model_config,
    random_pipeline,
    save_images,
    seeded_init,
    tokenize_sources,
    vq_pixels,
)

TRAINED = ("ar.text.", "ar.grid_factor", "ar.preview_side", "ar.source_", "ar.min_size", "ar.max_size",
           "ar.max_aspect_ratio", "ar.temperature", "ar.top_k", "ar.top_p")


class ARModel(nn.Module):
    """The trained part of GlmImageAR: `language_model` + `lm_head`, named as in the checkpoint."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        self.language_model = TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vision_vocab_size, bias=False)

    def forward(self, input_ids, position_ids, mask=None, start: int = 0, cache: KVCache | None = None,
                pos: int = 0) -> torch.Tensor:
        """Logits (B, L - start, V) of positions start.. (the head runs on the predicting positions only).
        With a KV cache (sampling, stage grpo) input_ids sit at positions pos.. of the cached sequence."""
        h = self.language_model(input_ids, position_ids, mask, cache, pos)
        return self.lm_head(h[:, start:])

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.cfg.text, batch, max_len, p.device, p.dtype)


@dataclass
class ARBatch:
    input_ids: torch.Tensor  # (B, L + n_in): left-padded prompt, then the teacher-forced generated tokens
    position_ids: torch.Tensor  # (3, B, L + n_in)
    mask: torch.Tensor | None  # (B, 1, T, T) bool or None (nothing padded: plain causal)
    start: int  # L - 1: the first position whose logits predict a target
    targets: torch.Tensor  # (B, n_targets)


def ar_batch(texts: list[str], height: int, width: int, tok: GlmTokenizer, cfg: ARConfig,
             grids: list[torch.Tensor], source_ids: list[list[torch.Tensor]] | None = None) -> ARBatch:
    """The training sequence of one micro-batch (all samples of one size and one number of sources).

    grids: the target id grids in generation order, each (B, gh, gw) (t2i: preview then large; i2i: large);
    source_ids[b][i]: (gh, gw) ids of sample b's source i."""
    check_target_size(height, width, cfg, text_to_image=not source_ids)
    source_grids = [[tuple(g.shape) for g in row] for row in source_ids] if source_ids else None
    batch = build_prompts(texts, height, width, tok, cfg, source_grids)
    want = [tuple(g) for g in batch.grids]
    got = [tuple(g.shape[1:]) for g in grids]
    if want != got:
        raise InputError(f"target grids {got} do not match the grids inference generates {want}")
    input_ids = batch.input_ids
    if source_ids:
        slots = input_ids == tok.image_id
        flat = torch.cat([g.flatten().cpu() for row in source_ids for g in row])
        if int(slots.sum()) != flat.numel():
            raise InputError(f"prompt has {int(slots.sum())} image slots for {flat.numel()} source tokens")
        input_ids = input_ids.masked_scatter(slots, flat)
    B, L = input_ids.shape
    gen = torch.cat([g.reshape(B, -1).cpu() for g in grids], dim=1)  # (B, n)
    n = gen.shape[1]
    eoi = cfg.image_end_token_id
    use_eoi = eoi < cfg.text.vision_vocab_size
    targets = torch.cat([gen, torch.full((B, 1), eoi)], 1) if use_eoi else gen
    n_in = n if use_eoi else n - 1  # the last grid token is fed only to predict end-of-image
    fed = gen[:, :n_in]
    decode = batch.decode_position_ids[:, :, :n_in].permute(1, 0, 2)  # (3, B, n_in): step k's positions
    attn = torch.cat([batch.attention_mask, torch.ones(B, n_in, dtype=batch.attention_mask.dtype)], 1)
    return ARBatch(torch.cat([input_ids, fed], 1), torch.cat([batch.position_ids, decode], 2),
                   prefill_mask(attn, L + n_in), L - 1, targets)


class ARStage(StageBase):
    name = "ar"

    def __init__(self, cfg: TrainConfig, dataset=None):
        self.cfg = cfg
        self.model_cfg, self.base_cfg = model_config(cfg, TRAINED)
        self.ar_cfg = self.model_cfg.ar
        self._dataset = dataset
        self._source_cache: dict = {}  # per sample: a list of grids of varying sizes (cfg.cache)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.tok: GlmTokenizer | None = None
        self.enc: VQEncoder | None = None

    def setup(self, device, dtype) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.tok = (GlmTokenizer.from_folder(Path(self.cfg.base) / "processor") if self.cfg.base
                    else GlmTokenizer.byte_level(self.ar_cfg))
        self.enc = frozen_vq_encoder(self.cfg, self.model_cfg, self.device, self.dtype)

    def build(self) -> nn.Module:
        if self.cfg.base and self.ar_cfg.text == self.base_cfg.ar.text:
            with torch.device("meta"):
                model = ARModel(self.ar_cfg)
            load_part(model, self.cfg.base, ("model.language_model.", "lm_head."))
        else:
            model = seeded_init(lambda: ARModel(self.ar_cfg), self.cfg.seed)
        if self.cfg.lora_rank:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed + 1)
                apply_lora(model, self.cfg.lora_rank, self.cfg.lora_alpha, AR_TARGETS)
        return model.float().train()  # fp32 master weights, also from a float16 folder

    def blocks(self, model: ARModel) -> list[nn.Module]:
        return list(model.language_model.layers)


    # -- frozen tokenizer (memoised per dataset index with cfg.cache: it is deterministic)

    @torch.no_grad()
    def _grid_ids(self, images: torch.Tensor, index: list, gh: int, gw: int) -> torch.Tensor:
        cache = self.encoded()
        if cache is not None and (hit := cache.get((gh, gw), index)) is not None:
            return hit[0]
        p = self.ar_cfg.vision.patch_size
        ids = self.enc(vq_pixels(images, gh, gw, p).to(self.device, self.dtype)).cpu()  # (B, gh, gw)
        if cache is not None:
            cache.put((gh, gw), index, [ids])
        return ids

    def _source_ids(self, sources: list[list[torch.Tensor]], index: list) -> list[list[torch.Tensor]]:
        if self.cfg.cache and all(i in self._source_cache for i in index):
            return [self._source_cache[i] for i in index]
        ids = [[g.cpu() for g in row] for row in tokenize_sources(self.enc, sources)]
        if self.cfg.cache:
            self._source_cache.update(zip(index, ids))
        return ids

    def make_batch(self, batch) -> list[ARBatch]:
        """One ARBatch per group of samples with the same number of source images."""
        images = batch["images"]
        H, W = images.shape[-2:]
        th, tw, ph, pw = target_grids(H, W, self.ar_cfg)
        out = []
        for n_src, rows in groups_by([len(s) for s in batch["sources"]]).items():
            texts = [batch["texts"][i] for i in rows]
            index = [batch["index"][i] for i in rows]
            large = self._grid_ids(images[rows], index, th, tw)
            if n_src == 0:
                out.append(ar_batch(texts, H, W, self.tok, self.ar_cfg,
                                    [self._grid_ids(images[rows], index, ph, pw), large]))
            else:
                src = self._source_ids([batch["sources"][i] for i in rows], index)
                out.append(ar_batch(texts, H, W, self.tok, self.ar_cfg, [large], src))
        return out

    def step(self, model: ARModel, batch, generator: torch.Generator) -> StepOutput:
        if batch["images"] is None:
            return empty_output(model)
        loss = count = 0
        for b in self.make_batch(batch):
            mask = b.mask.to(self.device) if b.mask is not None else None
            logits = model(b.input_ids.to(self.device), b.position_ids.to(self.device), mask, b.start)
            s, c = ar_loss(logits, b.targets.to(self.device))
            loss, count = loss + s, count + c
        return StepOutput(loss, count)

    # -- export


    def export(self, model: nn.Module, out_dir: str) -> None:
        extra = None
        if self.cfg.lora_rank and not self.cfg.lora_merge:
            extra = lambda root: save_lora(model, root / "vision_language_encoder", AR_TARGETS)  # noqa: E731
        export_ar(self.cfg, self.model_cfg, out_dir, self.trained_state(model), keep=("visual.", "vqmodel."),
                  extra=extra)

    @torch.no_grad()
    def samples(self, model: nn.Module, out_dir: str, step: int, steps: int | None = None) -> list[Path]:
        """Images of SAMPLE_PROMPTS: this AR (LoRA merged) with the base folder's decoder and VAE."""
        from ...pipeline import GlmImagePipeline
        pipe = (GlmImagePipeline.from_pretrained(self.cfg.base, device="cpu", dtype=torch.float32) if self.cfg.base
                else random_pipeline(self.model_cfg, self.cfg.seed))
        sd = merged_state_dict(model) if self.cfg.lora_rank else model.state_dict()  # adapters applied
        frozen = {k: v for k, v in pipe.ar.state_dict().items() if k.startswith(("visual.", "vqmodel."))}
        with torch.device("meta"):
            pipe.ar = GlmImageAR(self.ar_cfg)  # the config may override the base's (text model, grid rules)
        load_strict(pipe.ar, {**frozen, **{k: v.detach().cpu().float() for k, v in sd.items()}}, what="trained AR")
        pipe.ar.eval()
        pipe.set_progress_bar_config(disable=True)
        size = self.cfg.image_size
        steps = steps if steps is not None else self.cfg.sample_steps
        images = [pipe(p, height=size, width=size, num_inference_steps=steps, guidance_scale=self.cfg.sample_guidance,
                       seed=self.cfg.seed + i).images[0] for i, p in enumerate(SAMPLE_PROMPTS)]
        return save_images(images, out_dir, step, list(SAMPLE_PROMPTS))
