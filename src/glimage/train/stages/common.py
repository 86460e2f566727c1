"""What the four stages share: the model configuration and base folder, frozen components, export, batches.

Base folder: `cfg.base` is an official GLM-Image folder giving the initial weights of the trained part and the
frozen parts; "" means the preset (`cfg.preset` + `cfg.model` overrides) with random weights drawn by
`GlmImagePipeline.from_config(config, seed=cfg.seed)` -- the same draw in setup and in export, so a stage trained
against a random frozen part exports that very part. With a base folder, `cfg.model` may only override the
trained component (a changed shape means that component starts from scratch); frozen parts come as they are.

Export writes a complete folder: the base (its weight files hard-linked, everything else copied) or the random
preset, with the trained component's subfolder written anew; into `<out>.tmp`, then swapped in, so a crash
never leaves half an export.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ...checkpoint import CheckpointError, load_strict, read_json, read_state_dict, write_json
from ...config import ARConfig, GlmImageConfig, get_preset, replace
from ...convert.ar import from_official as ar_from_official
from ...convert.ar import read_ar_config
from ...convert.dit import config_from_official as dit_config
from ...convert.glyph import config_from_official as glyph_config
from ...convert.vae import config_from_official as vae_config
from ...image import preprocess_source
from ...models.vision import VisionEncoder, VQTokenizer
from ...validate import InputError
from ..config import TrainConfig

SAMPLE_PROMPTS = ("a red circle", "a blue square on the left", "a yellow triangle above a purple circle",
                  'a sign that says "GLM"')


# ----------------------------------------------------------------------------------------- configuration

def read_folder_config(root: str | os.PathLike) -> GlmImageConfig:
    from ...convert.scheduler import scheduler_from_official
    root = Path(root)
    return GlmImageConfig(ar=read_ar_config(root), glyph=glyph_config(read_json(root / "text_encoder" / "config.json")),
                          dit=dit_config(read_json(root / "transformer" / "config.json")),
                          vae=vae_config(read_json(root / "vae" / "config.json")),
                          scheduler=scheduler_from_official(read_json(root / "scheduler" / "scheduler_config.json")))


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def model_config(cfg: TrainConfig, trained: tuple[str, ...]) -> tuple[GlmImageConfig, GlmImageConfig]:
    """(config to train with, config of the base). `trained` = dotted prefixes of the trained component."""
    if cfg.base:
        root = Path(cfg.base)
        if not (root / "vision_language_encoder").is_dir():
            raise InputError(f"base={cfg.base!r} is not a GLM-Image folder (no vision_language_encoder/); run the "
                             f"recipe that produces it first, or set base=\"\" to start from random weights")
        base = read_folder_config(root)
        frozen = sorted(k for k in cfg.model if not k.startswith(trained))
        if frozen:
            raise InputError(f"model overrides {frozen} change a frozen component of base={cfg.base!r}; with a base "
                             f"folder only the trained component ({', '.join(trained)}*) may be overridden")
    else:
        base = get_preset(cfg.preset)
    overrides = {k: _tuples(v) for k, v in cfg.model.items()}
    return (replace(base, **overrides) if overrides else base), base


def random_pipeline(model_cfg: GlmImageConfig, seed: int, device="cpu", dtype=torch.float32):
    """The preset with random weights (CPU, fp32 by default) exactly as export writes it when there is no base
    folder."""
    from ...pipeline import GlmImagePipeline
    with torch.random.fork_rng(devices=[]):  # from_config seeds the global RNG; leave the caller's alone
        return GlmImagePipeline.from_config(model_cfg, seed=seed, device=device, dtype=dtype)


def seeded_init(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def read_prefixed(folder: str | os.PathLike, prefixes: tuple[str, ...], device="cpu",
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a component folder whose (official) names start with one of `prefixes`: the frozen
    tokenizer needs ~1 GB of a 20 GB AR checkpoint."""
    return read_state_dict(folder, device, dtype, prefixes)


