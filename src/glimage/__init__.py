"""glimage: GLM-Image in plain PyTorch."""

from .config import PRESETS, GlmImageConfig

__all__ = ["GlmImagePipeline", "GlmImageConfig", "PRESETS"]
__version__ = "0.1.0"


def __getattr__(name):
    # lazy: `import glimage` stays light for the CLI's --help
    if name == "GlmImagePipeline":
        from .pipeline import GlmImagePipeline
        return GlmImagePipeline
    raise AttributeError(name)
