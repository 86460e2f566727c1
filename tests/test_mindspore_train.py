"""Training in MindSpore against the PyTorch loop: one step from the same weights and batch (loss within 1e-5,
gradients within 1e-4 relative), the AdamW update, whole runs (5 steps track, export loads in PyTorch), exact
resume, and data parallelism under msrun. Skipped where MindSpore is not installed (CI: its own environment).
"""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

ms = pytest.importorskip("mindspore")

from glimage.mindspore.layers import to_ms  # noqa: E402
from glimage.mindspore.pipeline import set_device  # noqa: E402
from glimage.mindspore.train import AdamW, loss_and_grads, ms_stage  # noqa: E402
from glimage.mindspore.weights import state_arrays  # noqa: E402
from glimage.train.config import TrainConfig  # noqa: E402
from glimage.train.data import prepare_data  # noqa: E402
from glimage.backends import train  # noqa: E402
from glimage.train.stages import make_stage  # noqa: E402
from glimage.validate import InputError  # noqa: E402


def _cfg(tmp_path, stage, **kw):
    base = dict(stage=stage, preset="tiny", base="", out=str(tmp_path / f"{stage}-{kw.get('backend', 'torch')}"),
                data=str(tmp_path / "data"), steps=5, data_n=16, image_size=64, batch_size=4, lr=2e-3, warmup=2,
                checkpoint_every=0, tensorboard=False, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ms_train")
    cfg = TrainConfig(stage="ar", out=str(tmp / "gen"), data_n=16, image_size=64)
    shutil.copytree(prepare_data(cfg), tmp / "data")
    set_device("cpu")
    return tmp


def _one_step(cfg, with_source: bool = False):
    """PyTorch's and MindSpore's (loss, count, named gradients) for the same first batch and generator."""
    stage = make_stage(cfg)
    stage.setup(torch.device("cpu"), torch.float32)
    torch.manual_seed(cfg.seed)
    model = stage.build()
    trainer = ms_stage(stage)
    sd = model.state_dict()
    for k, v in state_arrays(trainer.model).items():  # the same initial weights (the stage's seeded init)
        assert np.array_equal(v, sd[k].numpy()), k
    ds = stage.dataset()
    samples = [ds[i] for i in range(4)]
    if with_source:  # an editing sample: its reference K/V are written inside the loss, with gradients
        samples[1] = {**samples[1], "sources": [ds[7]["image"]]}
    batch = stage.collate(samples)
    batch["sample_seeds"] = [11, 12, 13, 14]
    out = stage.step(model, batch, torch.Generator().manual_seed(5))
    out.loss_sum.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    loss, count, g = loss_and_grads(trainer, batch, torch.Generator().manual_seed(5))
    names = [n for n, p in trainer.model.parameters_and_names()]
    return (float(out.loss_sum), float(out.count), grads), (loss, count, dict(zip(names, g)))


def _assert_step_close(t, m):
    (tl, tc, tg), (ml, mc, mg) = t, m
    assert tc == mc
    assert abs(tl - ml) <= 1e-5 * max(1.0, abs(tl)), (tl, ml)
    assert tg.keys() == mg.keys()
    worst = 0.0
    for k, g in tg.items():
        d = float((g - torch.from_numpy(mg[k].asnumpy())).norm() / g.norm().clamp_min(1e-12))
        worst = max(worst, d)
        assert d <= 1e-4, (k, d)
    return worst


def test_ar_step_loss_and_gradients(data_dir):
    _assert_step_close(*_one_step(_cfg(data_dir, "ar")))


def test_decoder_step_loss_and_gradients_with_references_and_dropout(data_dir):
    t, m = _one_step(_cfg(data_dir, "decoder", cond_drop=0.3), with_source=True)
    _assert_step_close(t, m)


def test_adamw_matches_torch():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(6, 5, generator=g), torch.randn(5, generator=g)]
    tp = [torch.nn.Parameter(x.clone()) for x in w]
    opt_t = torch.optim.AdamW([{"params": [tp[0]], "weight_decay": 0.1}, {"params": [tp[1]], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    mp = [ms.Parameter(to_ms(x.numpy())) for x in w]
    opt_m = AdamW(mp, (0.9, 0.95), 1e-8, weight_decay=0.1)
    for step in range(5):
        grads = [torch.randn(x.shape, generator=g) * (step + 1) for x in w]
        lr = 1e-2 * (step + 1) / 5
        for p, gr in zip(tp, grads):
            p.grad = gr.clone()
        for group in opt_t.param_groups:
            group["lr"] = lr
        opt_t.step()
        opt_m.step([to_ms(gr.numpy()) for gr in grads], lr)
        for a, b in zip(tp, mp):
            assert float((a.detach() - torch.from_numpy(b.asnumpy())).abs().max()) <= 1e-6


def _metrics(out):
    return [json.loads(line) for line in open(f"{out}/metrics.jsonl")]


@pytest.mark.parametrize("stage", ["ar", "decoder"])
def test_five_steps_track_torch_and_export_loads(data_dir, stage):
    extra = {"ema": 0.9} if stage == "decoder" else {"weight_decay": 0.05}
    t_out = train(_cfg(data_dir, stage, **extra))
    m_out = train(_cfg(data_dir, stage, backend="mindspore", **extra))
    tm, mm = _metrics(_cfg(data_dir, stage).out), _metrics(_cfg(data_dir, stage, backend="mindspore").out)
    assert [r["step"] for r in mm] == [1, 2, 3, 4, 5]
    for a, b in zip(tm, mm):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"]
    assert mm[-1]["loss"] < mm[0]["loss"]
    from glimage.pipeline import GlmImagePipeline
    pt, pm = GlmImagePipeline.from_pretrained(t_out), GlmImagePipeline.from_pretrained(m_out)
    part = (lambda p: p.ar.language_model) if stage == "ar" else (lambda p: p.dit)
    sd_t, sd_m = part(pt).state_dict(), part(pm).state_dict()
    # over the whole model: a tensor whose gradient is float noise (the key biases: softmax is shift-invariant)
    # gets Adam steps of noise in either backend, so tensors are not compared one by one
    diff = sum(float((v - sd_m[k]).pow(2).sum()) for k, v in sd_t.items()) ** 0.5
    norm = sum(float(v.pow(2).sum()) for v in sd_t.values()) ** 0.5
    assert diff <= 1e-4 * norm, diff / norm
    pm.set_progress_bar_config(disable=True)
    assert pm("a red circle", height=64, width=64, num_inference_steps=2, seed=0).images[0].size == (64, 64)


def test_resume_is_exact(data_dir):
    full = _cfg(data_dir, "ar", backend="mindspore", out=str(data_dir / "full"), checkpoint_every=2)
    train(full)
    part = _cfg(data_dir, "ar", backend="mindspore", out=str(data_dir / "part"), checkpoint_every=2)
    assert train(TrainConfig(**{**part.__dict__, "stop_at": 3})).endswith("ckpt-mindspore")
    train(part)
    assert [r["loss"] for r in _metrics(full.out)] == [r["loss"] for r in _metrics(part.out)]


def test_bad_configs_are_refused(data_dir):
    with pytest.raises(InputError, match="backend=mindspore trains the stages ar and decoder, not 'vae'"):
        _cfg(data_dir, "vae", backend="mindspore")
    with pytest.raises(InputError, match="backend='tf' must be one of"):
        _cfg(data_dir, "ar", backend="tf")
    stage = make_stage(_cfg(data_dir, "ar", backend="mindspore", lora_rank=4))
    with pytest.raises(InputError, match="lora_rank"):
        ms_stage(stage)


def test_msrun_two_workers_equal_one_process(data_dir):
    """MindSpore's own launcher on two CPU workers: each takes half of every global batch, gradients summed by
    AllReduce; the losses are the one-process run's (up to summation order)."""
    one = _cfg(data_dir, "ar", backend="mindspore", steps=3, out=str(data_dir / "one"))
    train(one)
    msrun, glimage = shutil.which("msrun"), shutil.which("glimage")
    if msrun is None or glimage is None:
        pytest.skip("msrun or glimage is not on PATH")
    two = str(data_dir / "two")
    sets = [f"{k}={json.dumps(v)}" for k, v in one.__dict__.items()
            if k in ("stage", "preset", "base", "data", "steps", "data_n", "image_size", "batch_size", "lr", "warmup",
                     "checkpoint_every", "tensorboard", "backend")] + [f'out="{two}"']
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", "--master_port=8127", f"--log_dir={data_dir}/msrun_log",
           "--join=True", glimage, "train", "tiny-ar", "--set", *sets]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    a, b = _metrics(one.out), _metrics(two)
    assert [r["workers"] for r in a] == [1] * 3 and [r["workers"] for r in b] == [2] * 3  # really two
    assert len(b) == 3 and all(abs(x["loss"] - y["loss"]) <= 1e-5 * x["loss"] for x, y in zip(a, b))
