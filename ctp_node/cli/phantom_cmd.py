"""`ctp-node phantom`: write a digital CT perfusion phantom study, with its ground truth.

Outputs in OUTPUT: ``dicom/`` (the DICOM instances; point ``ctp-node perfusion`` or a PACS at this
folder) or, with ``--layout npy``, ``phantom.npy`` in the published model's array layout
(8 x 192 x 192 x T, 0..80 HU, skull-stripped); always ``truth.npz`` (ground-truth maps) and
``phantom.json`` (times, geometry, configuration).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class LayoutChoice(str, Enum):
    single_frame = "single-frame"
    enhanced = "enhanced"
    npy = "npy"


class VendorChoice(str, Enum):
    ge = "ge"
    siemens = "siemens"
    content_time = "content-time"


class SyntaxChoice(str, Enum):
    explicit = "explicit"
    jpeg_lossless = "jpeg-lossless"
    rle = "rle"


class FamilyChoice(str, Enum):
    default = "default"
    b = "b"


class ResidueChoice(str, Enum):
    exponential = "exponential"
    box = "box"


def phantom(
    output: Path = typer.Argument(..., help="Folder to write into (created; files of the same name are replaced)."),
    layout: LayoutChoice = typer.Option(LayoutChoice.single_frame, help="DICOM layout, or the model's .npy layout."),
    vendor: VendorChoice = typer.Option(VendorChoice.ge, help="Which tags carry the timing (single-frame)."),
    schedule: str = typer.Option("every:1", help="Acquisitions: every:N, irregular:1.5@20,3 or times:0,1.5,3.2."),
    drop: str = typer.Option("", help="Acquisition indices to drop, comma-separated, e.g. 3,7."),
    transfer_syntax: SyntaxChoice = typer.Option(SyntaxChoice.explicit, help="Pixel data encoding."),
    # The defaults depend on --layout and --family, so they are given as text (show_default): square
    # brackets in the help itself would be taken for Rich markup and vanish from --help.
    matrix: int | None = typer.Option(
        None, help="In-plane pixels.", show_default="512; 192 with --layout npy; 256 with --family b"
    ),
    slices: int | None = typer.Option(
        None, help="Number of 5 mm slices.", show_default="16; 8 with --layout npy or --family b"
    ),
    duration: int = typer.Option(61, help="Simulated seconds (one 1 s volume each)."),
    noise: float = typer.Option(
        10.0, help="Per-voxel noise std in HU on the generated grid (0: none); 10 gives ~8.5 HU in 8x8 patches at 512."
    ),
    lesion: bool = typer.Option(True, "--lesion/--no-lesion", help="Ischaemic core and penumbra, left MCA."),
    residue: ResidueChoice = typer.Option(ResidueChoice.exponential, help="Residue function of the tissue."),
    seed: int = typer.Option(0, help="Random seed (noise, tissue variation, UIDs)."),
    family: FamilyChoice = typer.Option(
        FamilyChoice.default,
        help="Phantom family: default, or b (independent anatomy, AIF, residue and noise texture for held-out "
        "tests; 256 x 256 (192 with npy) over 230 mm, 8 slices; lesion from --seed; --residue, --lesion ignored).",
    ),
    send: str = typer.Option(None, help="C-STORE the DICOM files to HOST:PORT:AET once written."),
    calling_aet: str = typer.Option("CTPNODE_PHANTOM", help="Our AE title for --send."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Simulate a CTP study of a digital head with known perfusion and write it like a scanner."""
    from ctp_node.cli.progress import stderr, step_progress
    from ctp_node.node.shared.peer import Peer
    from ctp_node.phantom import PhantomConfig, generate_family_b, generate_phantom
    from ctp_node.phantom.export import write_outputs
    from ctp_node.phantom.jpeg_lossless import EncoderMissingError
    from ctp_node.phantom.sampling import parse_schedule, sample_study

    npy = layout is LayoutChoice.npy
    try:
        if npy and send:
            raise ValueError("--send needs a DICOM layout (single-frame or enhanced), not npy")
        cfg = PhantomConfig(
            matrix=matrix if matrix is not None else (192 if npy else 512),
            slices=slices if slices is not None else (8 if npy else 16),
            duration_s=duration,
            noise_hu=noise,
            lesion=lesion,
            residue=residue.value,
            seed=seed,
        )
        if family is FamilyChoice.b:
            size = matrix if matrix is not None else (192 if npy else 256)
            cfg = _family_b_config(size, slices, duration, noise, seed)
        plan = parse_schedule(schedule, _integers(drop))
        peer = Peer.parse(send) if send else None
        with stderr.status("generating the phantom"):
            study = generate_family_b(cfg) if family is FamilyChoice.b else generate_phantom(cfg)
        series = sample_study(study, plan)
        with step_progress("writing", enabled=progress and not npy) as update:
            paths = write_outputs(
                study, series, output, layout=layout.value, vendor=vendor.value,
                transfer_syntax=transfer_syntax.value, progress=update,
            )  # fmt: skip
    except (ValueError, EncoderMissingError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    stderr.print(f"wrote {len(series.times_s)} time points to {output} ({len(paths)} DICOM files)")
    if peer is not None:
        _send(paths, peer, calling_aet, progress)


def _family_b_config(matrix: int, slices: int | None, duration: int, noise: float, seed: int):
    """Family B keeps its 230.4 mm field of view: the pixel follows the matrix (0.9 mm at 256)."""
    from ctp_node.phantom import FamilyBConfig

    return FamilyBConfig(
        seed=seed, matrix=matrix, pixel_mm=230.4 / matrix, slices=slices if slices is not None else 8,
        duration_s=duration, noise_hu=noise,
    )  # fmt: skip


def _integers(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--drop must be comma-separated integers, got {text!r}") from None


def _send(paths: list[Path], peer, calling_aet: str, progress: bool) -> None:
    """C-STORE ``paths``; exit code 2 with the reason when the peer is unreachable or refuses files."""
    from ctp_node.cli.progress import stderr, step_progress
    from ctp_node.node.work.scu import send_files

    try:
        with step_progress(f"sending to {peer.ae_title}", enabled=progress) as update:
            results = send_files(paths, peer, calling_aet, update)
    except ConnectionError as exc:
        stderr.print(f"[red]send failed:[/red] {exc}")
        raise typer.Exit(code=2) from exc
    failed = [r for r in results if not r.ok]
    if failed:
        shown = ", ".join(f"{r.path.name} (status {r.status})" for r in failed[:5])
        stderr.print(f"[red]{len(failed)} of {len(results)} files were not stored:[/red] {shown}")
        raise typer.Exit(code=2)
    stderr.print(f"sent {len(results)} files to {peer.ae_title} at {peer.host}:{peer.port}")
