"""One MIO-7B layer's matrix products on the CPU: where the 4-bit and 8-bit paths spend their time.

    python benchmarks/cpu_kernels.py [--rows 1,5,32,64,192,256,512] [--shapes 11008x4096,4096x11008,4096x4096]

For each weight shape (out x in) of MIO-7B's decoder and each number of rows (1 for a generated token, beams x
batch for a step of beam search, the prompt's length for its prefill): bf16 `F.linear`, torch's weight-only
kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) and mio's `Int8Linear` / `Int4Linear`, which
switch to dequantizing into one reused bf16 buffer and a single bf16 product from `INT8_DENSE_FROM_ROWS` /
`INT4_DENSE_FROM_ROWS` rows on. Also: the machine's read bandwidth (a sum over 1 GiB) and the time to quantize
one weight, times the 5.5 B weights of the decoder. Random weights; nothing is loaded from disk.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from torch.nn import functional

from miocli.model import quantize


def seconds(fn: Callable[[], object], budget: float = 0.5) -> float:
    fn()  # first-use costs out of the figure
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < budget:
        fn()
        runs += 1
    return (time.perf_counter() - start) / runs


def products(x: torch.Tensor, weight: torch.Tensor, int8: quantize.Int8Linear,
             int4: quantize.Int4Linear) -> list[float]:
    """Seconds of x Wᵀ: bf16, the int8 kernel, mio's int8 layer, the int4 kernel, mio's int4 layer."""
    return [
        seconds(lambda: functional.linear(x, weight)),
        seconds(lambda: torch._weight_int8pack_mm(x, int8.weight, int8.scales)),
        seconds(lambda: int8(x)),
        seconds(lambda: torch._weight_int4pack_mm_for_cpu(x, int4.weight, int4.group_size, int4.scales_and_zeros)),
        seconds(lambda: int4(x)),
    ]


def quantizing(weight: torch.Tensor, layer: torch.nn.Module) -> float:
    return seconds(lambda: layer.set_weight(weight), 0.1)  # type: ignore[operator]


def read_bandwidth() -> float:
    big = torch.ones(1 << 28)
    return big.numel() * 4 / seconds(lambda: big.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,5,32,64,192,256,512")
    parser.add_argument("--shapes", default="11008x4096,4096x11008,4096x4096")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"read bandwidth {read_bandwidth() / 1e9:.1f} GB/s (a sum over 1 GiB)\n")
    print("| weight | rows | bf16 | int8 kernel | mio int8 | int4 kernel | mio int4 | mio int4 vs kernel |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    quantize_s = {}
    for shape in args.shapes.split(","):
        out_features, in_features = map(int, shape.split("x"))
        weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
        int8 = quantize.Int8Linear(in_features, out_features, False, quantize.INT8_DENSE_FROM_ROWS)
        group = quantize.int4_group_size(in_features, out_features) or 128
        int4 = quantize.Int4Linear(in_features, out_features, False, group)
        quantize_s[shape] = (quantizing(weight, int8), quantizing(weight, int4))
        for rows in map(int, args.rows.split(",")):
            times = products(torch.randn(rows, in_features, dtype=torch.bfloat16), weight, int8, int4)
            print(f"| {shape} | {rows} | " + " | ".join(f"{t * 1e3:.1f} ms" for t in times)
                  + f" | {times[3] / times[4]:.2f}x |", flush=True)
    print("\n| weight | quantize int8 | quantize int4 | the decoder's 5.5 B weights at that rate (int8 / int4) |")
    print("|---|---:|---:|---:|")
    for shape, (int8_s, int4_s) in quantize_s.items():
        weights = math.prod(map(int, shape.split("x")))
        print(f"| {shape} | {int8_s * 1e3:.0f} ms | {int4_s * 1e3:.0f} ms | "
              f"{int8_s * 5.5e9 / weights:.0f} s / {int4_s * 5.5e9 / weights:.0f} s |")


if __name__ == "__main__":
    main()
