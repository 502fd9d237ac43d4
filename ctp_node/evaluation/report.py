"""The evaluation's numbers, their spread over studies, issue 10's targets, and the Markdown tables.

Every per-study result is a ``Row``: one (study, gap, candidate) with a flat dict of metrics whose
keys say what they are (``offset_hu.gm``, ``curve_rmse_hu.penumbra``, ``map.cbf``, ``psnr_db``,
``aif.peak_hu_abs_error``, ...). The summary gives mean, std (n - 1), min and max of every metric over
the studies; the targets are judged on the means over studies, and the tables show mean +- std.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CANDIDATES = ("model", "linear", "grid_linear", "reference")
CANDIDATE_TITLES = {
    "model": "model",
    "linear": "linear interpolation",
    "grid_linear": "linear via model grid",  # the node's path with interpolation for the network
    "reference": "1 s acquisition",
}
TISSUES = ("gm", "wm", "core", "penumbra", "csf")
CURVE_TISSUES = ("gm", "wm", "penumbra", "core")
TISSUE_TITLES = {"gm": "GM", "wm": "WM", "core": "core", "penumbra": "penumbra", "csf": "CSF", "brain": "brain"}
MAPS = ("cbf", "cbv", "mtt", "tmax")

# Issue 10, "What to deliver" 1-4.
OFFSET_LIMIT_HU = 0.3
CURVE_RATIO = 0.5
MAP_LINEAR_RATIO = 0.7
PSNR_GAIN_DB = 2.0
AIF_RATIO = 0.5
STATIC_MEAN_LIMIT_HU = 0.5
STATIC_MEAN_ABS_LIMIT_HU = 2.0


@dataclass
class Row:
    """One (study, gap, candidate): flat metrics, and the seconds the study took (model rows)."""

    study: str
    gap_s: int
    candidate: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class StaticRow:
    """Synthetic seconds of a static series of real CT anatomy against its acquired volumes."""

    source: str
    gap_s: int
    mean_diff_hu: float
    mean_abs_diff_hu: float
    worst_second_mean_hu: float
    n_voxels: int
    synthetic_seconds: int
    # The same series through the node's path with linear interpolation for the network: the floor set
    # by resampling to the model grid and back (the best any network can reach on this path).
    floor_mean_diff_hu: float = float("nan")
    floor_mean_abs_diff_hu: float = float("nan")
    notes: str = ""
    seconds: float = 0.0


def spread(values: list[float]) -> dict[str, float]:
    """Mean, std (n - 1; 0 for one value), min, max and n of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    a = np.asarray(finite)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
    }


@dataclass
class EvaluationReport:
    rows: list[Row] = field(default_factory=list)
    static_rows: list[StaticRow] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # --- numbers ---------------------------------------------------------------------------------

    def gaps(self) -> list[int]:
        return sorted({r.gap_s for r in self.rows})

    def summary(self) -> list[dict[str, Any]]:
        """Per (gap, candidate): the spread of every metric over the studies."""
        out = []
        for gap in self.gaps():
            for candidate in CANDIDATES:
                rows = [r for r in self.rows if r.gap_s == gap and r.candidate == candidate]
                if not rows:
                    continue
                keys = sorted({k for r in rows for k in r.metrics})
                out.append(
                    {
                        "gap_s": gap,
                        "candidate": candidate,
                        "studies": len(rows),
                        "metrics": {k: spread([r.metrics.get(k, math.nan) for r in rows]) for k in keys},
                    }
                )
        return out

    def _means(self) -> dict[tuple[int, str], dict[str, float]]:
        return {(s["gap_s"], s["candidate"]): {k: v["mean"] for k, v in s["metrics"].items()} for s in self.summary()}

    def targets(self) -> list[dict[str, Any]]:
        """Issue 10's targets, judged on the means over studies (model against its comparators)."""
        means = self._means()
        out: list[dict[str, Any]] = []
        for gap in self.gaps():
            model, linear, ref = (means.get((gap, c)) for c in ("model", "linear", "reference"))
            if model is not None:
                out += _gap_targets(gap, model, linear, ref)
        out += [_static_target(s) for s in self.static_rows]
        return out

    # --- output ----------------------------------------------------------------------------------

    def markdown(self) -> str:
        summary = {(s["gap_s"], s["candidate"]): s for s in self.summary()}
        n_studies = max((s["studies"] for s in summary.values()), default=0)
        parts = []
        targets = self.targets()
        if targets:
            parts.append(_targets_table(targets, n_studies))
        if summary:
            parts.append(_tables(summary, self.gaps()))
        if any("volume_ml.core" in r.metrics for r in self.rows):
            parts.append(_volume_tables(self.rows, self.gaps()))
        if self.static_rows:
            parts.append(_static_table(self.static_rows))
        timed = [r.seconds for r in self.rows if r.seconds.get("total")]
        if timed:
            total, network = (spread([t.get(k, math.nan) for t in timed]) for k in ("total", "inpaint"))
            parts.append(
                f"Time per study and gap: {total['mean']:.0f} s (min {total['min']:.0f}, max {total['max']:.0f}), "
                f"of which the network {network['mean']:.0f} s.\n"
            )
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "targets": self.targets(),
            "summary": self.summary(),
            "rows": [asdict(r) for r in self.rows],
            "static_ct": [asdict(r) for r in self.static_rows],
            "figures": self.figures,
            "notes": self.notes,
        }

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out_dir / "evaluation.json", out_dir / "evaluation.md"
        json_path.write_text(json.dumps(_finite(self.to_dict()), indent=2, default=_json_default, allow_nan=False))
        notes = "".join(f"- {n}\n" for n in self.notes)
        md_path.write_text(
            "# Evaluation: model vs linear interpolation vs the 1 s acquisition, against the noise-free truth\n\n"
            f"Settings: `{json.dumps(_finite(self.settings), default=_json_default)}`\n\n"
            + (f"{notes}\n" if notes else "")
            + self.markdown()
        )
        return json_path, md_path


