"""Training run configuration: one frozen dataclass, read from TOML/YAML or a shipped recipe, with overrides.

`glimage train CONFIG [--set key=value ...]`: CONFIG is a file path or the name of a recipe in
`glimage/train/recipes/` (e.g. `tiny-ar`). `--set` values are parsed as TOML scalars/arrays
(`--set lr=3e-4 --set model.ar.text.num_hidden_layers=4 --set activation_checkpointing=true`).
Keys starting with `model.` override fields of the model preset (see `glimage.config.replace`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..validate import (MAX_GUIDANCE, MAX_SEED, MAX_STEPS, InputError, check_choice, check_dataclass, check_float,
                        check_int)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

RECIPES = Path(__file__).parent / "recipes"
STAGES = ("vae", "tokenizer", "ar", "decoder", "grpo", "flow_grpo")


@dataclass(frozen=True)
class TrainConfig:
    stage: str  # vae | tokenizer | ar | decoder | grpo | flow_grpo
    preset: str = "tiny"  # model architecture, a name in glimage.config.PRESETS
    model: dict = field(default_factory=dict)  # dotted overrides of the preset ("ar.text.num_hidden_layers": 4)
    base: str = ""  # GLM-Image folder giving initial weights of the trained part and the frozen parts; "" = random
    out: str = "runs/default"
    steps: int = 100  # optimizer steps
    stop_at: int = 0  # > 0: end this run after that step (checkpointed, no export); the schedule still spans
    # `steps`, and rerunning without it finishes the run (e.g. with more threads)
    seed: int = 0
    # optimisation
    batch_size: int = 16  # global batch: all ranks and accumulation steps together
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine floor
    warmup: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    ema: float = 0.0  # EMA decay of the weights (decoder); 0 disables
    # systems
    dtype: str = "float32"  # parameter/compute dtype under FSDP2 mixed precision (bfloat16 on accelerators)
    activation_checkpointing: bool = False
    compile: bool = False
    device: str = ""  # "" = best available
    backend: str = "torch"  # torch | mindspore (stages ar and decoder: glimage.mindspore.train)
    checkpoint_every: int = 50  # 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    sample_every: int = 0  # write sample images every N steps (image stages); 0 = only at the end
    sample_steps: int = 8  # denoising steps of the sample images (ar, decoder stages)
    sample_guidance: float = 1.5  # their classifier-free guidance scale; with image_size and sample_steps, the
    # export's generation defaults (glimage.json): the size, steps and guidance it was trained and evaluated at
    tensorboard: bool = True
    # data
    data: str = ""  # image folder with metadata.jsonl, or a directory/glob of .tar shards; "" = a generated shapes set
    data_n: int = 2000  # size of the generated shapes set
    image_size: int = 128  # training resolution (bucket area when buckets = true)
    buckets: bool = False  # aspect-ratio buckets at multiples of 32
    cache: bool = False  # pre-tokenise with the frozen encoders once (VQ ids, VAE latents)
    num_workers: int = 0
    # stage specific
    cond_drop: float = 0.1  # decoder: probability of dropping prior tokens + glyphs (classifier-free guidance)
    train_glyph: bool = False  # decoder: train the ByT5 glyph encoder with the DiT (exported to text_encoder/)
    glyph_prior_drop: float = 0.0  # decoder: share of the prior tokens dropped (glyphs kept) in samples with
    # quoted text, so that their letters must come from the glyphs, not from the VQ tokens
    glyph_prior_swap: float = 0.0  # decoder: share of the samples with quoted text that get the prior tokens of
    # another such sample of the batch (another word's sign), as the AR's tokens of a word it cannot spell
    kl_weight: float = 1e-6  # vae
    color_aug: bool = False  # vae: a third of the samples in random grey levels (see stages/vae.py)
    freeze_encoder: bool = False  # vae: train the decoder only; latents and their statistics stay the base's
    commit_weight: float = 0.25  # tokenizer: VQ commitment loss weight (beta)
    refit_codes: int = 0  # tokenizer: at export, move up to this many unused codes onto the worst-served outputs
    # RL stages (grpo: the AR; flow_grpo: the DiT)
    group_size: int = 8  # images drawn per caption (the group whose rewards set the advantages)
    reward: str = "shapes"  # a name, weighted sum, module:function or URL (glimage.train.rewards)
    reward_timeout: float = 120.0  # seconds a reward server may take per batch
    reward_steps: int = 10  # denoising steps of the images the reward scores (fewer than at inference)
    positive_only: bool = False  # drop the terms of draws below their group's mean (advantage < 0)
    adv_scale: bool = True  # divide advantages by their group's std (GRPO); false: mean-centred only (Dr. GRPO)
    clip_range: float = 0.2  # PPO clip of the ratio pi / pi_old per token or denoising step
    kl_coef: float = 0.0  # weight of KL(pi || pi_ref) to the frozen starting model
    nucleus_logp: bool = True  # grpo: log p under the sampler's top-k/top-p distribution (false: full softmax)
    noise_level: float = 0.7  # flow_grpo: the SDE sampler's noise (0 = the Euler ODE, no exploration)
    lora_rank: int = 0  # > 0: LoRA fine-tuning of the stage's transformer from `base`
    lora_alpha: float = 16.0
    lora_merge: bool = True  # export merged weights (official layout) or keep the adapter separate

    def __post_init__(self):
        check_dataclass(self)
        if self.stage not in STAGES:
            raise InputError(f"stage={self.stage!r} must be one of {STAGES}")
        check_choice("backend", self.backend, ("torch", "mindspore"))
        if self.backend == "mindspore" and self.stage not in ("ar", "decoder"):
            raise InputError(f"backend=mindspore trains the stages ar and decoder, not {self.stage!r}", "backend")
        check_int("steps", self.steps, 1)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_float("lr", self.lr, 0, 1, lo_open=True)
        check_float("min_lr", self.min_lr, 0, self.lr)
        for name in ("warmup", "num_workers", "sample_every", "lora_rank", "refit_codes", "checkpoint_every"):
            check_int(name, getattr(self, name), 0)
        for name in ("keep_checkpoints", "log_every", "data_n", "image_size", "group_size",
                     "reward_steps"):
            check_int(name, getattr(self, name), 1)
        for name in ("weight_decay", "grad_clip", "kl_weight", "commit_weight", "kl_coef"):
            check_float(name, getattr(self, name), 0)
        for name in ("beta1", "beta2", "ema"):
            check_float(name, getattr(self, name), 0, 0.9999999)
        for name in ("cond_drop", "glyph_prior_drop", "glyph_prior_swap"):
            check_float(name, getattr(self, name), 0, 1)
        check_float("lora_alpha", self.lora_alpha, 0, lo_open=True)
        check_float("clip_range", self.clip_range, 0, 1, lo_open=True)
        check_float("noise_level", self.noise_level, 0, 2)
        check_float("reward_timeout", self.reward_timeout, 0, lo_open=True)
        check_int("sample_steps", self.sample_steps, 1, MAX_STEPS)
        check_float("sample_guidance", self.sample_guidance, 0, MAX_GUIDANCE)
        if not 0 <= self.stop_at <= self.steps:
            raise InputError(f"stop_at={self.stop_at} must be in [0, steps={self.steps}] (0 = run to the end)")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise InputError(f"batch_size={self.batch_size} must be a positive multiple of grad_accum={self.grad_accum}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InputError(f"dtype={self.dtype!r} must be float32, bfloat16 or float16")
        for key in ("color_aug", "freeze_encoder"):
            if getattr(self, key) and self.stage != "vae":
                raise InputError(f"{key}=true is for the vae stage only (stage={self.stage!r})")
        if self.refit_codes and self.stage != "tokenizer":
            raise InputError(f"refit_codes={self.refit_codes} is for the tokenizer stage only (stage={self.stage!r})")
        if self.train_glyph and self.stage not in ("decoder", "flow_grpo"):
            raise InputError(f"train_glyph=true is for the decoder stages only (stage={self.stage!r})")
        if self.train_glyph and self.lora_rank:
            raise InputError(f"train_glyph=true trains the glyph encoder fully; it does not combine with LoRA "
                             f"(lora_rank={self.lora_rank})")
        if self.positive_only and self.stage not in ("grpo", "flow_grpo"):
            raise InputError(f"positive_only=true is for the RL stages only (stage={self.stage!r})")
        if self.kl_coef and self.stage not in ("grpo", "flow_grpo"):
            raise InputError(f"kl_coef={self.kl_coef} is for the RL stages grpo and flow_grpo (stage={self.stage!r})")
        if self.stage in ("grpo", "flow_grpo") and self.group_size < 2:
            raise InputError(f"group_size={self.group_size} must be >= 2 (GRPO compares the samples of a group)")
        if self.freeze_encoder and not self.base:
            raise InputError("freeze_encoder=true needs a base folder whose VAE encoder to keep")


def _read(path: Path) -> dict:
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # optional: pip install glimage[train]
            with open(path, encoding="utf-8") as f:
                d = yaml.safe_load(f) or {}
        else:
            with open(path, "rb") as f:
                d = tomllib.load(f)
    except ImportError:
        raise InputError(f"{path} is YAML: pip install pyyaml (or glimage[train]), or write it as TOML") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # TOMLDecodeError and YAMLError's parse errors
        raise InputError(f"{path} is not a readable {'YAML' if path.suffix in ('.yaml', '.yml') else 'TOML'} "
                         f"config: {e}") from None
    except Exception as e:  # yaml.YAMLError does not derive from ValueError
        if type(e).__module__.startswith("yaml"):
            raise InputError(f"{path} is not a readable YAML config: {e}") from None
        raise
    if not isinstance(d, dict):
        raise InputError(f"{path} must hold a table of key = value pairs, got a {type(d).__name__}")
    return d


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare strings: --set out=runs/x


def load_config(config: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    path = Path(config)
    if not path.is_file():
        recipe = RECIPES / f"{config}.toml"
        if not recipe.is_file():
            names = sorted(p.stem for p in RECIPES.glob("*.toml"))
            raise InputError(f"{config!r} is neither a file nor a shipped recipe; recipes: {names}")
        path = recipe
    d = _read(path)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InputError(f"unknown keys in {path}: {unknown}")
    model = dict(d.pop("model", {}) or {})
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise InputError(f"--set {item!r} must look like key=value")
        value = _parse_value(text)
        if key.startswith("model."):
            model[key[len("model."):]] = value
        elif key in names:
            d[key] = value
        else:
            raise InputError(f"--set {key!r}: unknown key; known keys: {sorted(names)}")
    d["model"] = _flatten(model)
    _check_model(d.get("preset", "tiny"), d["model"])
    return TrainConfig(**d)


def _check_model(preset: str, model: dict) -> None:
    """`model.*` overrides name real fields of the preset's configs and have their types."""
    from ..config import PRESETS, replace
    if preset not in PRESETS:
        raise InputError(f"preset={preset!r} must be one of {sorted(PRESETS)}", "preset")
    for key in model:
        node, path = PRESETS[preset], []
        for part in key.split("."):
            if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
                fields = sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []
                raise InputError(f"model.{key}: {'.'.join(['model', *path, part])} names no field of the model "
                                 f"config; fields there: {fields}", "model")
            node, path = getattr(node, part), [*path, part]
    cfg = replace(PRESETS[preset], **{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()})
    check_dataclass(cfg, "model.")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