def load_part(module: nn.Module, root: str | os.PathLike, prefixes: tuple[str, ...], device="cpu", dtype=None):
    """Load the AR-checkpoint tensors of `module` (named like GlmImageAR's, e.g. `visual.*`) from `root`."""
    sd = ar_from_official(read_prefixed(Path(root) / "vision_language_encoder", prefixes, device, dtype))
    return load_strict(module, sd, what=f"{root}/vision_language_encoder ({', '.join(prefixes)}*)")


# --------------------------------------------------------------------------------------------- tokenizer

class VQEncoder(nn.Module):
    """The semantic-VQ tokenizer of GlmImageAR (`visual` + `vqmodel`, same names) on its own."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionEncoder(cfg.vision)
        self.vqmodel = VQTokenizer(cfg.vq, cfg.vision.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, h, w) -> ids (B, h/p, w/p)
        return self.vqmodel(self.visual(pixels))


class RowCache:
    """Per-sample outputs of frozen encoders, memoised by dataset index (`cache = true`): one table per key
    (e.g. a grid shape) and output, `size` rows, kept on the CPU. Many small per-sample tensors in a dict
    fragment the heap instead: the AR stage's resident memory grew by ~250 KB per cached image (12.6 GB for
    48 000 images); with these tables it stayed at ~1.2 GB (300 steps measured)."""

    def __init__(self, size: int):
        self.size = size
        self._tables: dict = {}  # key -> (filled (size,) bool, [table (size, ...)] per output)

    def get(self, key, index: list[int], device=None) -> list[torch.Tensor] | None:
        """The outputs for these rows, or None unless every row is filled."""
        if key not in self._tables:
            return None
        filled, tables = self._tables[key]
        rows = torch.as_tensor(index)
        if not bool(filled[rows].all()):
            return None
        return [t[rows].to(device) for t in tables]

    def put(self, key, index: list[int], outputs: list[torch.Tensor]) -> None:
        if key not in self._tables:
            self._tables[key] = (torch.zeros(self.size, dtype=torch.bool),
                                 [torch.empty((self.size, *o.shape[1:]), dtype=o.dtype) for o in outputs])
        filled, tables = self._tables[key]
        rows = torch.as_tensor(index)
        for table, o in zip(tables, outputs):
            table[rows] = o.detach().cpu()
        filled[rows] = True


def frozen_vq_encoder(cfg: TrainConfig, model_cfg: GlmImageConfig, device, dtype) -> VQEncoder:
    if cfg.base:
        with torch.device("meta"):
            enc = VQEncoder(model_cfg.ar)
        load_part(enc, cfg.base, ("model.visual.", "model.vqmodel."), device, dtype)
    else:
        ar = random_pipeline(model_cfg, cfg.seed).ar
        enc = VQEncoder(model_cfg.ar)
        enc.load_state_dict({k: v for k, v in ar.state_dict().items() if k.startswith(("visual.", "vqmodel."))})
        enc = enc.to(device, dtype)
    return enc.eval().requires_grad_(False)


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL; exact for tensors made from uint8 images."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def normalize_pil(image: Image.Image, h: int, w: int) -> torch.Tensor:
    """The tail of `glimage.image.preprocess_source` at a given size: PIL bicubic on uint8, float64 rescale,
    mean = std = 0.5 -> (3, h, w) float32."""
    arr = np.asarray(image.resize((w, h), Image.BICUBIC))
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def vq_pixels(images: torch.Tensor, gh: int, gw: int, patch: int) -> torch.Tensor:
    """Images (B, 3, H, W) -> the ViT input whose patch grid is (gh, gw): (B, 3, gh*patch, gw*patch).

    Inference tokenises an image after smart_resize, which halves it: the 16-px patch grid is the image / 32.
    For a target H x W (multiples of 32) this is exactly (H/32, W/32) with the resize to (H/2, W/2) done here
    (equal to preprocess_source where smart_resize keeps the size; the size is forced here so that bucketed
    images of any area give the grid the AR generates). The preview grid (ph, pw) is the same image resized to
    (ph*16, pw*16): the picture the large grid shows, at the preview's resolution."""
    return torch.stack([normalize_pil(to_pil(x), gh * patch, gw * patch) for x in images])


