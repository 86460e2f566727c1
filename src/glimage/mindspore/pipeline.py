"""`MindSporePipeline`: GlmImagePipeline with every model running in MindSpore.

    pipe = MindSporePipeline.from_pretrained("GLM-Image/", device="npu")
    # = glimage.from_pretrained("GLM-Image/", device="npu", backend="mindspore") (glimage.backends)
    image = pipe("a red circle", seed=0).images[0]

The class is the PyTorch pipeline with its four components swapped for MindSpore models behind the same
interfaces (bridge.py): arguments, validation, defaults, outputs and the meaning of a seed are the PyTorch
path's, by construction. Tested: the same prior tokens and an image within 1/255 of `backend="torch"` for the
same seed, text-to-image and image-to-image (tests/test_mindspore.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mindspore as ms
import torch

from ..checkpoint import read_json
from ..convert.scheduler import scheduler_from_official
from ..pipeline import GlmImagePipeline, model_folder
from ..prompt import GlmTokenizer
from ..validate import InputError, check_choice
from . import weights
from .ar import GlmImageAR
from .bridge import ARBridge, DiTBridge, GlyphBridge, VAEBridge
from .dit import GlmImageDiT
from .glyph import GlyphEncoder
from .vae import AutoencoderKL

DEVICE_TARGETS = {"cpu": "CPU", "npu": "Ascend", "ascend": "Ascend", "cuda": "GPU", "gpu": "GPU"}


def set_device(device: str | None = None) -> str:
    """Map the PyTorch path's --device names onto MindSpore's device_target (and id): cpu -> CPU, npu[:N] ->
    Ascend, cuda[:N] -> GPU; None / auto -> Ascend or GPU when MindSpore has one, else CPU. PyNative mode
    (shapes change with every prompt); enable_compile takes the hot loops into graph mode."""
    name, idx = "auto", 0
    if device not in (None, "auto"):
        name, _, num = str(device).lower().partition(":")
        check_choice("device", name, ("auto", *DEVICE_TARGETS))
        if num and not num.isdigit():
            raise InputError(f"device {device!r}: the index after ':' must be a number", "device")
        idx = int(num or 0)
    target = DEVICE_TARGETS.get(name) or _best_target()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device(target, idx)
    if target == "CPU":
        # PyNative's asynchronous launch pipeline costs more than the kernels on a small CPU: its dispatch
        # threads fight the kernel threads (the shipped model's AR decode step: 0.47 s async, 0.023 s blocking)
        ms.runtime.launch_blocking()
    return target


def _best_target() -> str:
    """Ascend when CANN is installed, else GPU when CUDA is, else CPU. Checked before asking MindSpore, whose
    probe of a missing plugin prints library-loading errors."""
    present = {"Ascend": bool(os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME")
                              or Path("/usr/local/Ascend").is_dir()),
               "GPU": shutil.which("nvidia-smi") is not None}
    for target, there in present.items():
        try:
            if there and ms.hal.is_available(target):
                return target
        except Exception:  # MindSpore raises for a backend whose plugin cannot load
            continue
    return "CPU"


def set_cpu_threads(n: int) -> None:
    """MindSpore's CPU kernel threads (the CLI's --threads; before the first op)."""
    from mindspore.device_context.cpu.op_tuning import threads_num
    threads_num(n)


def ms_dtype(dtype, target: str):
    """The compute dtype: bf16 on Ascend/GPU, fp32 on the CPU (MindSpore has no CPU bf16 kernels)."""
    if dtype in (None, "auto"):
        return ms.float32 if target == "CPU" else ms.bfloat16
    name = str(dtype).removeprefix("torch.")
    check_choice("dtype", name, tuple(weights.DTYPES))
    if target == "CPU" and name == "bfloat16":
        raise InputError("dtype bfloat16 has no MindSpore CPU kernels; use float32 on the CPU", "dtype")
    return weights.DTYPES[name]


class MindSporePipeline(GlmImagePipeline):
    backend = "mindspore"

    def __init__(self, ar: GlmImageAR, tokenizer: GlmTokenizer, glyph_encoder: GlyphEncoder, dit: GlmImageDiT,
                 vae: AutoencoderKL, scheduler, target: str = "CPU"):
        super().__init__(ARBridge(ar), tokenizer, GlyphBridge(glyph_encoder), DiTBridge(dit), VAEBridge(vae),
                         scheduler, torch.device("cpu"), torch.float32)
        self.target = target  # MindSpore's device_target; self.device is where the shared torch code runs

    def _tune_for_cpu(self) -> None:  # the torch layouts do not apply
        pass

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device=None, dtype=None, offload: bool = False,
                        ar_device=None) -> "MindSporePipeline":
        """An official GLM-Image folder (no path: the shipped model), strictly, without torch for the weights."""
        if offload or ar_device is not None:
            raise InputError("offload and ar_device are options of the PyTorch backend", "offload")
        path = model_folder(path)
        for component in ("vision_language_encoder", "transformer"):
            if (path / component / "lora.json").is_file():
                raise InputError(f"{path / component} holds an unmerged LoRA adapter: export it merged "
                                 "(lora_merge = true) for the MindSpore backend", "model")
        target = set_device(device)
        dt = ms_dtype(dtype, target)
        pipe = cls(weights.load_ar(path, dt), GlmTokenizer.from_folder(path / "processor"),
                   weights.load_glyph_encoder(path / "text_encoder", dt), weights.load_dit(path / "transformer", dt),
                   weights.load_vae(path / "vae", dt),
                   scheduler_from_official(read_json(path / "scheduler" / "scheduler_config.json")), target)
        if (path / "glimage.json").is_file():
            pipe.defaults = read_json(path / "glimage.json")
        return pipe

    @classmethod
    def from_config(cls, cfg, seed: int = 0, device=None, dtype=None) -> "MindSporePipeline":
        """Any preset with the random weights GlmImagePipeline.from_config(cfg, seed) draws (the same values)."""
        return cls.from_torch(GlmImagePipeline.from_config(cfg, seed, device="cpu", dtype=torch.float32), device, dtype)

    @classmethod
    def from_torch(cls, pipe: GlmImagePipeline, device=None, dtype=None) -> "MindSporePipeline":
        """The same weights, tokenizer, scheduler and defaults as a PyTorch pipeline, in MindSpore."""
        target = set_device(device)
        dt = ms_dtype(dtype, target)
        mods = [weights.from_torch(cls_(m.cfg), m, dt) for cls_, m in
                ((GlmImageAR, pipe.ar), (GlyphEncoder, pipe.glyph_encoder), (GlmImageDiT, pipe.dit),
                 (AutoencoderKL, pipe.vae))]
        out = cls(mods[0], pipe.tokenizer, mods[1], mods[2], mods[3], pipe.scheduler, target)
        out.defaults = dict(pipe.defaults)
        return out

    def _torch_only(self, what: str):
        raise InputError(f"{what} is an option of the PyTorch backend (backend='torch')", "backend")

    def enable_compile(self, ar: bool = True, dit: bool = True) -> None:
        """MindSpore's graph mode (ms.jit): the AR decode as one static-shape step (the cache at full length,
        compiled once per batch and length) and the denoiser (compiled per shape): a few seconds each, then
        faster per call (README). The same tokens; images within float rounding."""
        if ar:
            self.decode_step = self.ar.compile()
        if dit:  # (the VAE measured slower in graph mode: 1.0 vs 0.74 s; it stays in PyNative)
            self.dit.compile()

    def enable_fast(self, step_cache: float | None = None, ar_int8: bool = False) -> None:
        if step_cache or ar_int8:
            self._torch_only("step_cache / ar_int8")

    def enable_model_cpu_offload(self) -> None:
        self._torch_only("offload")

    def load_lora_weights(self, path, component: str = "transformer") -> list[str]:
        self._torch_only("load_lora_weights")

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The official layout, through the PyTorch path's writer (the same names and files)."""
        pipe = GlmImagePipeline.from_config(self.config, device="cpu", dtype=torch.float32)
        for mine, theirs in ((self.ar, pipe.ar), (self.glyph_encoder, pipe.glyph_encoder), (self.dit, pipe.dit),
                             (self.vae, pipe.vae)):
            sd = {k: torch.from_numpy(v) for k, v in weights.state_arrays(mine.model).items()}
            theirs.load_state_dict(sd, strict=True)
        pipe.tokenizer, pipe.defaults = self.tokenizer, self.defaults
        pipe.save_pretrained(path)
