"""The training loop (glimage.train.loop) against a toy stage: learning, exactness across world sizes and
accumulation, bit-exact resume after SIGKILL, crash-safe checkpoints, metrics.jsonl.

The toy stage is a 2-block residual MLP regressing a fixed random teacher on an in-memory dataset, with
input noise drawn from the loop's generator (so generator seeding is exercised) and one unusable sample
(so skipping is exercised). Subprocesses import this file to get the same toy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from glimage.train.config import TrainConfig
from glimage.train.stage import StepOutput

HERE = Path(__file__).resolve().parent
D_IN, D_HID, D_OUT, N = 8, 16, 4, 64
BAD = 7  # this sample is "unreadable"


class ToyData(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(N, D_IN, generator=g)
        teacher = torch.randn(D_IN, D_OUT, generator=g)
        self.y = torch.tanh(self.x @ teacher)
        self.skipped = Counter()

    def __len__(self):
        return N

    def __getitem__(self, i):
        if i == BAD:
            self.skipped["unreadable"] += 1
            return None
        return {"index": i, "x": self.x[i], "y": self.y[i]}


class Block(nn.Module):
    calls = 0  # forward executions (the activation checkpointing test counts recomputations)

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D_HID)
        self.fc1 = nn.Linear(D_HID, 2 * D_HID)
        self.fc2 = nn.Linear(2 * D_HID, D_HID)

    def forward(self, h):
        Block.calls += 1
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(h))))


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D_IN, D_HID)
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.head = nn.Linear(D_HID, D_OUT)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class ToyStage:
    name = "toy"

    def __init__(self, noise: float = 0.05):
        self.noise = noise

    def setup(self, device, dtype):
        self.device = device

    def build(self):
        return ToyNet()

    def blocks(self, model):
        return list(model.blocks)

    def dataset(self):
        return ToyData()

    def collate(self, samples):
        return {"x": torch.stack([s["x"] for s in samples]), "y": torch.stack([s["y"] for s in samples])}

    def step(self, model, batch, generator):
        x = batch["x"] + self.noise * torch.randn(batch["x"].shape, generator=generator, device=batch["x"].device)
        err = (model(x) - batch["y"]).pow(2)
        return StepOutput(err.sum(), torch.tensor(float(err.numel())), {"abs": err.detach().sqrt().sum()})

    def export(self, model, out_dir):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out_dir) / "model.safetensors"))

    def samples(self, model, out_dir, step):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"step_{step}.txt").write_text("ok")


class ToyPlan:
    """Like glimage.train.data.BatchPlan: epoch-wise permutations, deterministic from (seed, step)."""

    def __init__(self, dataset, batch_size, seed, fixed=False):
        self.n, self.b, self.seed, self.fixed = len(dataset), batch_size, seed, fixed

    def indices(self, step):
        if self.fixed:  # one batch over and over: the overfitting test
            return list(range(self.b))
        epoch, k = divmod(step, self.n // self.b)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(1000 * self.seed + epoch))
        return perm[k * self.b:(k + 1) * self.b].tolist()


def toy_config(out, **kw) -> TrainConfig:
    base = dict(stage="vae", out=str(out), steps=6, batch_size=8, lr=3e-2, min_lr=3e-3, warmup=2,
                weight_decay=0.01, checkpoint_every=2, tensorboard=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def run_toy(kw: dict) -> str:
    """Entry point of the subprocess runs (and of the in-process reference runs)."""
    from glimage.train.loop import train

    noise = kw.pop("noise", 0.05)
    fixed = kw.pop("fixed", False)
    cfg = toy_config(**kw)
    return train(cfg, stage=ToyStage(noise), plan=lambda ds, b, s: ToyPlan(ds, b, s, fixed))


SCRIPT = """
import json, sys, os
import torch
torch.set_num_threads(1)
sys.path.insert(0, {here!r})
from test_train_loop import run_toy
if "RANK" in os.environ:  # under torchrun: one group for several runs
    import torch.distributed as dist
    dist.init_process_group("gloo")
