"""Training in MindSpore: `glimage train tiny-ar --set backend=mindspore` (stages ar and decoder).

The run is the PyTorch loop's (glimage.train.loop) with MindSpore computing the trained model:
    shared: config, data plan, micro-batches, per-sample seeds, the stage's frozen encoders and conditioning
            (ARStage.make_batch, DecoderStage.model_inputs), the initial weights (the stage's own seeded torch
            init or base folder, copied in), lr schedule, clipping rule, EMA rule, logs, export writer
    MindSpore: forward, loss, gradients (value_and_grad), all-reduce, AdamW update, EMA
So a step from the same weights and batch gives PyTorch's loss and gradients (tests/test_mindspore_train.py).

AdamW: torch.optim.AdamW's update written out (decoupled decay, bias-corrected moments, eps outside the square
root): MindSpore's nn.AdamWeightDecay has no bias correction and mint.optim.AdamW has no CPU kernel.

Several devices: launch the same command with MindSpore's own launcher, e.g. on one Atlas 800T A2 node
    msrun --worker_num=8 --local_worker_num=8 --master_port=8118 --log_dir=msrun_log \\
          $(which glimage) train tiny-ar --set backend=mindspore device=npu
Each worker joins the group (mindspore.communication.init: HCCL on Ascend, NCCL on GPU), takes its slice of
every global batch (as the PyTorch loop's ranks do) and the gradients are summed with AllReduce before the
update, so the result is the one-process run's up to summation order (data parallelism, replicated weights).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import mindspore as ms
import torch
from mindspore import Tensor, ops

from ..train.config import TrainConfig
from ..train.common import (MicroBatches, RobustDataset, SkippingCollate, ema_decay, export_run, lr_at, mix_seed,
                            write_samples)
from ..validate import InputError
from .layers import to_ms
from .pipeline import ms_dtype, set_device
from .weights import assign, from_torch, state_arrays

IGNORE = -100


# ------------------------------------------------------------------------------------------------ losses

def ar_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token CE summed over the targets that are not IGNORE; (sum, count) like glimage.train.losses."""
    flat = logits.astype(ms.float32).reshape(-1, logits.shape[-1])
    t = targets.reshape(-1).astype(ms.int32)
    return ops.cross_entropy(flat, t, ignore_index=IGNORE, reduction="sum"), (t != IGNORE).astype(ms.float32).sum()


