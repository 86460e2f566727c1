"""`glimage check`: the conformance table at the official widths, its verdict and its exit code."""

import subprocess
import sys

import pytest

from glimage import check
from glimage.cli import build_parser


def test_fp32_on_the_cpu_is_the_truth_itself():
    rows = check.check("cpu", "float32", only=["glyph", "vision"])
    assert [r["component"] for r in rows] == ["vision", "glyph"]
    assert all(r["rel_error"] < 1e-6 and r["ok"] for r in rows)  # the same kernels on the same inputs: 0 here


def test_bf16_errors_sit_just_under_the_references_tolerance():
    rows = check.check("cpu", "bfloat16", only=["glyph", "dit"])
    for r in rows:  # the tolerance is 1.25x the reference's own error; the CPU makes the same error as it
        assert 0.5 * r["tolerance"] < r["rel_error"] <= r["tolerance"], r  # measured 0.8 (a bf16 path at all)


def test_out_of_tolerance_exits_1_and_says_which(monkeypatch, capsys):
    monkeypatch.setitem(check.TOLERANCES, "bfloat16", {**check.TOLERANCES["bfloat16"], "glyph": 1e-4})
    args = build_parser().parse_args(["check", "--only", "glyph", "--dtype", "bfloat16", "--device", "cpu"])
    assert check.main(args) == 1
    out = capsys.readouterr().out
    assert "glyph" in out and "OUT OF TOLERANCE" in out


def test_the_command_prints_a_table_and_refuses_a_bad_size():
    ok = subprocess.run([sys.executable, "-m", "glimage.cli", "check", "--only", "glyph", "--dtype", "float32"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "rel. error" in ok.stdout and "glyph" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "glimage.cli", "check", "--size", "100"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--size 100" in bad.stderr and "multiple of 32" in bad.stderr


@pytest.mark.parametrize("dtype", ["float64"])
def test_an_unsupported_dtype_is_named(dtype):
    bad = subprocess.run([sys.executable, "-m", "glimage.cli", "check", "--dtype", dtype],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and dtype in bad.stderr