# --- targets ---------------------------------------------------------------------------------------


def _target(gap: int, name: str, measured: str, bound: str, ok: bool | None) -> dict[str, Any]:
    return {"gap_s": gap, "target": name, "measured": measured, "bound": bound, "pass": ok}


def _finite_mean(d: dict[str, float] | None, key: str) -> float | None:
    if d is None or key not in d or not math.isfinite(d[key]):
        return None
    return d[key]


def _ratio(m: float, lin: float) -> float:
    return m / lin if lin > 0 else (0.0 if m == 0 else math.inf)


@dataclass
class _Checks:
    """The model's numbers of one gap against its bounds; one dict per table, key -> pass."""

    offset: dict[str, bool] = field(default_factory=dict)  # tissue -> |offset| within the limit
    curve: dict[str, bool] = field(default_factory=dict)  # tissue -> RMSE <= ratio x linear
    map_ref: dict[str, bool] = field(default_factory=dict)  # map -> <= 1 s acquisition
    map_lin: dict[str, bool] = field(default_factory=dict)  # map -> <= ratio x linear
    psnr: dict[str, bool] = field(default_factory=dict)
    aif: dict[str, bool] = field(default_factory=dict)


def _checks(model: dict | None, linear: dict | None, ref: dict | None) -> _Checks:
    out = _Checks()
    if model is None:
        return out
    for t in TISSUES:
        v = _finite_mean(model, f"offset_hu.{t}")
        if v is not None:
            out.offset[t] = abs(v) <= OFFSET_LIMIT_HU
    for t in CURVE_TISSUES:
        m, lin = _finite_mean(model, f"curve_rmse_hu.{t}"), _finite_mean(linear, f"curve_rmse_hu.{t}")
        if m is not None and lin is not None:
            out.curve[t] = _ratio(m, lin) <= CURVE_RATIO
    for name in MAPS:
        m, lin, r = (_finite_mean(d, f"map.{name}") for d in (model, linear, ref))
        if m is not None and r is not None:
            out.map_ref[name] = m <= r
        if m is not None and lin is not None:
            out.map_lin[name] = m <= MAP_LINEAR_RATIO * lin
    m, lin = _finite_mean(model, "psnr_db"), _finite_mean(linear, "psnr_db")
    if m is not None and lin is not None:
        out.psnr["psnr"] = m - lin >= PSNR_GAIN_DB
    for key in AIF_KEYS:
        m, lin = _finite_mean(model, f"aif.{key}"), _finite_mean(linear, f"aif.{key}")
        if m is not None and lin is not None:
            out.aif[key] = m <= AIF_RATIO * lin
    return out


AIF_KEYS = ("peak_hu_abs_error", "peak_time_abs_error_s")


