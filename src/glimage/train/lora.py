"""LoRA (Hu et al. 2021) for the linears of a transformer, selected by module-name pattern.

y = W x + b + (alpha / r) * B (A x), A (r, in) Kaiming-uniform, B (out, r) zero (so training starts at the base
model). `LoRALinear` subclasses nn.Linear and keeps the base tensors under their own names (`weight`, `bias`):
a wrapped model's state dict is the official one plus `*.lora_A` / `*.lora_B`, so merging for export is
"add B A * scale to weight, drop the lora keys" and the key map to the official layout does not change.

Adapter file (kept beside the component when not merged): `lora.safetensors` holds `<module>.lora_A` and
`<module>.lora_B` for every wrapped module, named as in glimage's module (e.g. `language_model.layers.0.
self_attn.q_proj.lora_A` for the AR, `transformer_blocks.0.attn1.to_q.lora_A` for the DiT); `lora.json` holds
{format, rank, alpha, targets, modules}. `apply_lora_file(module, path)` applies it to a loaded model.
"""

from __future__ import annotations

import fnmatch
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import read_json, write_json
from ..validate import InputError

FORMAT = "glimage-lora-v1"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "lora.safetensors", "lora.json"

# Attention and MLP linears of the transformer blocks (the brief of issue 4: adapt attention + MLP).
AR_TARGETS = ("language_model.layers.*.self_attn.q_proj", "language_model.layers.*.self_attn.k_proj",
              "language_model.layers.*.self_attn.v_proj", "language_model.layers.*.self_attn.o_proj",
              "language_model.layers.*.mlp.gate_up_proj", "language_model.layers.*.mlp.down_proj")
DIT_TARGETS = ("transformer_blocks.*.attn1.to_q", "transformer_blocks.*.attn1.to_k", "transformer_blocks.*.attn1.to_v",
               "transformer_blocks.*.attn1.to_out.0", "transformer_blocks.*.ff.net.0.proj",
               "transformer_blocks.*.ff.net.2")


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        if rank < 1:
            raise InputError(f"LoRA rank={rank} must be >= 1")
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameter objects: names and storage kept
        self.rank, self.alpha = rank, float(alpha)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        if dev.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init of A
        self.merged = False
        self.disabled = False  # adapters_off: the base layer alone (an RL stage's reference policy)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        return y + nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def apply_lora(module: nn.Module, rank: int, alpha: float, targets=AR_TARGETS, freeze: bool = True) -> list[str]:
    """Wrap every nn.Linear whose qualified name matches one of `targets` (fnmatch patterns); with freeze,
    only the LoRA parameters keep requires_grad. Returns the wrapped names (raises if nothing matched)."""
    names = [n for n, m in module.named_modules() if type(m) is nn.Linear and _matches(n, targets)]
    if not names:
        raise InputError(f"no nn.Linear of {type(module).__name__} matches the LoRA targets {list(targets)}")
    if freeze:
        for p in module.parameters():
            p.requires_grad_(False)
    for n in names:
        _replace(module, n, LoRALinear(module.get_submodule(n), rank, alpha))
    return names


