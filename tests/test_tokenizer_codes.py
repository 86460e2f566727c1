"""The tokenizer export's refit of unused codes onto the worst-quantised encoder outputs (refit_codes)."""

import pytest
import torch
import torch.nn.functional as F

from glimage.config import TINY, replace
from glimage.train.config import TrainConfig
from glimage.train.stages import make_stage
from glimage.train.stages.common import VQEncoder, seeded_init, vq_pixels
from glimage.train.stages.tokenizer import refit_dead_codes
from test_train_stages import DATA, SMALL_AR, generate


def _lumped_encoder():
    """A tiny tokenizer whose codebook serves half of some batch's outputs with a single code."""
    cfg = replace(TINY, **SMALL_AR).ar
    model = seeded_init(lambda: VQEncoder(cfg), 0).eval()
    pixels = torch.stack([d["image"] for d in DATA])
    batches = [vq_pixels(pixels[i:i + 8], 4, 4, cfg.vision.patch_size) for i in (0, 8)]
    with torch.no_grad():
        ids = torch.cat([model.vqmodel.encode(model.visual(b))[0].reshape(-1) for b in batches])
        w = model.vqmodel.quantize.embedding.weight
        used = torch.bincount(ids, minlength=w.shape[0]) > 0
        w[~used] = -w[used][:1]  # every unused code points away from the data: none is ever picked
    return model, batches


def _errors(model, batches):
    with torch.no_grad():
        out = []
        for b in batches:
            ids, z, codes = model.vqmodel.encode(model.visual(b))
            z = F.normalize(z.reshape(-1, z.shape[-1]), dim=-1)
            out.append(1 - (z * F.normalize(codes[ids.reshape(-1)], dim=-1)).sum(-1))
        return torch.cat(out)


def test_refit_moves_only_unused_codes_and_serves_the_worst_outputs_better():
    model, batches = _lumped_encoder()
    w = model.vqmodel.quantize.embedding.weight
    before, err_before = w.detach().clone(), _errors(model, batches)
    with torch.no_grad():
        ids = torch.cat([model.vqmodel.encode(model.visual(b))[0].reshape(-1) for b in batches])
    used_before = torch.bincount(ids, minlength=w.shape[0]) > 0
    worst = err_before.topk(int(0.25 * len(err_before))).indices
    moved = refit_dead_codes(model, batches, k=6, seed=0, worst=0.25)
    after = w.detach()
    changed = (after != before).any(1)
    assert moved == 6 and int(changed.sum()) == 6
    with torch.no_grad():
        ids = torch.cat([model.vqmodel.encode(model.visual(b))[0].reshape(-1) for b in batches])
    # codes in use before the refit are untouched; the moved ones are now picked
    assert not (changed & used_before).any()
    assert set(changed.nonzero().flatten().tolist()) & set(ids.tolist())
    err_after = _errors(model, batches)
    assert err_after[worst].mean() < 0.7 * err_before[worst].mean()
    assert (err_after <= err_before + 1e-6).all()  # nothing is served worse: codes in use stay where they were
    # deterministic for a seed
    model2, _ = _lumped_encoder()
    refit_dead_codes(model2, batches, k=6, seed=0, worst=0.25)
    torch.testing.assert_close(model2.vqmodel.quantize.embedding.weight, w)


def test_tokenizer_export_with_refit_codes_loads_and_moves_at_most_k_codes(tmp_path):
    cfg = TrainConfig(stage="tokenizer", out=str(tmp_path / "tok"), seed=0, model=SMALL_AR, refit_codes=5)
    st = make_stage(cfg, DATA)
    st.setup(torch.device("cpu"), torch.float32)
    model = st.build()
    before = model.vqmodel.quantize.embedding.weight.detach().clone()
    st.export(model, tmp_path / "export")
    pipe = generate(tmp_path / "export")
    exported = pipe.ar.vqmodel.quantize.embedding.weight
    assert 0 < int((exported != before).any(1).sum()) <= 5


@pytest.mark.parametrize("value,stage", [(8, "decoder"), (-1, "tokenizer")])
def test_refit_codes_is_checked(value, stage):
    with pytest.raises(ValueError, match="refit_codes"):
        TrainConfig(stage=stage, refit_codes=value)
