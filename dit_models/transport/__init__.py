"""SiT transport (continuous-time interpolants) and its samplers.

    transport = create_transport("Linear", "velocity")          # SiT defaults
    loss = transport.training_losses(model, x1, dict(y=y))["loss"].mean()
    sampler = Sampler(transport)
    sample_fn = sampler.sample_sde(diffusion_form="sigma", cfg_scale=1.5, guided_channels=3)
    x = sample_fn(z, model.forward, y=y)[-1]                    # B-row state, fused CFG
    x = sampler.sample_dpm_solver(20, cfg_scale=1.5)(z, model.forward, y=y)[-1]   # DPM-Solver++(2M), 20 NFE

See sampler.py for the differences from the public SiT code (one network evaluation per drift,
device-side noise, final state only, CUDA-graph capture, likelihood from data).
"""
from .path import GVPPath, LinearPath, Path, VPPath  # noqa: F401
from .sampler import DIFFUSION_FORMS, LikelihoodResult, Sampler, diffusion_coefficient, reset_cuda_graphs  # noqa: F401
from .transport import SBDM_T0, ModelType, PathType, Transport, WeightType, create_transport, mean_flat  # noqa: F401

__all__ = [
    "create_transport", "Transport", "Sampler", "LikelihoodResult", "ModelType", "PathType", "WeightType",
    "reset_cuda_graphs", "Path", "LinearPath", "GVPPath", "VPPath", "diffusion_coefficient", "DIFFUSION_FORMS", "SBDM_T0", "mean_flat",
]