def _gap_targets(gap: int, model: dict, linear: dict | None, ref: dict | None) -> list[dict[str, Any]]:
    """Target rows of one gap: what was measured, the bound, pass (rules: ``_checks``)."""
    checks = _checks(model, linear, ref)
    out = []
    if checks.offset:
        offsets = {t: model[f"offset_hu.{t}"] for t in checks.offset}
        worst = max(offsets, key=lambda t: abs(offsets[t]))
        failing = [TISSUE_TITLES[t] for t, ok in checks.offset.items() if not ok]
        out.append(
            _target(
                gap,
                "tissue offset of synthetic seconds vs noise-free truth, each class",
                f"worst {TISSUE_TITLES[worst]} {offsets[worst]:+.2f} HU"
                + (f" (over: {', '.join(failing)})" if failing else ""),
                f"|offset| <= {OFFSET_LIMIT_HU} HU",
                all(checks.offset.values()),
            )
        )
    if checks.curve:
        ratios = {t: _ratio(model[f"curve_rmse_hu.{t}"], linear[f"curve_rmse_hu.{t}"]) for t in checks.curve}
        worst = max(ratios, key=lambda t: ratios[t])
        out.append(
            _target(
                gap,
                "mean tissue curve RMSE, model / linear (GM, WM, penumbra, core)",
                f"worst {TISSUE_TITLES[worst]} {ratios[worst]:.2f}",
                f"<= {CURVE_RATIO}",
                all(checks.curve.values()),
            )
        )
    for name in checks.map_lin:
        m, lin, r = model[f"map.{name}"], linear[f"map.{name}"], _finite_mean(ref, f"map.{name}")
        unit = " s" if name == "tmax" else ""
        bound = min(MAP_LINEAR_RATIO * lin, math.inf if r is None else r)
        out.append(
            _target(
                gap,
                f"{name.upper()} map disagreement vs noise-free truth's map",
                f"{m:.3f}{unit} (1 s acquisition {_fmt(r)}, linear {lin:.3f})",
                f"<= 1 s acquisition and <= {MAP_LINEAR_RATIO} x linear: {bound:.3f}{unit}",
                checks.map_lin[name] and checks.map_ref.get(name, True),
            )
        )
    if checks.psnr:
        m, lin = model["psnr_db"], linear["psnr_db"]
        out.append(
            _target(
                gap,
                "PSNR of synthetic seconds vs noise-free truth (brain, 0..80 HU)",
                f"{m:.2f} dB (linear {lin:.2f}, gain {m - lin:+.2f})",
                f">= linear + {PSNR_GAIN_DB} dB",
                checks.psnr["psnr"],
            )
        )
    for key, what, unit in zip(AIF_KEYS, ("height", "time"), ("HU", "s")):
        if key in checks.aif:
            m, lin = model[f"aif.{key}"], linear[f"aif.{key}"]
            out.append(
                _target(
                    gap,
                    f"AIF peak {what} |error| vs 1 s truth",
                    f"{m:.2f} {unit} (linear {lin:.2f})",
                    f"<= {AIF_RATIO} x linear: {AIF_RATIO * lin:.2f} {unit}",
                    checks.aif[key],
                )
            )
    return out


def _static_ok(row: StaticRow) -> bool:
    return abs(row.mean_diff_hu) <= STATIC_MEAN_LIMIT_HU and row.mean_abs_diff_hu <= STATIC_MEAN_ABS_LIMIT_HU


def _static_target(row: StaticRow) -> dict[str, Any]:
    return _target(
        row.gap_s,
        f"static real CT ({row.source}): synthetic vs acquired",
        f"mean {row.mean_diff_hu:+.2f} HU, mean abs {row.mean_abs_diff_hu:.2f} HU",
        f"|mean| <= {STATIC_MEAN_LIMIT_HU} HU, mean abs <= {STATIC_MEAN_ABS_LIMIT_HU} HU",
        _static_ok(row),
    )


# --- tables ----------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pm(stats: dict[str, float] | None, digits: int = 2, signed: bool = False) -> str:
    if stats is None or not stats["n"] or not math.isfinite(stats["mean"]):
        return "n/a"
    sign = "+" if signed else ""
    return f"{stats['mean']:{sign}.{digits}f} ± {stats['std']:.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("pass" if ok else "**fail**")


def _all(flags: dict[str, bool]) -> bool | None:
    return None if not flags else all(flags.values())


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"## {title}\n", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _targets_table(targets: list[dict[str, Any]], n_studies: int) -> str:
    rows = [[str(t["gap_s"]), t["target"], t["measured"], t["bound"], _verdict(t["pass"])] for t in targets]
    title = f"Targets (issue 10; model, mean over {n_studies} studies)"
    return _table(title, ["gap (s)", "target", "measured", "bound", "pass"], rows)


