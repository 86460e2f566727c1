"""The training loop: one code path for every stage, for one process and for `torchrun --nproc_per_node N`.

    stage = make_stage(cfg); stage.setup(device, dtype); model = stage.build()
    activation checkpointing / compile / FSDP2 per stage.blocks(model), then the root  (parallel.py)
    AdamW (decay on matrices only), linear warmup then cosine to min_lr
    resume from <out>/ckpt/latest if present                                           (ckpt.py)
    per optimizer step i (0-based; logged and checkpointed as step i + 1):
        global batch = plan.indices(i) (B indices); rank r takes idx[r*b:(r+1)*b], b = B / W,
        and splits it into grad_accum micro-batches of m = b / grad_accum samples
        per micro-batch: generator seeded from (seed, i, offset of its first sample in the global batch),
        out = stage.step(model, batch, generator); backward(out.loss_sum)
        all-reduce loss/count sums; gradients *= W / global_count  (FSDP2 averaged over W ranks, so this
        makes them d(sum of losses)/d(theta) / global_count: the same for any split of the global batch)
        clip, AdamW step, EMA, metrics.jsonl line, checkpoint every cfg.checkpoint_every steps and at the end
    gather the full state dict -> fresh stage.build() (EMA weights if enabled) -> stage.export, stage.samples

Exactness: with the same split of the global batch into micro-batches (W x grad_accum the same), one
process and W ranks see identical data and random numbers; results differ only by the order of the
gradient sums (<= 1e-5). Randomness the stage draws from the generator depends on the micro-batch (its
offset and size), so stages draw their noise per sample from `batch["sample_seeds"]` (seeded by the
sample's place in the global batch), which makes 1 x 1 and 2 x 1 identical as well. Resume is bit-exact: data, generators and the learning rate depend only on (seed, step), and
model, optimizer and EMA states are restored from the checkpoint.

Unusable samples (the dataset returns None) are dropped and counted; a micro-batch left with none still
runs forward/backward on a stand-in sample with weight 0, since FSDP2 needs every rank in every collective.
A step whose loss or gradient norm is not finite, or whose global batch is empty, is logged and not applied.
One process runs in a 1-rank process group (dist.py): the very same FSDP2, DCP and collective calls.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from ..device import DTYPES, manual_generator, peak_memory_bytes, synchronize
from ..validate import InputError
from . import dist as D
from .ckpt import Checkpointer, apply_train_state, fault, train_state
from .config import TrainConfig
from .common import (MicroBatches, RobustDataset, SkippingCollate, ema_decay, export_run, lr_at, mix_seed,
                     write_samples)
from .log import RunLog, plot_curves
from .parallel import parallelize


def _to_device(x, device: torch.device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise InputError("the stage's model has no trainable parameters")
    # no weight decay on vectors (norm gains, biases, scalars): decaying them only hurts
    groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kw = {"fused": True} if device.type in ("cuda", "npu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kw)


def _full_state(model: nn.Module, ema: dict, main: bool) -> dict | None:
    """Collective: the unsharded state dict on rank 0 (CPU), EMA weights in place of the trained ones."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name, e in ema.items():
        full = e.full_tensor() if isinstance(e, DTensor) else e  # collective: every rank takes part
        if main:
            sd[name] = full.detach().cpu()
    return sd if main else None


def _unsharded(stage, sd: dict) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten at once: leave the RNG alone
        fresh = stage.build()
    fresh.load_state_dict(sd, strict=True)
    return fresh.eval()


