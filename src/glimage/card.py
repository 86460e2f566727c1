"""What a front end needs to know of a model to check requests before any weights load: the AR's config (sizes,
grids, context), the folder's defaults, and for the server the tokenizer (does a prompt fit the context?). A
local server takes it from its pipeline; a Ray ingress (glimage.cluster) asks the AR deployment for it, and
`glimage generate --prompts` reads it from the folder, so no front end loads a 9 B model to answer a 400."""

from __future__ import annotations

from dataclasses import dataclass, field

from pathlib import Path

from .validate import default_size


@dataclass(frozen=True)
class ModelCard:
    ar_cfg: object  # models.ar.ARConfig
    tokenizer: object  # GlmTokenizer (picklable: it crosses to the ingress on Ray)
    defaults: dict = field(default_factory=dict)  # glimage.json: height, width, num_inference_steps, guidance_scale
    num_train_timesteps: int = 1000
    fast: dict = field(default_factory=dict)  # the opt-in fast modes in effect (written into every image's params)
    device: str = "cpu"  # the DiT's

    @classmethod
    def read(cls, preset: str, folder: Path | None) -> "ModelCard":
        """From a folder's JSON files alone (no weights, no tokenizer), or a random:PRESET's config."""
        from .checkpoint import read_json

        if folder is None:
            from .config import PRESETS
            cfg = PRESETS[preset]
            return cls(cfg.ar, None, {}, cfg.scheduler.num_train_timesteps)
        from .convert.ar import read_ar_config
        defaults = read_json(folder / "glimage.json") if (folder / "glimage.json").is_file() else {}
        scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
        return cls(read_ar_config(folder), None, defaults, scheduler.get("num_train_timesteps", 1000))

    @classmethod
    def of(cls, pipe) -> "ModelCard":
        return cls(pipe.ar.cfg, pipe.tokenizer, dict(pipe.defaults), pipe.scheduler.num_train_timesteps,
                   dict(pipe.fast), str(pipe.device))

    def default_size(self, source: tuple[int, int] | None = None) -> tuple[int, int]:
        """(height, width) when none is given; for an edit, its first source's (width, height), snapped."""
        return default_size(self.ar_cfg, self.defaults, source)


def model_name(model: str | None) -> str:
    """A served model's id (answers, /v1/models): glimage-shapes for the shipped one, a folder's name, or
    random:PRESET."""
    from .pipeline import DEFAULT_MODEL

    if model and model.startswith("random:"):
        return model
    if model is None or Path(model).resolve() == DEFAULT_MODEL.resolve():
        return "glimage-shapes"
    return Path(model).resolve().name or "glm-image"
