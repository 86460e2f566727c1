"""The MindSpore backend (`pip install "glimage[mindspore]"`): the same models, the same official checkpoint
folder and the same pipeline in MindSpore, the framework GLM-Image was trained with.

One file per component, mirroring glimage.models (ar, vision, glyph, dit, vae), with torch's parameter names so
that the key maps, configs, prompt layout, tokenizers, size rules, flow schedule and validation are the PyTorch
path's own. pipeline.py runs generation (`glimage generate --backend mindspore`), train.py training
(`glimage train tiny-ar --set backend=mindspore`). Parity with the PyTorch path: tests/test_mindspore.py.
"""

import os

# MindSpore logs every kernel warning (e.g. empty slices, which the pipeline makes on purpose) to stderr at
# level 2; errors still show. Set GLOG_v yourself to see more.
os.environ.setdefault("GLOG_v", "3")

try:
    import mindspore  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    from ..validate import InputError
    raise InputError('the MindSpore backend needs MindSpore: pip install "glimage[mindspore]" (MindSpore 2.10 '
                     'wants numpy<2; see docs/mindspore.md)', "backend") from e
