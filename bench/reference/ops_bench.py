"""Per-op timings from Python PyTorch eager, the reference side of bench/ops_bench.ts.

Prints one JSON object {case: seconds per call}. Each case mirrors the TypeScript one exactly:
same shapes, same op, the result dropped every iteration (freed by refcounting).
"""
import json
import sys
import time

import torch


def cases():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, generator=g)
    b = torch.randn(2, 3, generator=g)
    m8 = torch.randn(8, 8, generator=g)
    x64 = torch.randn(1, 64, generator=g)
    w64 = torch.randn(64, 64, generator=g)
    b64 = torch.randn(64, generator=g)
    s = torch.randn(4, 16, generator=g)
    img = torch.randn(1, 4, 8, 8, generator=g)
    k = torch.randn(4, 4, 3, 3, generator=g)
    m256 = torch.randn(256, 256, generator=g)
    x32 = torch.randn(1, 64, 32, 32, generator=g)
    k64 = torch.randn(64, 64, 3, 3, generator=g)
    return {
        "add_2x3": lambda: a + b,
        "mul_scalar_2x3": lambda: a * 0.5,
        "matmul_8x8": lambda: m8 @ m8,
        "linear_1x64": lambda: torch.nn.functional.linear(x64, w64, b64),
        "softmax_4x16": lambda: torch.softmax(s, -1),
        "cat_2x3": lambda: torch.cat([a, b], 0),
        "reshape_permute_2x3": lambda: a.reshape(3, 2).permute(1, 0),
        "conv2d_1x4x8x8": lambda: torch.nn.functional.conv2d(img, k, None, 1, 1),
        "matmul_256x256": lambda: m256 @ m256,
        "conv2d_1x64x32x32": lambda: torch.nn.functional.conv2d(x32, k64, None, 1, 1),
    }


def main():
    plan = json.loads(sys.argv[1])  # {case: iterations}
    out = {}
    table = cases()
    with torch.no_grad():
        for name, iters in plan.items():
            fn = table[name]
            for _ in range(max(10, iters // 10)):
                fn()
            best = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(iters):
                    fn()
                best.append((time.perf_counter() - t) / iters)
            best.sort()
            out[name] = best[len(best) // 2]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
