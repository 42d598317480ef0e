#!/usr/bin/env python3
"""Roots of the trained free coefficients (A_coef) of S-Mamba runs: how many became complex
pairs, how many left the left half-plane, and the spread of their real parts.

    python3 docs/results/s-mamba/free/roots.py runs/s-mamba-free/*/checkpoint/model.safetensors

Pure Python (no numpy): reads the safetensors header, then finds each channel's roots with the
Durand-Kerner iteration (an independent check of the lab's Aberth root finder)."""
import json
import struct
import sys


def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    for name, meta in header.items():
        if name == "__metadata__" or not name.endswith("A_coef"):
            continue
        a, b = meta["data_offsets"]
        fmt = {"F32": "f", "F64": "d"}[meta["dtype"]]
        vals = struct.unpack("<%d%s" % ((b - a) // struct.calcsize(fmt), fmt), data[a:b])
        yield name, meta["shape"], vals


def roots(coef):
    """Roots of s^n + coef[n-1] s^(n-1) + ... + coef[0] (Durand-Kerner, then Newton)."""
    n = len(coef)

    def p(z):
        v = 1.0
        for c in reversed(coef):
            v = v * z + c
        return v

    z = [(0.4 + 0.9j) ** k for k in range(n)]
    for _ in range(2000):
        new = []
        for i, zi in enumerate(z):
            den = 1.0
            for j, zj in enumerate(z):
                if j != i:
                    den *= zi - zj
            new.append(zi - p(zi) / den if den != 0 else zi)
        done = max(abs(a - b) for a, b in zip(new, z)) < 1e-14 * (1 + max(abs(v) for v in z))
        z = new
        if done:
            break
    return z


def main(paths):
    for path in paths:
        for name, (di, n), vals in tensors(path):
            complex_pairs = unstable = 0
            re_min, re_max, im_max = float("inf"), -float("inf"), 0.0
            for c in range(di):
                rs = roots(list(vals[c * n:(c + 1) * n]))
                complex_pairs += sum(1 for r in rs if r.imag > 1e-9 * (1 + abs(r)))
                unstable += sum(1 for r in rs if r.real > 0)
                re_min = min(re_min, min(r.real for r in rs))
                re_max = max(re_max, max(r.real for r in rs))
                im_max = max(im_max, max(abs(r.imag) for r in rs))
            print(
                f"{path}: {name}: {di} channels x {n} roots: {complex_pairs} complex pairs "
                f"({100 * 2 * complex_pairs / (di * n):.1f}% of roots), {unstable} roots with "
                f"Re > 0, Re in [{re_min:.4g}, {re_max:.4g}], max |Im| {im_max:.4g}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
