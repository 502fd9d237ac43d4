"""Quality against sampler steps: the fast samplers and the published (ancestral) one on one model.

For each ``sampler:steps`` setting, one held-out phantom study acquired every ``--gap`` seconds goes
through `ctp-node evaluate`'s own path (node grid, inpainting, back to scanner geometry) and is
scored against the noise-free 1 s truth: masked PSNR and SSIM of the synthetic seconds, median
perfusion-map disagreement with the truth's maps and the forward passes it took (ctp_node.evaluation.phantom_study).
Linear interpolation is the floor.

    .venv/bin/python benchmarks/sampler_tuning.py --checkpoint model/weights/demo.pt \\
        --gap 8 --settings dpmpp_2m:2,4,8 ddim:4 ancestral:8 --json tuning.json

Costs scale with the steps: on a 2-core CPU one setting at 8 steps is about 5 minutes with the
3.4 M-parameter demo network; a GPU runs the whole curve in seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_settings(items: list[str]) -> list[tuple[str, int]]:
    out = []
    for item in items:
        sampler, _, steps = item.partition(":")
        out += [(sampler, int(s)) for s in steps.split(",") if s]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--gap", type=int, default=8)
    parser.add_argument("--seed", type=int, default=10_000, help="phantom seed (held out from training)")
    parser.add_argument("--noise", type=float, default=6.0)
    parser.add_argument("--settings", nargs="+", default=["dpmpp_2m:2,4,8", "ddim:4", "ancestral:8"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from ctp_node.evaluation.phantom_study import PhantomEvalSettings, evaluate_phantom
    from model import EngineSettings, Inpainter, load_denoiser

    loaded = load_denoiser(args.checkpoint)  # the engine samples with the checkpoint's own schedule
    data = PhantomEvalSettings(gaps=(args.gap,), studies=1, seed=args.seed, noise_hu=args.noise, figures=False)
    rows, linear = [], None
    for sampler, steps in parse_settings(args.settings):
        engine = Inpainter(loaded, EngineSettings(sampler=sampler, steps=steps, long_gap="error"), device=args.device)
        calls = {"n": 0}
        forward = engine._forward

        def counted(*inputs, _forward=forward, calls=calls):
            calls["n"] += inputs[0].shape[0]
            return _forward(*inputs)

        engine._forward = counted
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            report = evaluate_phantom(engine, data, Path(scratch), say=lambda _: None)
        seconds = time.perf_counter() - start
        summary = {s["candidate"]: {k: v["mean"] for k, v in s["metrics"].items()} for s in report.summary()}
        linear = summary["linear"]
        rows.append({"sampler": sampler, "steps": steps, "volume_forwards": calls["n"], "seconds": seconds,
                     **summary["model"]})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    def line(name: str, s: dict) -> str:
        return (
            f"| {name} | {s['psnr_db']:.2f} | {s['ssim']:.3f} | {s['map.cbf']:.1%} | "
            f"{s['map.tmax']:.2f} | {s['dice.hypoperfusion']:.2f} | {s['dice.core']:.2f} |"
        )

    table = [
        "| setting | PSNR (dB) | SSIM | CBF rel. diff. | Tmax abs. diff. (s) | hypoperfusion Dice | core Dice |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(line(f"{r['sampler']} {r['steps']} steps", r) for r in rows),
        line("linear interpolation", linear),
    ]
    print("\n".join(table))
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
            "checkpoint": str(args.checkpoint), "gap_s": args.gap, "seed": args.seed, "noise_hu": args.noise,
            "rows": rows, "linear": linear, "table": table,
        }, indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
