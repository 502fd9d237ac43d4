"""The published conditional diffusion model for CTP temporal inpainting: network, maths, engine.

Knows nothing about DICOM or files beyond checkpoints. Public surface:
``load_denoiser``, ``UNet3D``/``UNetConfig``, ``NoiseSchedule``, the samplers, the planner and
``Inpainter``.
"""

from model.checkpoint import CheckpointError, load_denoiser, read_checkpoint, save_checkpoint
from model.engine import EngineSettings, Inpainter, InpaintResult
from model.planner import InpaintPlan, LongGapError, PlanError, plan_inpainting
from model.schedule import NoiseSchedule
from model.unet import UNet3D, UNetConfig

__all__ = [
    "CheckpointError",
    "EngineSettings",
    "InpaintPlan",
    "InpaintResult",
    "Inpainter",
    "LongGapError",
    "NoiseSchedule",
    "PlanError",
    "UNet3D",
    "UNetConfig",
    "load_denoiser",
    "plan_inpainting",
    "read_checkpoint",
    "save_checkpoint",
]