def flow_loss(v: Tensor, target: Tensor, patch: int) -> tuple[Tensor, Tensor]:
    """Velocity MSE, one term per DiT token (mean over its C*p*p values), summed; count = tokens."""
    d = v.astype(ms.float32) - target.astype(ms.float32)
    B, C, h, w = d.shape
    return (d * d).sum() / (C * patch * patch), Tensor(float(B * (h // patch) * (w // patch)), ms.float32)


# --------------------------------------------------------------------------------------------- optimizer

class AdamW:
    """torch.optim.AdamW (foreach) step for step: p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2 v + (1-b2) g^2;
    p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps). Weight decay on matrices only, like the loop."""

    def __init__(self, params: list, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        self.params, (self.b1, self.b2), self.eps = params, betas, eps
        self.decay = [weight_decay if p.ndim >= 2 else 0.0 for p in params]
        self.m = [ops.zeros(p.shape, ms.float32) for p in params]
        self.v = [ops.zeros(p.shape, ms.float32) for p in params]
        self.t = 0

    def step(self, grads: list[Tensor], lr: float) -> None:
        self.t += 1
        bc1, bc2_sqrt = 1 - self.b1 ** self.t, (1 - self.b2 ** self.t) ** 0.5
        for i, (p, g) in enumerate(zip(self.params, grads)):
            g = g.astype(ms.float32)
            w = p.astype(ms.float32)
            if self.decay[i]:
                w = w * (1 - lr * self.decay[i])
            self.m[i] = self.m[i] + (1 - self.b1) * (g - self.m[i])
            self.v[i] = self.v[i] * self.b2 + (1 - self.b2) * g * g
            w = w - (lr / bc1) * self.m[i] / (ops.sqrt(self.v[i]) / bc2_sqrt + self.eps)
            ops.assign(p, w.astype(p.dtype))

    def state(self) -> dict[str, np.ndarray]:
        out = {f"m.{i}": m.asnumpy() for i, m in enumerate(self.m)}
        out.update({f"v.{i}": v.asnumpy() for i, v in enumerate(self.v)})
        return out

    def load(self, arrays: dict, t: int) -> None:
        self.m = [Tensor(arrays[f"m.{i}"]) for i in range(len(self.params))]
        self.v = [Tensor(arrays[f"v.{i}"]) for i in range(len(self.params))]
        self.t = t


def clip_grad_norm(grads: list[Tensor], max_norm: float) -> tuple[list[Tensor], float]:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)); returns the norm before."""
    norm = float(ops.sqrt(sum((g.astype(ms.float32) ** 2).sum() for g in grads)).asnumpy())
    coef = min(1.0, max_norm / (norm + 1e-6)) if math.isfinite(norm) else 1.0
    return ([g * coef for g in grads] if coef != 1.0 else grads), norm


# ------------------------------------------------------------------------------------------------ stages

class MsAR:
    """Stage `ar`: the trained `language_model` + `lm_head` in MindSpore, fed ARStage.make_batch's sequences."""

    def __init__(self, stage, dtype):
        from .ar import ARModel
        self.stage, self.model = stage, from_torch(ARModel(stage.ar_cfg), stage.build(), dtype)

    def loss(self, batch, generator) -> tuple[Tensor, Tensor]:
        total = count = None
        for b in self.stage.make_batch(batch):
            mask = to_ms(b.mask.numpy()) if b.mask is not None else None
            logits = self.model(to_ms(b.input_ids.numpy()), to_ms(b.position_ids.numpy()), mask, b.start)
            s, c = ar_loss(logits, to_ms(b.targets.numpy()))
            total, count = (s, c) if total is None else (total + s, count + c)
        return total, count


class MsDecoder:
    """Stage `decoder`: the DiT in MindSpore, fed DecoderStage.model_inputs (noise, timesteps, dropout, glyphs
    and reference images drawn and encoded by the shared code); reference K/V are written inside the loss."""

    def __init__(self, stage, dtype):
        from .dit import GlmImageDiT
        if stage.cfg.train_glyph:
            raise InputError("train_glyph is not available with backend=mindspore (the glyph encoder is frozen)",
                             "train_glyph")
        self.stage, self.model = stage, from_torch(GlmImageDiT(stage.model_cfg.dit), stage.build(), dtype)

    def _refs(self, refs):
        """Per sample [(latents, prior ids, size)] -> per layer (k, v) (B, S, H, Dh), as TrainableDiT does."""
        samples = []
        for sample in refs:
            parts = [self.model.encode_reference(to_ms(z.numpy()), to_ms(ids.numpy()), to_ms(size.numpy()),
                                                 ops.zeros((1, 2), ms.float32)) for z, ids, size in sample]
            samples.append([(ops.cat([p[i][0] for p in parts], 1), ops.cat([p[i][1] for p in parts], 1))
                            for i in range(len(parts[0]))])
        return [(ops.cat([s[i][0] for s in samples], 0), ops.cat([s[i][1] for s in samples], 0))
                for i in range(len(samples[0]))]

    def loss(self, batch, generator) -> tuple[Tensor, Tensor]:
        total = count = None
        for args, kw, target in self.stage.model_inputs(batch, generator):
            refs = self._refs(kw["refs"]) if kw["refs"] else None
            gm = to_ms(kw["glyph_mask"].numpy()) if kw["glyph_mask"] is not None else None
            v = self.model(*(to_ms(a.numpy()) for a in args), refs=refs, glyph_mask=gm)
            s, c = flow_loss(v, to_ms(target.numpy()), self.stage.model_cfg.dit.patch_size)
            total, count = (s, c) if total is None else (total + s, count + c)
        return total, count


def ms_stage(stage, dtype=ms.float32):
    if stage.cfg.lora_rank:
        raise InputError("lora_rank > 0 is not available with backend=mindspore", "lora_rank")
    if stage.name == "ar":
        return MsAR(stage, dtype)
    if stage.name == "decoder":
        return MsDecoder(stage, dtype)
    raise InputError(f"backend=mindspore trains the stages ar and decoder, not {stage.name!r}", "stage")


def loss_and_grads(trainer, batch, generator) -> tuple[float, float, list[Tensor]]:
    """(loss sum, count, d(loss sum)/d(params)) of one micro-batch; params in parameters_and_names order."""
    params = [p for _, p in trainer.model.parameters_and_names() if p.requires_grad]
    fn = ms.value_and_grad(lambda: trainer.loss(batch, generator), None, params, has_aux=True)
    (loss, count), grads = fn()
    return float(loss.asnumpy()), float(count.asnumpy()), list(grads)


# -------------------------------------------------------------------------------------------------- loop

def _group():
    """(rank, world, all-reduce) under msrun (MS_WORKER_NUM > 1), else one process."""
    if int(os.environ.get("MS_WORKER_NUM", "1")) > 1:
        from mindspore.communication import get_group_size, get_rank, init
        init()
        return get_rank(), get_group_size(), ops.AllReduce()
    return 0, 1, None


def _save(folder: Path, step: int, trainer, opt: AdamW, ema: list | None, keep: int) -> None:
    tmp, final = folder / f".step_{step}", folder / f"step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.savez(tmp / "model.npz", **state_arrays(trainer.model))
    np.savez(tmp / "optim.npz", **opt.state(), **({f"ema.{i}": e.asnumpy() for i, e in enumerate(ema)} if ema else {}))
    (tmp / "meta.json").write_text(json.dumps({"step": step, "adam_t": opt.t}))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in sorted(folder.glob("step_*"), key=lambda p: int(p.name[5:]))[:-keep or None]:
        shutil.rmtree(old)


def _resume(folder: Path, trainer, opt: AdamW, ema: list | None) -> int:
    steps = sorted(folder.glob("step_*"), key=lambda p: int(p.name[5:])) if folder.is_dir() else []
    if not steps:
        return 0
    meta = json.loads((steps[-1] / "meta.json").read_text())
    with np.load(steps[-1] / "model.npz") as f:
        assign(trainer.model, dict(f), f"checkpoint {steps[-1]}")
    with np.load(steps[-1] / "optim.npz") as f:
        arrays = dict(f)
    opt.load(arrays, meta["adam_t"])
    if ema is not None:
        ema[:] = [Tensor(arrays[f"ema.{i}"]) for i in range(len(ema))]
    return int(meta["step"])


def train(cfg: TrainConfig, *, stage=None, plan=None) -> str:
    """The PyTorch loop's schedule, data and export, with MindSpore computing and updating the model."""
    from torch.utils.data import DataLoader

    from ..train.data import BatchPlan, prepare_data
    from ..train.log import RunLog
    from ..train.stages import make_stage

    target = set_device(cfg.device or None)
    dtype = ms_dtype(cfg.dtype, target)
    rank, W, reduce = _group()
    if cfg.batch_size % (W * cfg.grad_accum):
        raise InputError(f"batch_size={cfg.batch_size} must be divisible by {W} workers x grad_accum={cfg.grad_accum}")
    out, main = Path(cfg.out), rank == 0
    if stage is None:
        if main:
            prepare_data(cfg)
        if reduce is not None:  # a barrier: the other workers read the data the first one generates
            reduce(Tensor([0.0], ms.float32)).asnumpy()
        stage = make_stage(cfg)
    stage.setup(torch.device("cpu"), torch.float32)  # the frozen encoders and the conditioning: shared code
    torch.manual_seed(cfg.seed)
    trainer = ms_stage(stage, dtype)
    named = [(n, p) for n, p in trainer.model.parameters_and_names() if p.requires_grad]
    params = [p for _, p in named]
    opt = AdamW(params, (cfg.beta1, cfg.beta2), 1e-8, cfg.weight_decay)
    ema = [p.astype(ms.float32).copy() for p in params] if cfg.ema > 0 else None
    ckpt = out / "ckpt-mindspore"
    start = _resume(ckpt, trainer, opt, ema)
    if start and main:
        print(f"resuming from step {start} ({ckpt / f'step_{start}'})", file=sys.stderr, flush=True)

    dataset = stage.dataset()
    batches = MicroBatches((plan or BatchPlan)(dataset, cfg.batch_size, cfg.seed), cfg, start, rank, W)
    data = RobustDataset(dataset)
    it = iter(DataLoader(data, batch_sampler=batches, collate_fn=SkippingCollate(stage, data), num_workers=cfg.num_workers))
    log = RunLog(out, main, start, cfg.steps, cfg.tensorboard, cfg.log_every)
    end = cfg.stop_at or cfg.steps
    try:
        for i in range(start, end):
            t0, lr = time.perf_counter(), lr_at(i, cfg)
            loss_sum = count = 0.0
            grads = None
            for a in range(cfg.grad_accum):
                batch, _, real, positions = next(it)
                offset = rank * batches.b + a * batches.m
                gen = torch.Generator().manual_seed(mix_seed(cfg.seed, i, offset))
                batch["sample_seeds"] = [mix_seed(cfg.seed, i, offset + j, "sample") for j in positions]
                if not real:
                    continue
                s, c, g = loss_and_grads(trainer, batch, gen)
                loss_sum, count = loss_sum + s, count + c
                grads = g if grads is None else [x + y for x, y in zip(grads, g)]
            if reduce is not None:
                totals = reduce(Tensor([loss_sum, count], ms.float32)).asnumpy()
                loss_sum, count = float(totals[0]), float(totals[1])
                grads = [reduce(g) for g in (grads or [ops.zeros(p.shape, p.dtype) for p in params])]
            ok = count > 0 and math.isfinite(loss_sum)
            gn = math.nan
            if ok:
                grads, gn = clip_grad_norm([g / count for g in grads], cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                ok = math.isfinite(gn)
            if ok:  # a non-finite or empty step is logged, not applied (as in the PyTorch loop)
                opt.step(grads, lr)
                if ema is not None:
                    w = 1.0 - ema_decay(cfg.ema, i + 1)
                    ema = [e + w * (p.astype(ms.float32) - e) for e, p in zip(ema, params)]
            dt = time.perf_counter() - t0
            log.step({"step": i + 1, "loss": loss_sum / count if count else math.nan, "lr": lr, "grad_norm": gn,
                      "samples_per_s": cfg.batch_size / dt, "tokens_per_s": count / dt, "update_skipped": not ok,
                      "backend": "mindspore", "workers": W})
            if main and ((cfg.checkpoint_every > 0 and (i + 1) % cfg.checkpoint_every == 0) or i + 1 == end):
                _save(ckpt, i + 1, trainer, opt, ema, cfg.keep_checkpoints)
    finally:
        log.close()
    if end < cfg.steps:
        return str(ckpt)
    final = out / "export"
    if main:
        # the export: the stage's own torch module with these weights, through its writer (official layout)
        with torch.random.fork_rng(devices=[]):
            fresh = stage.build()
        arrays = state_arrays(trainer.model)
        if ema is not None:
            arrays.update({n: e.asnumpy() for (n, _), e in zip(named, ema)})
        fresh.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
        export_run(stage, fresh.eval(), out)
        write_samples(stage, fresh.eval(), out, cfg.steps, torch.device("cpu"))
    return str(final)
