"""Gaussian diffusion (training loss) and sampling (DPM-Solver++ with guidance)."""

from lumos.diffusion.gaussian import GaussianDiffusion
from lumos.diffusion.sampling import interpolate, make_scheduler, sample

__all__ = ["GaussianDiffusion", "interpolate", "make_scheduler", "sample"]
