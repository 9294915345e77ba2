"""Diffusion math: log-SNR schedules, objectives and losses, guidance, thresholding and samplers."""

from imagen_jax.diffusion.guidance import (
    THRESHOLD_KINDS,
    classifier_free_guidance,
    guided_model,
    threshold_x0,
)
from imagen_jax.diffusion.objectives import (
    OBJECTIVES,
    WEIGHTINGS,
    diffusion_loss,
    eps_from_x,
    loss_weight,
    prediction_to_x_eps,
    target,
    v_from_x_eps,
    x_eps_from_v,
    x_from_eps,
)
from imagen_jax.diffusion.samplers import (
    SAMPLERS,
    TIME_GRIDS,
    ddim_step,
    ddpm_step,
    dpmpp_step,
    extrapolated_x0,
    make_denoise_fn,
    sample,
)
from imagen_jax.diffusion.schedules import (
    SCHEDULE_NAMES,
    Schedule,
    alpha_sigma,
    diffuse,
    expand_to,
    get_schedule,
)

__all__ = [
    "OBJECTIVES",
    "SAMPLERS",
    "SCHEDULE_NAMES",
    "THRESHOLD_KINDS",
    "TIME_GRIDS",
    "WEIGHTINGS",
    "Schedule",
    "alpha_sigma",
    "classifier_free_guidance",
    "ddim_step",
    "ddpm_step",
    "diffuse",
    "diffusion_loss",
    "dpmpp_step",
    "eps_from_x",
    "expand_to",
    "extrapolated_x0",
    "get_schedule",
    "guided_model",
    "loss_weight",
    "make_denoise_fn",
    "prediction_to_x_eps",
    "sample",
    "target",
    "threshold_x0",
    "v_from_x_eps",
    "x_eps_from_v",
    "x_from_eps",
]
