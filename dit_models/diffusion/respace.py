"""Timestep respacing: run a diffusion over a subset of the steps."""
import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion

__all__ = ["space_timesteps", "SpacedDiffusion"]


def space_timesteps(num_timesteps, section_counts):
    """The set of original steps to keep.

    section_counts:
        "ddimN": range(0, T, i) for the smallest stride i >= 1 giving exactly N steps;
        "c1,c2,..." (or a list / int): split [0, T) into equal sections (the first T mod S one
        step longer) and keep c_k evenly strided steps (float stride, round-half-even) in each.
    Example: space_timesteps(1000, "250") -> {0, 4, 8, ..., 999}.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide a section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))  # float accumulation, round half to even
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over the kept steps s_0 < ... < s_{K-1} of a base process.

    beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}} (abar_{s_-1} = 1), so abar'_k = abar_{s_k}; every table
    (including the learned-range variance bounds) is rebuilt from beta'. The network always sees the
    original step number timestep_map[k] = s_k (no rescale).

    Args:
        use_timesteps: iterable of original steps to keep.
        **kwargs: GaussianDiffusion arguments of the base process (betas of length T, ...).
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        self.timestep_map = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas, dtype=np.float64)
        super().__init__(**kwargs)
        self._map_tensors = {}
        self.base_alphas_cumprod = base.alphas_cumprod

    def _solver_alphas_cumprod(self):
        # DPM-Solver++ runs in continuous time over the original steps, whatever the respacing.
        return self.base_alphas_cumprod

    def map_timesteps(self, t):
        """Spaced indices (N,) -> original step numbers (N,) int64, on t's device (no host sync)."""
        m = self._map_tensors.get(t.device)
        if m is None:
            m = torch.tensor(self.timestep_map, dtype=torch.long, device=t.device)
            self._map_tensors[t.device] = m
        return m[t]

    def _model_call(self, model, x, t, model_kwargs):
        return model(x, self.map_timesteps(t), **(model_kwargs or {}))
