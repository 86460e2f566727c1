"""`glimage bench` and loading speed: the bench's table and JSON against the reference, the load path's cost."""

import json
import subprocess
import sys

import pytest

from glimage.cli import main


def test_bench_against_the_reference(tmp_path, capsys):
    pytest.importorskip("diffusers")
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--size", "64x64", "--steps", "2", "--runs", "1", "--compare-reference",
                 "--json", str(out), "--threads", "1"]) == 0
    table = capsys.readouterr().out
    for row in ("AR decode", "DiT per step", "VAE", "end to end", "images/s", "roofline", "reference"):
        assert row in table, table
    result = json.loads(out.read_text())
    ours, ref = result["ours"], result["reference"]
    assert ours["ar_decode_tokens_per_s"] > 0 and 0 < ours["roofline_fraction"] and ref["end_to_end_s"] > 0
    assert result["max_abs_image_diff"] <= 1 / 255  # the same weights and seed: the same image


def test_bench_refuses_bad_arguments(capsys):
    assert main(["bench", "src/glimage/assets/shapes", "--preset", "tiny"]) == 2 and "not both" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--size", "big"]) == 2 and "--size 'big'" in capsys.readouterr().err
    assert main(["bench", "--size", "1024x1024"]) == 2 and "context of 1024" in capsys.readouterr().err  # before loading


def test_bench_without_arguments_times_the_shipped_model_at_its_own_defaults(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--runs", "1", "--steps", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "128x128, 2 steps, CFG 3.0" in capsys.readouterr().out and result["ours"]["end_to_end_s"] > 0


def test_loading_builds_on_meta_without_initialising():
    """Building on the meta device skips every initialiser: torch._refs' meta normal_ used to import
    torch._dynamo, about 1 s of each CLI run (now ~0.15 s for import + load of the shipped model)."""
    code = ("import sys, torch; from glimage.pipeline import GlmImagePipeline; GlmImagePipeline.from_pretrained(); "
            "print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