for kw in json.loads(sys.argv[1]):
    run_toy(kw)
"""


def _script(tmp_path) -> Path:
    path = tmp_path / "run_toy.py"
    path.write_text(SCRIPT.format(here=str(HERE)))
    return path


def _run(tmp_path, runs: list[dict], fault: str = "", nproc: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["GLIMAGE_TRAIN_FAULT"] = fault
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(_script(tmp_path)), json.dumps(runs)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd[1:]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out) -> dict:
    return load_file(str(Path(out) / "export" / "model.safetensors"))


def dcp_tensors(ckpt_dir, tmp_path) -> dict:
    """Every tensor of a DCP checkpoint (model, optimizer, EMA), read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = tmp_path / f"{Path(ckpt_dir).name}-{abs(hash(str(ckpt_dir)))}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(dst))
    flat = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(x, torch.Tensor):
            flat[prefix] = x
    walk("", torch.load(dst, weights_only=True))
    return flat


# ---------------------------------------------------------------------------------------------------------

def test_loss_falls_and_single_batch_overfits(tmp_path):
    run_toy(dict(out=tmp_path / "a", steps=30, checkpoint_every=0))
    losses = [r["loss"] for r in metrics(tmp_path / "a")]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    # one batch, no noise, no decay: driven to (near) zero
    run_toy(dict(out=tmp_path / "b", steps=80, fixed=True, noise=0.0, weight_decay=0.0, lr=1e-2, min_lr=1e-2,
                 checkpoint_every=0, ema=0.9, sample_every=40))
    losses = [r["loss"] for r in metrics(tmp_path / "b")]
    assert losses[-1] < 1e-3 * losses[0], (losses[0], losses[-1])
    assert (tmp_path / "b" / "samples" / "step_40.txt").is_file()  # periodic samples
    assert (tmp_path / "b" / "samples" / "step_80.txt").is_file()  # and at the end


def test_metrics_lines_and_lr_schedule(tmp_path):
    from glimage.train.common import lr_at

    out = tmp_path / "m"
    run_toy(dict(out=out, steps=3))
    recs = metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        for k in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "peak_mem_mb", "abs"):
            assert isinstance(r[k], float) and r[k] > 0, (k, r)
        assert r["update_skipped"] is False
    cfg = toy_config(out, steps=3)
    assert [r["lr"] for r in recs] == [lr_at(i, cfg) for i in range(3)]
    assert recs[0]["lr"] == pytest.approx(cfg.lr / 2)  # warmup=2: half way, then the peak
    assert recs[1]["lr"] == pytest.approx(cfg.lr)
    assert recs[-1]["skipped"] == {}
    # rerun with more steps: resumes at 3, appends 4..8, no duplicate lines
    run_toy(dict(out=out, steps=8))
    recs2 = metrics(out)
    assert [r["step"] for r in recs2] == list(range(1, 9))
    assert recs2[:3] == recs
    # steps 1..8 cover one epoch: BAD was met once (at step 8), replaced, and counted by its reason
    step_bad = next(i + 1 for i in range(8) if BAD in ToyPlan(ToyData(), 8, 0).indices(i))
    assert [r["skipped"] for r in recs2] == [{}] * (step_bad - 1) + [{"unreadable": 1}] * (9 - step_bad)


def test_tensorboard_scalars(tmp_path, monkeypatch):
    """TensorBoard is optional (not installed in CI): a stand-in SummaryWriter records what the loop logs."""
    import types

    logged = []

    class Writer:
        def __init__(self, logdir, purge_step=None):
            logged.append(("init", logdir, purge_step))

        def add_scalar(self, tag, value, step):
            logged.append((tag, step))

        def close(self):
            logged.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    run_toy(dict(out=tmp_path / "tb", steps=2, tensorboard=True))
    assert logged[0] == ("init", str(tmp_path / "tb" / "tb"), 1) and logged[-1] == ("close",)
    assert ("train/loss", 1) in logged and ("train/grad_norm", 2) in logged and ("train/lr", 2) in logged


