"""Time the generation of a realistic phantom study (512 x 512 x 16 slices x 61 s, noise, lesion).

Target: under 30 s on 2 CPU cores. Run: ``.venv/bin/python benchmarks/phantom_generation.py``.
"""

from __future__ import annotations

import argparse
import os
import time

from ctp_node.phantom import PhantomConfig, generate_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--duration", type=int, default=61)
    parser.add_argument("--noise", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    cfg = PhantomConfig(
        matrix=args.matrix, slices=args.slices, duration_s=args.duration, noise_hu=args.noise, lesion=True, seed=0
    )
    for _ in range(args.repeats):
        start = time.perf_counter()
        study = generate_phantom(cfg)
        elapsed = time.perf_counter() - start
        print(
            f"generated {args.matrix}x{args.matrix}x{args.slices}x{args.duration} s study "
            f"({study.hu.nbytes / 2**30:.2f} GiB float32, noise {args.noise} HU) in {elapsed:.1f} s "
            f"on {os.cpu_count()} CPU cores"
        )
        del study


if __name__ == "__main__":
    main()