def _tables(summary: dict, gaps: list[int]) -> str:
    present = [(g, c) for g in gaps for c in CANDIDATES if (g, c) in summary]

    def stats(gap: int, candidate: str, key: str) -> dict[str, float] | None:
        return summary[(gap, candidate)]["metrics"].get(key)

    def has(key: str) -> bool:
        return any((stats(g, c, key) or {}).get("n") for g, c in present)

    def means(gap: int, candidate: str) -> dict[str, float] | None:
        found = summary.get((gap, candidate))
        return None if found is None else {k: v["mean"] for k, v in found["metrics"].items()}

    checks = {g: _checks(means(g, "model"), means(g, "linear"), means(g, "reference")) for g in gaps}

    def rows(cells: Callable[[int, str], list[str]], verdicts: Callable[[_Checks], list[bool | None]]) -> list:
        out = []
        for g, c in present:
            flags = verdicts(checks[g]) if c == "model" else []
            out.append([str(g), CANDIDATE_TITLES[c], *cells(g, c), *(_verdict(f) for f in flags)])
            out[-1] += [""] * (len(verdicts(_Checks())) - len(flags))
        return out

    parts = []
    tissues = [t for t in (*TISSUES, "brain") if has(f"offset_hu.{t}")]
    if tissues:
        parts.append(
            _table(
                "Mean offset of synthetic seconds vs the noise-free truth, per tissue (HU, mean ± std over studies)",
                ["gap (s)", "candidate", *(TISSUE_TITLES[t] for t in tissues), f"all within ±{OFFSET_LIMIT_HU}"],
                rows(
                    lambda g, c: [_pm(stats(g, c, f"offset_hu.{t}"), signed=True) for t in tissues],
                    lambda ch: [_all(ch.offset)],
                ),
            )
        )
    curve_tissues = [t for t in CURVE_TISSUES if has(f"curve_rmse_hu.{t}")]
    if curve_tissues:
        parts.append(
            _table(
                "Mean tissue curves: RMSE vs the truth's mean curve over synthetic seconds (HU)",
                ["gap (s)", "candidate", *(TISSUE_TITLES[t] for t in curve_tissues), f"<= {CURVE_RATIO} x linear"],
                rows(
                    lambda g, c: [_pm(stats(g, c, f"curve_rmse_hu.{t}")) for t in curve_tissues],
                    lambda ch: [_all(ch.curve)],
                ),
            )
        )
    if has("map.cbf"):
        parts.append(
            _table(
                "Perfusion maps vs the maps of the noise-free truth (median inside brain tissue; CBF, CBV, MTT "
                "relative, Tmax s)",
                ["gap (s)", "candidate", "CBF", "CBV", "MTT", "Tmax (s)", "<= 1 s acquisition",
                 f"<= {MAP_LINEAR_RATIO} x linear"],
                rows(
                    lambda g, c: [_pm(stats(g, c, f"map.{m}"), digits=3) for m in MAPS],
                    lambda ch: [_all(ch.map_ref), _all(ch.map_lin)],
                ),
            )
        )  # fmt: skip
    image_keys = [("psnr_db", 2), ("ssim", 3), ("mae_hu", 2)]
    aif_keys = [("aif.peak_hu_abs_error", 1), ("aif.peak_time_abs_error_s", 2)] if has("aif.peak_hu_abs_error") else []
    parts.append(
        _table(
            "Synthetic seconds in the brain (0..80 HU window) and the arterial input (|error| vs the noise-free "
            "1 s truth)",
            ["gap (s)", "candidate", "PSNR (dB)", "SSIM", "MAE (HU)"]
            + (["AIF peak height (HU)", "AIF peak time (s)"] if aif_keys else [])
            + [f"PSNR >= linear + {PSNR_GAIN_DB:g}"]
            + ([f"AIF <= {AIF_RATIO} x linear"] if aif_keys else []),
            rows(
                lambda g, c: [_pm(stats(g, c, k), digits=d) for k, d in image_keys + aif_keys],
                lambda ch: [_all(ch.psnr)] + ([_all(ch.aif)] if aif_keys else []),
            ),
        )
    )
    return "\n".join(parts)


VOLUMES = ("core", "tmax6", "mismatch")
VOLUME_TITLES = {"core": "core", "tmax6": "Tmax > 6 s", "mismatch": "mismatch"}


