"""The AR decode's matrix-vector products at the official widths, per dtype and weight layout, on this CPU.

    OMP_NUM_THREADS=1 python scripts/bench_matvec.py

Per token the decode reads every weight once: the layout that streams fastest decides its speed. Prints ms and
GB/s of weight bytes for row-major (PyTorch's default) and column-major weights (device.column_major_linears),
in fp32 and bf16, beside a measured copy bandwidth, and whether the CPU has bf16 matrix units (AMX).
"""

import time

import torch
import torch.nn.functional as F

from glimage.device import cpu_has_bf16_matrix_units

SHAPES = {"gate_up (27392, 4096)": (27392, 4096), "down (4096, 13696)": (4096, 13696),
          "qkv (4608, 4096)": (4608, 4096), "lm_head (16512, 4096)": (16512, 4096)}


def timed(fn, runs: int = 10) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - t0) / runs


def main() -> None:
    torch.set_num_threads(1)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, AMX {cpu_has_bf16_matrix_units()}, 1 thread")
    a = torch.empty(2**27)
    b = torch.empty_like(a)
    copy = a.numel() * 4 / timed(lambda: b.copy_(a), 5) / 1e9
    print(f"copy: {copy:.1f} GB/s read (+ as much written)")
    print(f"{'weight':24s} {'dtype':9s} {'row-major':>18s} {'column-major':>18s}")
    for name, (o, i) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(o, i).to(dtype)
            x = torch.randn(1, 1, i).to(dtype)
            cols = w.t().contiguous().t()
            gb = w.numel() * w.element_size() / 1e9
            r, c = timed(lambda: F.linear(x, w)), timed(lambda: F.linear(x, cols))
            print(f"{name:24s} {str(dtype)[6:]:9s} {r * 1e3:7.1f} ms {gb / r:5.1f} GB/s {c * 1e3:7.1f} ms {gb / c:5.1f} GB/s")


if __name__ == "__main__":
    main()