def lora_modules(module: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_off(module: nn.Module):
    """Within the block the unmerged adapters are skipped: the module computes what its base weights do (the
    starting model of a LoRA fine-tune, without a second copy of it)."""
    mods = [m for m in lora_modules(module).values() if not m.merged]
    for m in mods:
        m.disabled = True
    try:
        yield module
    finally:
        for m in mods:
            m.disabled = False


@torch.no_grad()
def merge_lora(module: nn.Module) -> None:
    """W += scale * B A in place (forward unchanged up to rounding; the LoRA branch is skipped while merged)."""
    for m in lora_modules(module).values():
        if not m.merged:
            m.weight.add_(m.delta().to(m.weight.dtype))
            m.merged = True


@torch.no_grad()
def unmerge_lora(module: nn.Module) -> None:
    for m in lora_modules(module).values():
        if m.merged:
            m.weight.sub_(m.delta().to(m.weight.dtype))
            m.merged = False


def strip_lora(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official keys of a wrapped model's state dict (drop `*.lora_A`, `*.lora_B`)."""
    return {k: v for k, v in state_dict.items() if not k.endswith((".lora_A", ".lora_B"))}


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Official-layout state dict with every adapter folded into its base weight; `module` is left unchanged."""
    sd = {k: v.detach().clone() for k, v in strip_lora(module.state_dict()).items()}
    for n, m in lora_modules(module).items():
        if not m.merged:
            sd[f"{n}.weight"] = sd[f"{n}.weight"] + m.delta().detach().to(sd[f"{n}.weight"].dtype)
    return sd


def unmerged_base_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Official-layout state dict of the base weights alone (adapters removed, merged ones subtracted)."""
    sd = {k: v.detach().clone() for k, v in strip_lora(module.state_dict()).items()}
    for n, m in lora_modules(module).items():
        if m.merged:
            sd[f"{n}.weight"] = sd[f"{n}.weight"] - m.delta().detach().to(sd[f"{n}.weight"].dtype)
    return sd


def save_lora(module: nn.Module, folder: str | os.PathLike, targets=()) -> None:
    """Write `lora.safetensors` + `lora.json` of every LoRALinear of `module` into `folder`."""
    mods = lora_modules(module)
    if not mods:
        raise InputError(f"{type(module).__name__} has no LoRA layers to save")
    ranks = {m.rank for m in mods.values()}
    alphas = {m.alpha for m in mods.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise InputError(f"mixed LoRA ranks {sorted(ranks)} / alphas {sorted(alphas)} cannot share one lora.json")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for n, m in mods.items():
        tensors[f"{n}.lora_A"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{n}.lora_B"] = m.lora_B.detach().contiguous().cpu()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_json(folder / ADAPTER_CONFIG, dict(format=FORMAT, rank=ranks.pop(), alpha=alphas.pop(),
                                             targets=list(targets), modules=sorted(mods)))


def apply_lora_file(module: nn.Module, path: str | os.PathLike, merge: bool = True) -> list[str]:
    """Apply an adapter written by `save_lora` (path = the folder, `lora.safetensors` or `lora.json`).

    merge=True folds B A * scale into the weights (no inference overhead, module structure unchanged);
    merge=False wraps the modules with LoRALinear (trainable adapters). Returns the adapted module names."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    conf = read_json(folder / ADAPTER_CONFIG)
    if conf.get("format") != FORMAT:
        raise InputError(f"{folder / ADAPTER_CONFIG}: format {conf.get('format')!r} is not {FORMAT!r}")
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    rank, alpha, names = int(conf["rank"]), float(conf["alpha"]), list(conf["modules"])
    expected = {f"{n}.lora_{x}" for n in names for x in "AB"}
    if set(tensors) != expected:
        raise InputError(f"{folder / ADAPTER_WEIGHTS} does not match lora.json: "
                         f"missing {sorted(expected - set(tensors))[:5]}, extra {sorted(set(tensors) - expected)[:5]}")
    for n in names:
        try:
            lin = module.get_submodule(n)
        except AttributeError as e:
            raise InputError(f"adapter module {n!r} does not exist in {type(module).__name__}") from e
        if not isinstance(lin, nn.Linear):
            raise InputError(f"adapter module {n!r} is a {type(lin).__name__}, not an nn.Linear")
        a, b = tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"]
        if tuple(a.shape) != (rank, lin.in_features) or tuple(b.shape) != (lin.out_features, rank):
            raise InputError(f"adapter {n}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a "
                             f"{lin.in_features}->{lin.out_features} linear at rank {rank}")
        w = lin.weight
        if merge:
            with torch.no_grad():
                w.add_(((b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)) * (alpha / rank)).to(w.dtype))
        else:
            if isinstance(lin, LoRALinear):
                raise InputError(f"module {n!r} already carries a LoRA adapter")
            new = LoRALinear(lin, rank, alpha)
            with torch.no_grad():
                new.lora_A.copy_(a)
                new.lora_B.copy_(b)
            _replace(module, n, new)
    return names
