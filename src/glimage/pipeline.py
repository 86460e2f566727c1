"""`GlmImagePipeline`: the official checkpoint folder -> images, with diffusers' argument names.

Stages: AR prior tokens (prior.py) -> glyph embeddings of the quoted text (glyph_text.py) -> reference-image
K/V for image-to-image -> flow-matching Euler loop with classifier-free guidance (flow.py) -> VAE decode.
Numerics follow the reference pipeline (diffusers 0.42.1) step for step so that the same weights and seed
give the same image; see glm-image-reference notes in the functions below for the few deliberate changes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import read_json, stored_dtype, write_json
from .config import GlmImageConfig, SchedulerConfig, get_preset
from .convert.ar import load_ar, save_ar
from .convert.scheduler import scheduler_from_official, scheduler_to_official
from .convert.dit import load_dit, save_dit
from .convert.glyph import load_glyph_encoder, save_glyph_encoder
from .convert.vae import load_vae, save_vae
from .device import manual_generator, resolve_device, resolve_dtype
from .flow import cfg_combine, euler_step, get_schedule
from .glyph_text import encode_glyphs
from .image import load_image
from .layouts import column_major_linears, packed, tune_linears_for_cpu, unpack_linears
from .models.ar import GlmImageAR
from .models.dit import GlmImageDiT, RefKV
from .models.glyph import GlyphEncoder
from .models.vae import AutoencoderKL
from .prior import Prior, normalize_images, run_prior
from .prompt import CHAT_TEMPLATE, GlmTokenizer, target_grids
from .timing import NO_TIMER
from .validate import (MAX_GUIDANCE, MAX_IMAGES, MAX_SOURCE_IMAGES, InputError, check_choice, check_float, check_int,
                       check_prompts, check_seed, check_target_size, default_size)

# The shipped default model (preset `shapes`, trained by scripts/train_shapes.sh): used when no model is named.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "shapes"
# Generation defaults of the official model; a folder's glimage.json may override them (the shipped model does).
CALL_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 1.5}

COMPONENTS = ("vision_language_encoder", "processor", "text_encoder", "tokenizer", "transformer", "vae", "scheduler")


@dataclass
class GlmImageOutput:
    images: list  # PIL images, or a float array (B, H, W, 3) in [0, 1] with output_type="np"
    prior_token_ids: torch.Tensor | None = None
    # what reproduces the images: prompt(s), seed, height, width, num_inference_steps, guidance_scale
    parameters: dict = field(default_factory=dict)


def model_folder(path: str | os.PathLike | None) -> Path:
    """The GLM-Image folder to read (None: the model shipped in the package), checked to be one."""
    if path is None:
        if not (DEFAULT_MODEL / "vision_language_encoder").is_dir():
            raise InputError(f"the default model is missing from the package ({DEFAULT_MODEL}); "
                             "train it with scripts/train_shapes.sh --replace-shipped or name a model folder")
        path = DEFAULT_MODEL
    path = Path(path)
    if not (path / "vision_language_encoder").is_dir():
        raise InputError(f"{path} is not a GLM-Image folder (no vision_language_encoder/)")
    return path


def open_model(model: str | None = None, device=None, dtype=None, **kw) -> "GlmImagePipeline":
    """A model by the name the front ends take: "random:PRESET" (random weights, small presets whole), a
    folder, or None (the shipped model); kw go to from_pretrained (offload, ar_device, parts)."""
    if model and model.startswith("random:"):
        return GlmImagePipeline.from_config(model[len("random:"):], seed=0, device=device, dtype=dtype)
    return GlmImagePipeline.from_pretrained(model, device=device, dtype=dtype, **kw)


def seed_generator(generator, seed, device: torch.device) -> torch.Generator:
    """The AR sampler's generator. Like the reference, a given torch.Generator contributes its *initial*
    seed (the reference re-seeds the global RNG with it); we seed a private generator instead of the
    global one, which draws the same numbers."""
    if isinstance(generator, (list, tuple)):
        generator = generator[0]
    if generator is not None:
        seed = generator.initial_seed()
    if seed is None:
        seed = secrets.randbits(62)  # fresh entropy, leaving torch's global RNG untouched
    return manual_generator(device, seed)


def _initial_seed(generator) -> int:
    return (generator[0] if isinstance(generator, (list, tuple)) else generator).initial_seed()


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """VAE output (B, 3, H, W) in [-1, 1] -> PIL, as diffusers' VaeImageProcessor.postprocess."""
    arr = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (arr * 255).round().astype("uint8")]