def test_grad_accum_equals_one_batch(tmp_path):
    """The same global batch in 1 or 8 micro-batches: same losses and weights (deterministic stage). With 8,
    the micro-batch holding only BAD (step 8) has no usable sample: it runs on a stand-in with weight 0.
    The 8-micro-batch run loads in 2 DataLoader workers: their skip counts must reach the log."""
    run_toy(dict(out=tmp_path / "a1", noise=0.0, steps=8, checkpoint_every=0))
    run_toy(dict(out=tmp_path / "a8", noise=0.0, steps=8, grad_accum=8, checkpoint_every=0, num_workers=2))
    _assert_close_runs(tmp_path / "a1", tmp_path / "a8", steps=8)
    assert metrics(tmp_path / "a8")[-1]["skipped"] == {"unreadable": 1}  # counted in a worker process


def _assert_close_runs(a, b, steps):
    la, lb = [r["loss"] for r in metrics(a)], [r["loss"] for r in metrics(b)]
    assert len(la) == len(lb) == steps
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-5)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5)


def test_torchrun_two_ranks_match_one_process(tmp_path):
    """gloo + FSDP2 on 2 CPU ranks == 1 process for the same global batch: with the stage's noise on (vs
    grad_accum=2 on one process: the same micro-batches, hence the same noise) and off (2 ranks x 4
    micro-batches vs 1 x 1, including a rank whose micro-batch has no usable sample)."""
    runs = [dict(out=str(tmp_path / "t_noise"), ema=0.5),
            dict(out=str(tmp_path / "t_det"), noise=0.0, grad_accum=4, steps=8)]
    res = _run(tmp_path, runs, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    run_toy(dict(out=tmp_path / "o_noise", ema=0.5, grad_accum=2))
    run_toy(dict(out=tmp_path / "o_det", noise=0.0, steps=8))
    _assert_close_runs(tmp_path / "t_noise", tmp_path / "o_noise", steps=6)
    _assert_close_runs(tmp_path / "t_det", tmp_path / "o_det", steps=8)
    assert metrics(tmp_path / "t_det")[-1]["skipped"] == {"unreadable": 1}  # gathered from the rank that met it
    # the 2-rank checkpoint holds shards of both ranks and loads in one process (DCP reshards)
    assert len(list((tmp_path / "t_det" / "ckpt" / "step_000008").glob("*.distcp"))) == 2
    run_toy(dict(out=tmp_path / "t_det", noise=0.0, grad_accum=4, steps=9))
    assert [r["step"] for r in metrics(tmp_path / "t_det")] == list(range(1, 10))


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_activation_checkpointing_recomputes_and_changes_nothing(tmp_path, compile):
    run_toy(dict(out=tmp_path / "plain", steps=3, checkpoint_every=0))
    Block.calls = 0
    run_toy(dict(out=tmp_path / "ac", steps=3, checkpoint_every=0, activation_checkpointing=True, compile=compile))
    if compile:  # inductor may fuse differently (compiled code does not run the Python forward: no count)
        _assert_close_runs(tmp_path / "plain", tmp_path / "ac", steps=3)
        return
    assert Block.calls == 2 * 2 * 3  # 2 blocks x (forward + recomputation in backward) x 3 steps
    assert metrics(tmp_path / "plain") != [] and \
        [r["loss"] for r in metrics(tmp_path / "plain")] == [r["loss"] for r in metrics(tmp_path / "ac")]
    wa, wb = weights(tmp_path / "plain"), weights(tmp_path / "ac")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run_toy(dict(out=str(out), ema=0.9))
    return out


def _assert_same_run(out, ref, tmp_path):
    wa, wb = weights(out), weights(ref)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit for bit (EMA weights: the export uses them)
    ta = dcp_tensors(Path(out) / "ckpt" / "step_000006", tmp_path)
    tb = dcp_tensors(Path(ref) / "ckpt" / "step_000006", tmp_path)
    assert ta.keys() == tb.keys() and any(".ema." in k for k in ta) and any("exp_avg_sq" in k for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k  # raw weights, Adam moments, EMA
    ma, mb = metrics(out), metrics(ref)
    assert [r["step"] for r in ma] == [1, 2, 3, 4, 5, 6]  # one line per step: resume did not duplicate
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]


def test_sigkill_then_resume_is_bit_exact(tmp_path, uninterrupted):
    out = tmp_path / "run"
    run = [dict(out=str(out), ema=0.9)]
    res = _run(tmp_path, run, fault="after_step:3")
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert (out / "ckpt" / "latest").read_text().strip() == "step_000002"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]  # step 3 logged, then lost with the kill
    res = _run(tmp_path, run)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_run(out, uninterrupted, tmp_path)
    # keep_checkpoints=2: older ones pruned
    assert sorted(p.name for p in (out / "ckpt").glob("step_*")) == ["step_000004", "step_000006"]