@torch.no_grad()
def tokenize_sources(enc: VQEncoder, sources: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Source images [b][i] (3, h, w) in [-1, 1] -> VQ id grids [b][i] (gh, gw), through the inference
    preprocessing (`preprocess_source`: smart_resize within source_min/max_pixels, bicubic, normalise), images
    of one size batched -- `glimage.prior.tokenize_sources` on a VQEncoder."""
    c = enc.cfg
    p = next(enc.parameters())
    pixels = [[preprocess_source(to_pil(s), c.vision.patch_size, c.source_min_pixels, c.source_max_pixels,
                                 c.max_aspect_ratio) for s in row] for row in sources]
    out: list[list] = [[None] * len(row) for row in pixels]
    by_size: dict[tuple, list] = {}
    for b, row in enumerate(pixels):
        for i, x in enumerate(row):
            by_size.setdefault(tuple(x.shape), []).append((b, i))
    for members in by_size.values():
        ids = enc(torch.stack([pixels[b][i] for b, i in members]).to(p.device, p.dtype))
        for (b, i), g in zip(members, ids):
            out[b][i] = g
    return out


# ---------------------------------------------------------------------------------------------- batches

def make_dataset(cfg: TrainConfig):
    from ..data import ImageTextDataset, prepare_data
    return ImageTextDataset(prepare_data(cfg), cfg.image_size, cfg.buckets)


def collate(samples: list[dict[str, Any] | None]) -> dict[str, Any]:
    samples = [s for s in samples if s is not None]
    if not samples:
        return {"images": None, "texts": [], "sources": [], "index": []}
    sizes = sorted({tuple(s["image"].shape) for s in samples})
    if len(sizes) > 1:
        raise InputError(f"one batch holds images of different sizes {sizes}; use buckets=true or one image_size")
    return {"images": torch.stack([s["image"] for s in samples]), "texts": [s["text"] for s in samples],
            "sources": [list(s.get("sources") or []) for s in samples], "index": [s["index"] for s in samples]}


def groups_by(keys: list) -> dict[Any, list[int]]:
    out: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() on the CPU with DTensors gathered (call on every rank if the model is sharded)."""
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().cpu()
    return out


def empty_output(model: nn.Module):
    from ..stage import StepOutput
    p = next(p for p in model.parameters() if p.requires_grad)
    zero = p.new_zeros(()).float().requires_grad_(True)
    return StepOutput(zero, torch.zeros((), device=p.device))


# ----------------------------------------------------------------------------------------------- export

def _link_or_copy(src: str, dst: str) -> str:
    # weight files are hard-linked (never written in place: a trained component's folder is written anew);
    # every other file is copied because exporters may rewrite e.g. processor/processor_config.json
    if src.endswith(".safetensors"):
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass
    return shutil.copy2(src, dst)


def generation_defaults(cfg: TrainConfig) -> dict:
    """What an export's glimage.json records, so that the pipeline's defaults are the size, steps and guidance
    the run trained and drew its samples at (not the official model's 1024x1024, 50 steps)."""
    return {"height": cfg.image_size, "width": cfg.image_size, "num_inference_steps": cfg.sample_steps,
            "guidance_scale": cfg.sample_guidance}


def export_folder(cfg: TrainConfig, model_cfg: GlmImageConfig, out_dir: str | os.PathLike,
                  replaced: tuple[str, ...], write: Callable[[Path], None]) -> Path:
    """A complete GLM-Image folder at out_dir: the base with the `replaced` subfolders written by `write(tmp)`."""
    out = Path(out_dir)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if cfg.base:
        base = Path(cfg.base).resolve()
        shutil.copytree(base, tmp, copy_function=_link_or_copy,
                        ignore=lambda d, names: [n for n in names if Path(d).resolve() == base and n in replaced])
    else:
        random_pipeline(model_cfg, cfg.seed).save_pretrained(tmp)
        for name in replaced:
            shutil.rmtree(tmp / name, ignore_errors=True)
    write(tmp)
    if not (tmp / "model_index.json").is_file():
        raise CheckpointError(f"export of {out} is incomplete: no model_index.json")
    write_json(tmp / "glimage.json", generation_defaults(cfg))  # not the base's: this run's
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def save_images(images, out_dir: str | os.PathLike, step: int, prompts=None) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        path = out / f"step{step:06d}-{i}.png"
        im.save(path)
        paths.append(path)
    if prompts is not None:
        (out / f"step{step:06d}.txt").write_text("\n".join(prompts) + "\n")
    return paths


def export_ar(cfg: TrainConfig, model_cfg: GlmImageConfig, out_dir: str | os.PathLike,
              parts: dict[str, torch.Tensor], keep: tuple[str, ...],
              extra: Callable[[Path], None] | None = None) -> Path:
    """Export with `vision_language_encoder/` rewritten: the trained tensors `parts` (GlmImageAR names) plus the
    base AR's tensors whose names start with `keep` (e.g. the language model when the tokenizer was trained)."""
    from ...convert.ar import save_ar
    from ...models.ar import GlmImageAR

    if cfg.base:
        official = tuple("lm_head." if k == "lm_head." else "model." + k for k in keep)
        base = ar_from_official(read_prefixed(Path(cfg.base) / "vision_language_encoder", official))
    else:
        base = {k: v for k, v in random_pipeline(model_cfg, cfg.seed).ar.state_dict().items() if k.startswith(keep)}
    with torch.device("meta"):
        ar = GlmImageAR(model_cfg.ar)
    load_strict(ar, {**base, **{k: v.detach().cpu() for k, v in parts.items()}}, what="exported AR")

    def write(root: Path) -> None:
        save_ar(ar, root)
        if extra is not None:
            extra(root)

    return export_folder(cfg, model_cfg, out_dir, ("vision_language_encoder",), write)


def sample_generators(batch: dict, generator: torch.Generator, n: int) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by the loop from the sample's place in the global batch
    (`batch["sample_seeds"]`), so the noise a sample gets does not depend on how the global batch is split
    over ranks and accumulation steps. Called outside the loop (tests), seeds come from `generator`."""
    seeds = batch.get("sample_seeds")
    if seeds is None:
        seeds = torch.randint(0, 2**62, (n,), generator=generator, device=generator.device).tolist()
    if len(seeds) != n:
        raise InputError(f"{len(seeds)} sample seeds for {n} samples")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class StageBase:
    """What every stage does alike: its dataset (made once, or injected), collation, and the weights of the
    trained part it exports (LoRA adapters merged, or the untouched base when they are kept apart)."""

    cfg: TrainConfig
    _dataset = None
    _encoded: RowCache | None = None

    def dataset(self):
        if self._dataset is None:
            self._dataset = make_dataset(self.cfg)
        return self._dataset

    def encoded(self) -> RowCache | None:
        """The memo of the frozen encoders' outputs per sample with `cache = true` (made on first use), else None."""
        if self.cfg.cache and self._encoded is None:
            self._encoded = RowCache(len(self.dataset()))
        return self._encoded

    def collate(self, samples):
        return collate(samples)

    def trained_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from ..lora import merged_state_dict, unmerged_base_state_dict
        if not self.cfg.lora_rank:
            return {k: v.detach() for k, v in model.state_dict().items()}
        return merged_state_dict(model) if self.cfg.lora_merge else unmerged_base_state_dict(model)
