"""glimage: GLM-Image in plain PyTorch."""

from .config import PRESETS, GlmImageConfig

__all__ = ["GlmImagePipeline", "GlmImageConfig", "PRESETS", "from_pretrained", "from_config"]
__version__ = "0.1.0"


def __getattr__(name):
    # lazy: `import glimage` stays light for the CLI's --help
    if name == "GlmImagePipeline":
        from .pipeline import GlmImagePipeline
        return GlmImagePipeline
    if name in ("from_pretrained", "from_config"):  # the backend's choice: glimage.backends
        from . import backends
        return getattr(backends, name)
    raise AttributeError(name)