def _volume_tables(rows: list[Row], gaps: list[int]) -> str:
    """Issue 20's volume targets: per gap and candidate the mean |error| of each volume against the same
    analysis of the noise-free series, whether the model's is within the 1 s acquisition's and within half
    of linear's, the DEFUSE 3 decisions that agree, and how often the node would withhold; then every
    study's volumes in mL."""
    by = {(g, c): [r for r in rows if r.gap_s == g and r.candidate == c and "volume_ml.core" in r.metrics]
          for g in gaps for c in CANDIDATES}  # fmt: skip

    def mean(gap: int, candidate: str, key: str) -> float:
        values = [r.metrics[key] for r in by[(gap, candidate)] if math.isfinite(r.metrics.get(key, math.nan))]
        return float(np.mean(values)) if values else math.nan

    summary_rows = []
    for gap in gaps:
        for candidate in CANDIDATES:
            items = by[(gap, candidate)]
            if not items:
                continue
            errors = [mean(gap, candidate, f"volume_abs_error_ml.{v}") for v in VOLUMES]
            verdicts = []
            if candidate == "model":
                ref = [mean(gap, "reference", f"volume_abs_error_ml.{v}") for v in VOLUMES]
                lin = [mean(gap, "linear", f"volume_abs_error_ml.{v}") for v in VOLUMES]
                verdicts = [
                    _verdict(all(e <= r for e, r in zip(errors, ref)) if all(map(math.isfinite, ref)) else None),
                    _verdict(all(e <= 0.5 * w for e, w in zip(errors, lin)) if all(map(math.isfinite, lin)) else None),
                ]
            agree = sum(int(r.metrics["decision.agrees"]) for r in items)
            reported = sum(int(r.metrics["decision.reported"]) for r in items)
            summary_rows.append(
                [str(gap), CANDIDATE_TITLES[candidate], *(f"{e:.1f}" for e in errors), f"{agree}/{len(items)}",
                 f"{len(items) - reported}/{len(items)}", *(verdicts or ["", ""])]
            )  # fmt: skip
    parts = [
        _table(
            "Lesion volumes vs the same analysis of the noise-free series (mean |error| over studies, mL; as "
            "measured, whether or not the node would withhold them) and the DEFUSE 3 mismatch decision (core < "
            "70 mL, ratio >= 1.8, mismatch >= 15 mL)",
            [
                "gap (s)",
                "candidate",
                *(VOLUME_TITLES[v] for v in VOLUMES),
                "decision agrees",
                "withheld by the node",
                "<= 1 s acquisition",
                "<= 0.5 x linear",
            ],
            summary_rows,
        )  # fmt: skip
    ]
    study_rows = []
    for gap in gaps:
        for candidate in CANDIDATES:
            for r in by[(gap, candidate)]:
                m = r.metrics
                flags = "".join(f" ({v} withheld)" for v in ("core", "tmax6") if m.get(f"withheld.{v}"))
                study_rows.append(
                    [r.study, str(gap), CANDIDATE_TITLES[candidate],
                     *(f"{m[f'volume_ml.{v}']:.1f} ({m[f'volume_truth_ml.{v}']:.1f})" for v in VOLUMES),
                     ("yes" if m["decision.defuse3"] else "no") + ("" if m["decision.agrees"] else " (DISAGREES)")
                     + flags]
                )  # fmt: skip
    parts.append(
        _table(
            "Every study's volumes, mL (noise-free series in brackets), and the DEFUSE 3 decision",
            ["study", "gap (s)", "candidate", *(VOLUME_TITLES[v] for v in VOLUMES), "DEFUSE 3 mismatch"],
            study_rows,
        )
    )
    return "\n".join(parts)


def _static_table(rows: list[StaticRow]) -> str:
    table = _table(
        "Static series of real CT anatomy (three identical volumes at 0, g, 2g s): synthetic vs acquired "
        "(brain voxels in 0..80 HU)",
        ["source", "gap (s)", "synthetic seconds", "mean (HU)", "mean abs (HU)", "worst second mean (HU)",
         "path floor: mean / mean abs (HU)", "voxels",
         f"mean within ±{STATIC_MEAN_LIMIT_HU}, abs <= {STATIC_MEAN_ABS_LIMIT_HU}"],
        [[s.source, str(s.gap_s), str(s.synthetic_seconds), f"{s.mean_diff_hu:+.2f}", f"{s.mean_abs_diff_hu:.2f}",
          f"{s.worst_second_mean_hu:+.2f}", f"{s.floor_mean_diff_hu:+.2f} / {s.floor_mean_abs_diff_hu:.2f}",
          str(s.n_voxels), _verdict(_static_ok(s))] for s in rows],
    )  # fmt: skip
    notes = sorted({s.notes for s in rows if s.notes}) + [
        "Path floor: the same static series through the node's path with linear interpolation on the model "
        "grid in place of the network (resampling to 1.25 mm and back): what a perfect network would score."
    ]
    return table + "".join(f"\n{n}\n" for n in notes)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    return str(value)