def train(cfg: TrainConfig, *, stage=None, plan=None) -> str:
    """Train `cfg.stage` for cfg.steps optimizer steps (resuming from <out>/ckpt if present); returns the
    export folder (or, when cfg.stop_at ends the run early, the checkpoint folder). `stage` (a Stage) and
    `plan` (a factory (dataset, batch_size, seed) -> obj with .indices(step)) default to
    glimage.train.stages.make_stage(cfg) and glimage.train.data.BatchPlan. The PyTorch backend; the choice
    of backend (cfg.backend) is glimage.backends.train's."""
    d = D.init(cfg.device)
    log = None
    try:
        W, rank, device = d.world, d.rank, d.device
        if cfg.batch_size % (W * cfg.grad_accum):
            raise InputError(f"batch_size={cfg.batch_size} must be divisible by world size {W} x "
                             f"grad_accum={cfg.grad_accum}")
        out = Path(cfg.out)
        if stage is None:
            from .data import prepare_data
            from .stages import make_stage
            if d.is_main:
                prepare_data(cfg)  # generates the shapes set once when cfg.data == ""
            D.barrier(d)
            stage = make_stage(cfg)
        if plan is None:
            from .data import BatchPlan as plan
        dtype = DTYPES[cfg.dtype]
        stage.setup(device, dtype)
        torch.manual_seed(cfg.seed)  # every rank must build the identical initial model: each keeps a shard
        model = stage.build()
        blocks = list(stage.blocks(model))
        model = parallelize(model, blocks, d.mesh, dtype, cfg.activation_checkpointing, cfg.compile)
        model.train()
        opt = _optimizer(model, cfg, device)
        params = [p for g in opt.param_groups for p in g["params"]]
        # EMA in fp32, sharded exactly like the parameters (clones of the sharded DTensors)
        ema = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad} \
            if cfg.ema > 0 else {}
        ema_pairs = [(ema[n], p) for n, p in model.named_parameters() if n in ema]

        ckpt = Checkpointer(out / "ckpt", d, cfg.keep_checkpoints)
        start, skipped_total = 0, Counter()
        if (path := ckpt.latest()) is not None:
            state = train_state(model, opt, ema)
            meta = ckpt.load(path, state)
            apply_train_state(model, opt, state)
            start, skipped_total = int(meta["step"]), Counter(meta.get("skipped", {}))
            if d.is_main:
                print(f"resuming from step {start} ({path})", file=sys.stderr, flush=True)

        dataset = stage.dataset()
        batches = MicroBatches(plan(dataset, cfg.batch_size, cfg.seed), cfg, start, rank, W)
        data = RobustDataset(dataset)
        loader = DataLoader(data, batch_sampler=batches, collate_fn=SkippingCollate(stage, data),
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
        log = RunLog(out, d.is_main, start, cfg.steps, cfg.tensorboard, cfg.log_every)
        it = iter(loader)
        end = cfg.stop_at or cfg.steps
        for i in range(start, end):
            step = i + 1
            t0 = time.perf_counter()
            lr = lr_at(i, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            sums, keys, new_skips = None, None, Counter()
            for a in range(cfg.grad_accum):
                batch, skipped, real, positions = next(it)
                new_skips.update(skipped)
                offset = rank * batches.b + a * batches.m  # rank-independent: where it starts in the global batch
                gen = manual_generator(device, mix_seed(cfg.seed, i, offset))
                # one seed per sample, from its place in the global batch: stages that draw their noise per
                # sample from these give the same numbers for any split over ranks and accumulation steps
                batch["sample_seeds"] = [mix_seed(cfg.seed, i, offset + j, "sample") for j in positions]
                torch.manual_seed(mix_seed(cfg.seed, i, offset, "global"))  # dropout etc. in the model
                res = stage.step(model, _to_device(batch, device), gen)
                w = 1.0 if real else 0.0  # a stand-in batch: in the collectives, out of the loss
                (res.loss_sum * w).backward()
                keys = sorted(res.metrics) if keys is None else keys
                vec = w * torch.stack([res.loss_sum.detach().float(), torch.as_tensor(res.count, device=device).float()]
                                      + [res.metrics[k].detach().float() for k in keys])
                sums = vec if sums is None else sums + vec
            # one collective for loss, count, the stage's metric sums and the number of skipped samples
            sums = D.all_reduce(torch.cat([sums, torch.tensor([float(sum(new_skips.values()))], device=device)]))
            sums = sums.tolist()
            loss_sum, count, n_skips = sums[0], sums[1], sums[-1]
            if n_skips:  # rare: only then gather the reasons
                for c in D.all_gather_objects(new_skips, d):
                    skipped_total.update(c)

            skip_update = not (count > 0 and math.isfinite(loss_sum))
            if not skip_update:
                scale = W / count
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                gn = (gn.full_tensor() if isinstance(gn, DTensor) else gn).item()
                skip_update = not math.isfinite(gn)
            else:
                gn = math.nan
            if not skip_update:  # a non-finite (or empty) step is skipped and logged, not applied
                opt.step()
                if ema:
                    with torch.no_grad():
                        torch._foreach_lerp_([_local(e) for e, _ in ema_pairs],
                                             [_local(p).float() for _, p in ema_pairs], 1.0 - ema_decay(cfg.ema, step))
            opt.zero_grad(set_to_none=True)

            synchronize(device)
            dt = time.perf_counter() - t0
            peak = D.all_reduce(torch.tensor(float(peak_memory_bytes(device)), device=device),
                                D.dist.ReduceOp.MAX).item()
            rec = {"step": step, "loss": loss_sum / count if count else math.nan, "lr": lr, "grad_norm": gn,
                   "samples_per_s": cfg.batch_size / dt, "tokens_per_s": count / dt,
                   "peak_mem_mb": peak / 2**20, "skipped": dict(skipped_total), "update_skipped": skip_update}
            rec.update({k: sums[2 + j] / count if count else math.nan for j, k in enumerate(keys)})
            log.step(rec)

            if (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or step == end:
                ckpt.save(step, train_state(model, opt, ema),
                          {"step": step, "skipped": dict(skipped_total), "world_size": W})
            if cfg.sample_every > 0 and step % cfg.sample_every == 0 and step < cfg.steps:
                sd = _full_state(model, ema, d.is_main)
                if d.is_main:
                    write_samples(stage, _unsharded(stage, sd), out, step, device)
                D.barrier(d)
            fault("after_step", step)
        del it, loader
        if d.is_main:
            plot_curves(out)  # curves.png next to metrics.jsonl
        if end < cfg.steps:
            return str(out / "ckpt")

        final = out / "export"
        if start < cfg.steps or not final.is_dir():
            sd = _full_state(model, ema, d.is_main)
            if d.is_main:
                fresh = _unsharded(stage, sd)
                export_run(stage, fresh, out)
                write_samples(stage, fresh, out, max(start, cfg.steps), device)
            D.barrier(d)
        return str(final)
    finally:
        if log is not None:
            log.close()
        D.close(d)