@pytest.mark.parametrize("point", ["mid_save", "before_latest"])
def test_kill_during_checkpoint_write_keeps_last_good(tmp_path, uninterrupted, point):
    out = tmp_path / "run"
    run = [dict(out=str(out), ema=0.9)]
    res = _run(tmp_path, run, fault=f"{point}:4")
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    ckpt = out / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_000002"
    if point == "mid_save":  # shards of step 4 were written, but only into the temporary directory
        assert (ckpt / ".tmp-step_000004" / ".metadata").is_file() and not (ckpt / "step_000004").exists()
    good = dcp_tensors(ckpt / "step_000002", tmp_path)  # the last good checkpoint loads
    assert any(k.startswith(".model.") for k in good)
    assert json.loads((ckpt / "step_000002" / "meta.json").read_text())["step"] == 2
    res = _run(tmp_path, run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(ckpt.glob(".tmp-*"))
    _assert_same_run(out, uninterrupted, tmp_path)


def test_bad_batch_split_and_cli(tmp_path, capsys):
    from glimage.train.cli import main

    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(stage="vae", batch_size=6, grad_accum=4)
    assert main(["no-such-recipe"]) == 2
    assert "neither a file nor a shipped recipe" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text('stage = "vae"\nsteps = 2\n')
    assert main([str(cfg), "--set", "nope=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_resume_says_where_it_resumes_from(tmp_path, capsys):
    out = tmp_path / "run"
    run_toy(dict(out=str(out), stop_at=2))
    assert "resuming" not in capsys.readouterr().err
    run_toy(dict(out=str(out)))
    assert f"resuming from step 2 ({out / 'ckpt' / 'step_000002'})" in capsys.readouterr().err


def test_ema_decay_warms_up():
    from glimage.train.common import ema_decay
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)  # early EMA follows the weights closely
    assert ema_decay(0.999, 100) == pytest.approx(101 / 110)
    assert ema_decay(0.999, 10**6) == 0.999 and ema_decay(0.5, 30) == 0.5


def test_stop_at_then_rerun_is_the_uninterrupted_run(tmp_path, uninterrupted):
    out = tmp_path / "run"
    first = run_toy(dict(out=str(out), ema=0.9, stop_at=3))  # in process: same code path as a rerun
    assert first == str(out / "ckpt") and not (out / "export").exists()
    assert (out / "ckpt" / "latest").read_text().strip() == "step_000003"  # checkpointed at the stop
    assert [r["lr"] for r in metrics(out)] == [r["lr"] for r in metrics(uninterrupted)][:3]  # schedule of `steps`
    run_toy(dict(out=str(out), ema=0.9))
    _assert_same_run(out, uninterrupted, tmp_path)
    with pytest.raises(ValueError, match=r"stop_at=7 must be in \[0, steps=6\]"):
        toy_config(out, stop_at=7)
