"""The published conditional diffusion model for CTP temporal inpainting: network, maths, engine.

Knows nothing about DICOM or files beyond checkpoints. Public surface:
``load_denoiser`` (a ``LoadedModel``: network and ``CheckpointInfo``), ``UNet3D``/``UNetConfig``,
``NoiseSchedule``, the samplers, the planner (``plan_seconds``: the ``FillPlan`` of a study) and
``Inpainter``.
"""

from model.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    LoadedModel,
    load_denoiser,
    read_checkpoint,
    save_checkpoint,
)
from model.engine import EngineSettings, Inpainter, InpaintResult, LinearInpainter, StudyInpaint
from model.planner import FillPlan, InpaintPlan, LongGapError, PlanError, SecondFill, plan_inpainting, plan_seconds
from model.schedule import NoiseSchedule
from model.unet import UNet3D, UNetConfig

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "EngineSettings",
    "FillPlan",
    "InpaintPlan",
    "InpaintResult",
    "Inpainter",
    "LinearInpainter",
    "LoadedModel",
    "LongGapError",
    "NoiseSchedule",
    "PlanError",
    "SecondFill",
    "StudyInpaint",
    "UNet3D",
    "UNetConfig",
    "load_denoiser",
    "plan_inpainting",
    "plan_seconds",
    "read_checkpoint",
    "save_checkpoint",
]