def vae_input(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """A source image for the VAE: Lanczos resize, [-1, 1], (1, 3, H, W) — diffusers' VaeImageProcessor."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    arr = np.array(image).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1


class GlmImagePipeline:
    backend = "torch"

    def __init__(self, ar: GlmImageAR, tokenizer: GlmTokenizer, glyph_encoder: GlyphEncoder, dit: GlmImageDiT,
                 vae: AutoencoderKL, scheduler: SchedulerConfig, device: torch.device, dtype: torch.dtype):
        self.ar, self.tokenizer, self.glyph_encoder, self.dit, self.vae = ar, tokenizer, glyph_encoder, dit, vae
        self.channels_last = False  # the VAE's convolutions take channels-last input
        self.tuned = device.type == "cpu" and (ar is None or ar.device.type == "cpu")  # not for offload to a GPU
        if self.tuned:
            self._tune_for_cpu()
        self.scheduler = scheduler
        self.device, self.dtype = device, dtype
        self.progress = True
        self.offload = False  # components live on the CPU and visit the accelerator only while they run
        self.defaults: dict = {}  # a folder's glimage.json: height, width, num_inference_steps, guidance_scale
        self.decode_step = None  # None: the eager AR decode; enable_compile() sets a compiled static-shape step
        self.fast: dict = {}  # opt-in fast modes in effect (enable_fast): not the exact path

    def _tune_for_cpu(self) -> None:  # the weight layouts measured fastest per dtype (glimage.layouts); idempotent
        if self.ar is not None:
            tune_linears_for_cpu(self.ar.language_model)
            self.ar.lm_head = column_major_linears(packed(self.ar.lm_head))
        if self.vae is not None:
            # oneDNN's convolutions run ~1.2x faster channels-last (decoded pixels within 3e-5 of NCHW)
            self.vae.to(memory_format=torch.channels_last)
            self.channels_last = True

    # -- construction

    @property
    def config(self) -> GlmImageConfig:
        return GlmImageConfig(ar=self.ar.cfg, glyph=self.glyph_encoder.cfg, dit=self.dit.cfg, vae=self.vae.cfg,
                              scheduler=self.scheduler)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device=None, dtype=None,
                        offload: bool = False, ar_device=None, parts: tuple[str, ...] = ("ar", "dit")
                        ) -> "GlmImagePipeline":
        """Read an official GLM-Image folder; no path = the small model shipped in the package (offline).
        offload=True keeps the weights in CPU memory and moves each component to the accelerator only while it
        runs (the 10 B AR and 7 B DiT are never resident together). ar_device: run the AR on another device
        than the rest (only prior ids cross between them), e.g. "cuda:0" and device="cuda:1".
        parts: the halves to load, "ar" (the AR and its tokenizer) and/or "dit" (the glyph encoder, the DiT, the
        VAE); the other's components are None (a Ray AR or DiT replica holds only its own half).
        The MindSpore backend: glimage.from_pretrained(path, backend="mindspore") (glimage.backends)."""
        path = model_folder(path)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device, stored_dtype(path / "vision_language_encoder"))
        load_to = torch.device("cpu") if offload else device
        ar_to = load_to if offload or ar_device is None else resolve_device(ar_device)
        bad = set(parts) - {"ar", "dit"}
        if bad or not parts:
            raise InputError(f"parts={parts!r}: name \"ar\" and/or \"dit\"", "parts")
        ar, dit = "ar" in parts, "dit" in parts
        pipe = cls(load_ar(path, ar_to, dtype) if ar else None, GlmTokenizer.from_folder(path / "processor"),
                   load_glyph_encoder(path / "text_encoder", load_to, dtype) if dit else None,
                   load_dit(path / "transformer", load_to, dtype) if dit else None,
                   load_vae(path / "vae", load_to, dtype) if dit else None,
                   scheduler_from_official(read_json(path / "scheduler" / "scheduler_config.json")), device, dtype)
        pipe.offload = offload
        if (path / "glimage.json").is_file():
            pipe.defaults = read_json(path / "glimage.json")
        for component, part in (("vision_language_encoder", "ar"), ("transformer", "dit")):  # unmerged adapters
            if part in parts and (path / component / "lora.json").is_file():
                pipe.load_lora_weights(path / component, component)
        return pipe

    def load_lora_weights(self, path: str | os.PathLike, component: str = "transformer") -> list[str]:
        """Merge a LoRA adapter (`lora.safetensors` + `lora.json`, written by `glimage train` with
        lora_merge = false) into the AR ("vision_language_encoder") or the DiT ("transformer")."""
        from .train.lora import apply_lora_file
        modules = {"vision_language_encoder": self.ar, "transformer": self.dit}
        if component not in modules:
            raise InputError(f"component={component!r} must be one of {sorted(modules)}")
        names = apply_lora_file(unpack_linears(modules[component]), path, merge=True)  # merges into nn.Linears
        if self.tuned:
            self._tune_for_cpu()
        return names

    @classmethod
    def from_config(cls, cfg: GlmImageConfig | str, seed: int = 0, device=None, dtype=None) -> "GlmImagePipeline":
        """Any preset with random weights (tests, benchmarks, training from scratch); byte-level tokenizer."""
        cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        torch.manual_seed(seed)
        with torch.device(device):
            mods = [GlmImageAR(cfg.ar), GlyphEncoder(cfg.glyph), GlmImageDiT(cfg.dit), AutoencoderKL(cfg.vae)]
        ar, glyph, dit, vae = (m.to(dtype).eval() for m in mods)
        return cls(ar, GlmTokenizer.byte_level(cfg.ar), glyph, dit, vae, cfg.scheduler, device, dtype)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the official layout (loads in diffusers' GlmImagePipeline and in ours)."""
        if self.fast.get("ar_int8"):
            raise InputError("this pipeline's AR weights are int8 (enable_fast(ar_int8=True)): reload the folder "
                             "to save the exact weights", "ar_int8")
        path = Path(path)
        save_ar(self.ar, path)
        self.tokenizer.save(path / "processor")
        (path / "processor" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        save_glyph_encoder(self.glyph_encoder, path / "text_encoder")
        # ByT5 needs no vocabulary file: bytes + 3, 125 sentinel ids (vocab 384)
        write_json(path / "tokenizer" / "tokenizer_config.json", {
            "tokenizer_class": "ByT5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
            "extra_ids": 125})
        save_dit(self.dit, path / "transformer")
        save_vae(self.vae, path / "vae")
        write_json(path / "scheduler" / "scheduler_config.json", scheduler_to_official(self.scheduler))
        if self.defaults:
            write_json(path / "glimage.json", self.defaults)
        write_json(path / "model_index.json", {
            "_class_name": "GlmImagePipeline", "_diffusers_version": "0.42.1",
            "processor": ["transformers", "GlmImageProcessor"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "ByT5Tokenizer"],
            "transformer": ["diffusers", "GlmImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
            "vision_language_encoder": ["transformers", "GlmImageForConditionalGeneration"]})

    def enable_compile(self, ar: bool = True, dit: bool = True) -> None:
        """torch.compile, applied from outside the models: the AR decode as one static-shape step per token
        (sampling.static_step; on CUDA in mode reduce-overhead, i.e. captured as a CUDA graph) and each DiT
        block. The same tokens (tested); images within the parity tolerance. The first call compiles (~10 s)."""
        from .sampling import static_step
        if ar and self.ar is not None:
            unpack_linears(self.ar)  # compiled graphs cannot take oneDNN's packed weights (glimage.layouts)
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.decode_step = torch.compile(static_step, mode=mode, dynamic=False)
        if dit and self.dit is not None:
            for block in self.dit.transformer_blocks:
                block.compile()  # in place: the state dict keeps its names

    def enable_fast(self, step_cache: float | None = None, ar_int8: bool = False) -> None:
        """Opt-in fast modes (glimage.fast), each at a measured cost in the image (README): step_cache = the
        DiT step cache's threshold (0.05-0.3; higher skips more), ar_int8 = weight-only int8 AR weights."""
        from .fast import Int8Linear, StepCache, quantize_int8
        self.fast.update({k: v for k, v in (("step_cache", step_cache), ("ar_int8", ar_int8)) if v})
        if step_cache and self.dit is not None:
            StepCache(self.dit, check_float("step_cache", step_cache, 0, 10, lo_open=True)).install()
        if ar_int8 and self.ar is not None:
            quantize_int8(self.ar.language_model)
            self.ar.lm_head = Int8Linear(self.ar.lm_head)

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress = not disable

    def enable_model_cpu_offload(self) -> None:
        for m in (self.ar, self.glyph_encoder, self.dit, self.vae):
            if m is not None:
                m.to("cpu")
        self.offload = True

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module):
        if not self.offload or self.device.type == "cpu":
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")
            from .device import empty_cache
            empty_cache(self.device)

    # -- stages

    def default_size(self, images=None) -> tuple[int, int]:
        """(height, width) when none is given (validate.default_size): the folder's default, else 1024 within
        the model's range; for image-to-image the first source's size, snapped to the grid and the range."""
        return default_size(self.ar.cfg, self.defaults, load_image(images[0][0]).size if images else None)

    @torch.no_grad()
    def generate_prior_tokens(self, prompt: str | list[str], height: int, width: int, image=None,
                              generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
        """The large grid's ids, upsampled x2 (one per DiT patch): (B, 4 * H/32 * W/32)."""
        prompts = check_prompts(prompt)
        return self._prior(prompts, height, width, normalize_images(image, len(prompts)), generator, seed).ids

    def _prior(self, prompts, height, width, images, generator, seed, timer=NO_TIMER) -> Prior:
        with self._on_device(self.ar) as ar:
            g = seed_generator(generator, seed, self.ar_device)
            return run_prior(ar, self.tokenizer, prompts, height, width, images, g, self.progress, timer,
                             self.decode_step)

    def _given_prior(self, ids: torch.Tensor, n_prompts: int, height: int, width: int, images) -> Prior:
        if images:
            raise InputError("prior_token_ids is for text-to-image; with source images the AR must run")
        check_target_size(height, width, self.ar.cfg)
        th, tw, _, _ = target_grids(height, width, self.ar.cfg)
        want = (n_prompts, 4 * th * tw)
        if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != want or ids.is_floating_point():
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise InputError(f"prior_token_ids must be an integer tensor of shape {want} (prompts, 4 * {th} * {tw} "
                             f"for {height}x{width}), got {got}")
        n = self.dit.cfg.prior_vq_quantizer_codebook_size
        if int(ids.min()) < 0 or int(ids.max()) >= n:
            raise InputError(f"prior_token_ids must lie in [0, {n}), got [{int(ids.min())}, {int(ids.max())}]")
        return Prior(ids.long(), (th, tw), ids.long(), None, None)

    def _reference_kv(self, images: list[list], prior: Prior, n_per_prompt: int) -> RefKV:
        """Per sample: VAE-encode each source image, one DiT "write" pass at timestep 0 -> K/V of its tokens."""
        samples = []
        with self._on_device(self.vae) as vae, self._on_device(self.dit) as dit:
            for row, ids_row, grids in zip(images, prior.source_ids, prior.source_grids):
                parts = []
                for im, ids, (gh, gw) in zip(row, ids_row, grids):
                    im = load_image(im)
                    # The VAE grid must equal the VQ grid x2. The reference uses the image's own size floored
                    # to 16 px, which only agrees for sides that are multiples of 32 in the supported range
                    # (else it crashes); we resize to the VQ grid's size, identical wherever the reference works.
                    px = 2 * self.dit.cfg.patch_size * vae.cfg.downsample  # pixels per VQ cell
                    h, w = gh * px, gw * px
                    x = vae_input(im, h, w).to(self.device, self.dtype)
                    z = vae.normalize_latents(vae.encode(x).mode())
                    size = torch.tensor([[h, w]], device=self.device, dtype=self.dtype)
                    parts.append(dit.encode_reference(z, ids[None].to(self.device), size,
                                                      torch.zeros(1, 2, device=self.device, dtype=self.dtype)))
                samples.append(RefKV.concat(parts))
        kv = RefKV.stack(samples)
        return kv.for_batch(kv.batch_size * n_per_prompt)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, generator=None,
                 seed: int | None = None,
                 num_images_per_prompt: int = 1, latents: torch.Tensor | None = None, output_type: str = "pil",
                 callback_on_step_end=None, prior_token_ids: torch.Tensor | None = None,
                 timer=NO_TIMER) -> GlmImageOutput:
        """Images for `prompt` (a string or a list: a batch), with diffusers' argument names and meanings.

        num_images_per_prompt: as in the reference, the images of one prompt share one AR draw (the prior
        tokens) and differ only in the diffusion noise; for independent draws call once per seed, as
        `glimage generate --num-images` does. seed / generator: the AR sampler's and the noise's seed; neither
        given = fresh entropy. prior_token_ids: (B, 4 * H/32 * W/32) ids as `generate_prior_tokens` returns
        them (one per DiT patch); given, the AR does not run (text-to-image only) -- e.g. to draw several
        decoder samples of one AR draw. timer: a glimage.timing.Timer collects each stage's seconds (`glimage
        bench`). Bad arguments raise glimage.validate.InputError (a ValueError)
        naming the value and the allowed range, before any work is done."""
        prompts = check_prompts(prompt)
        if generator is not None and seed is not None:
            raise InputError("give either generator or seed, not both", "seed")
        if seed is not None:
            check_seed(seed)
        # unset arguments: the model folder's defaults (glimage.json), then the official ones
        if num_inference_steps is None:
            num_inference_steps = self.defaults.get("num_inference_steps", CALL_DEFAULTS["num_inference_steps"])
        if guidance_scale is None:
            guidance_scale = self.defaults.get("guidance_scale", CALL_DEFAULTS["guidance_scale"])
        check_int("num_inference_steps", num_inference_steps, 1, self.scheduler.num_train_timesteps)
        guidance_scale = check_float("guidance_scale", guidance_scale, 0, MAX_GUIDANCE)
        check_int("num_images_per_prompt", num_images_per_prompt, 1, MAX_IMAGES)
        check_choice("output_type", output_type, ("pil", "np", "latent"))
        images = normalize_images(image, len(prompts))
        if images:
            if len(images[0]) > MAX_SOURCE_IMAGES:
                raise InputError(f"{len(images[0])} source images per prompt; at most {MAX_SOURCE_IMAGES}", "image")
            images = [[load_image(im, f"image[{i}]") for i, im in enumerate(row)] for row in images]  # fail early
        if height is None or width is None:
            dh, dw = self.default_size(images)
            height, width = dh if height is None else height, dw if width is None else width
        check_target_size(height, width, self.ar.cfg, text_to_image=not images)
        if generator is None:
            seed = seed if seed is not None else secrets.randbelow(2**32)  # fresh, and reported in .parameters
            generator = torch.Generator().manual_seed(seed)
        params = dict(prompt=prompts[0] if isinstance(prompt, str) else prompts,
                      seed=seed if seed is not None else _initial_seed(generator), height=height, width=width,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)

        with timer("ar"):
            if prior_token_ids is None:
                prior = self._prior(prompts, height, width, images, generator, None, timer)
            else:
                prior = self._given_prior(prior_token_ids, len(prompts), height, width, images)
        B = len(prompts) * num_images_per_prompt
        with timer("text"):
            glyph, neg = self.encode_text(prompts, guidance_scale > 1, num_images_per_prompt)
        with timer("refs"):
            kv = self._reference_kv(images, prior, num_images_per_prompt) if images else None
        shape = (B, *self.latent_shape(height, width))
        if latents is None:
            # diffusers' randn_tensor: drawn on the generator's device, then moved
            latents = torch.randn(shape, generator=generator, device=generator.device, dtype=self.dtype)
        elif tuple(latents.shape) != shape:
            raise InputError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        on_step = None
        if callback_on_step_end is not None:
            def on_step(i, sigma, sigma_next, latents, v):
                return callback_on_step_end(self, i, sigma, {"latents": latents}) or {}
        with timer("dit"):
            latents = self.denoise(latents, glyph, neg, prior.ids.repeat_interleave(num_images_per_prompt, 0),
                                   height, width, num_inference_steps, guidance_scale, kv, on_step)
        if output_type == "latent":
            return GlmImageOutput(latents, prior.ids, params)
        with timer("vae"):
            pixels = self.decode_latents(latents)
        if output_type == "np":
            return GlmImageOutput((pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy(), prior.ids,
                                  params)
        return GlmImageOutput(to_pil(pixels), prior.ids, params)

    # -- the stages, also driven one by one (and batched across requests) by the server

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        ds = 2 ** (len(self.vae.cfg.block_out_channels) - 1)
        return self.dit.cfg.in_channels, height // ds, width // ds

    @torch.no_grad()
    def encode_text(self, prompts: list[str], do_cfg: bool, repeat: int = 1):
        """Glyph embeddings of the prompts' quoted text (B, T, D), and of "" for the unconditional branch."""
        with self._on_device(self.glyph_encoder) as enc:
            glyph = encode_glyphs(enc, prompts, self.device, self.dtype).repeat_interleave(repeat, 0)
            neg = encode_glyphs(enc, [""] * glyph.shape[0], self.device, self.dtype) if do_cfg else None
        return glyph, neg

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, glyph: torch.Tensor, neg: torch.Tensor | None, prior_ids: torch.Tensor,
                height: int, width: int, steps: int, guidance: float | torch.Tensor, kv: RefKV | None = None,
                on_step=None) -> torch.Tensor:
        """The flow-matching Euler loop: noise latents (B, C, h, w) -> clean latents (fp32).

        neg None = no CFG (the conditional branch alone, as the reference does for guidance <= 1); guidance a
        number or one per sample (B,). on_step(i, sigma, sigma_next, latents, v) after step i (latents now at
        sigma_next; v the velocity the step took) may return {"latents": x}
        to replace them, and/or {"rows": idx} to go on with those rows of the batch only (cancelled requests
        leave it)."""
        B = latents.shape[0]
        ds = 2 ** (len(self.vae.cfg.block_out_channels) - 1)
        timesteps, sigmas = get_schedule(steps, height, width, self.scheduler, ds, self.dit.cfg.patch_size)
        latents, prior_ids = latents.to(self.device), prior_ids.to(self.device)
        keep, drop = torch.zeros_like(prior_ids, dtype=torch.bool), torch.ones_like(prior_ids, dtype=torch.bool)
        size = torch.tensor([[height, width]], dtype=self.dtype, device=self.device).repeat(B, 1)
        crop = torch.zeros(B, 2, dtype=self.dtype, device=self.device)
        if isinstance(guidance, torch.Tensor):
            guidance = guidance.to(self.device)
        with self._on_device(self.dit) as dit:
            for i in tqdm(range(steps), desc="denoising", disable=not self.progress, leave=False):
                t = timesteps[i].to(self.device).expand(latents.shape[0])
                x = latents.to(self.dtype)
                v = dit(x, glyph, prior_ids, keep, t, size, crop, kv=kv).float()
                if neg is not None:
                    v = cfg_combine(dit(x, neg, prior_ids, drop, t, size, crop).float(), v, guidance)
                latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
                out = on_step(i, sigmas[i], sigmas[i + 1], latents, v) if on_step is not None else None
                if out:
                    latents = out.get("latents", latents)
                    rows = out.get("rows")
                    if rows is not None:
                        if len(rows) == 0:
                            break
                        rows = torch.as_tensor(rows, device=self.device)
                        latents, glyph, prior_ids, keep, drop, size, crop = (
                            a.index_select(0, rows) for a in (latents, glyph, prior_ids, keep, drop, size, crop))
                        neg = neg.index_select(0, rows) if neg is not None else None
                        if isinstance(guidance, torch.Tensor):
                            guidance = guidance.index_select(0, rows)
                        kv = kv.select(rows) if kv is not None else None
        return latents

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents -> pixels (B, 3, H, W) in [-1, 1]."""
        with self._on_device(self.vae) as vae:
            z = vae.denormalize_latents(latents.to(self.device, self.dtype))
            if self.channels_last:
                z = z.contiguous(memory_format=torch.channels_last)
            return vae.decode(z).contiguous()

    @torch.no_grad()
    def preview(self, latents: torch.Tensor, v: torch.Tensor, sigma) -> list[Image.Image]:
        """The current estimate of the clean image from latents at `sigma` and the last velocity v:
        x0 = x - sigma * v (flow matching: x = (1 - s) x0 + s eps, v = eps - x0), decoded."""
        return to_pil(self.decode_latents(latents - float(sigma) * v))

    @torch.no_grad()
    def draw_priors(self, prompts: list[str], height: int, width: int, images: list[list] | None,
                    seeds: list[int], should_stop=None) -> Prior:
        """The AR stage for a batch of independent requests: row b samples from its own generator seeded
        seeds[b], as `pipe(prompts[b], seed=seeds[b])` alone does. should_stop: see generate_grid_tokens."""
        with self._on_device(self.ar) as ar:
            gens = [manual_generator(self.ar_device, s) for s in seeds]
            return run_prior(ar, self.tokenizer, prompts, height, width, images, gens, self.progress,
                             step=self.decode_step, should_stop=should_stop)

    @property
    def ar_device(self) -> torch.device:
        """Where the AR runs: the pipeline's device, or its own (from_pretrained(ar_device=...))."""
        return self.device if self.offload or self.ar is None else self.ar.device
