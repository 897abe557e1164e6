"""Flow-matching Euler scheduler for SD3 img2img, in pure numpy (no torch, no diffusers).

A functional re-statement of diffusers' ``FlowMatchEulerDiscreteScheduler`` as driven by
``StableDiffusion3Img2ImgPipeline`` (``calculate_shift``, ``retrieve_timesteps``, ``get_timesteps``,
``prepare_latents`` -> ``scale_noise``, the denoising loop -> ``step``). Every expression keeps
diffusers' operation order and dtypes (float64 for the schedule maths, float32 for the stored
schedule and for the Euler update), so results are bit-identical to diffusers on CPU.

Typical use::

    cfg = SchedulerConfig.from_dict(scheduler_config_json)
    mu = dynamic_mu(cfg, latent_h, latent_w, patch_size) if cfg.use_dynamic_shifting else None
    timesteps, sigmas = set_timesteps(cfg, steps, mu=mu)
    timesteps, sigmas = img2img_timesteps(timesteps, sigmas, len(timesteps), strength)
    latents = scale_noise(init_latents, sigmas[0], noise)
    for i, t in enumerate(timesteps):        # the transformer gets t (= sigma * num_train_timesteps)
        latents = euler_step(latents, model(latents, t), sigmas[i], sigmas[i + 1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

from sd3trt.errors import Sd3trtError

__all__ = [
    "SchedulerConfig",
    "calculate_shift",
    "image_seq_len",
    "dynamic_mu",
    "set_timesteps",
    "img2img_start_index",
    "img2img_timesteps",
    "scale_noise",
    "euler_step",
]

CLASS_NAME = "FlowMatchEulerDiscreteScheduler"
_TIME_SHIFT_TYPES = ("exponential", "linear")


@dataclass(frozen=True)
class SchedulerConfig:
    """The settings of diffusers' FlowMatchEulerDiscreteScheduler (same names, same defaults)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    def __post_init__(self) -> None:
        where = "scheduler config"
        _check_int(self.num_train_timesteps, "num_train_timesteps", where, minimum=1)
        _check_int(self.base_image_seq_len, "base_image_seq_len", where, minimum=0)
        _check_int(self.max_image_seq_len, "max_image_seq_len", where, minimum=0)
        _check_number(self.shift, "shift", where)
        if not self.shift > 0:
            raise Sd3trtError(f"{where}: shift must be > 0, got {self.shift}; SD3 uses 3.0")
        for name in ("base_shift", "max_shift", "shift_terminal"):
            v = getattr(self, name)
            if v is not None:
                _check_number(v, name, where)
        if self.shift_terminal is not None and not self.shift_terminal < 1:
            raise Sd3trtError(
                f"{where}: shift_terminal must be < 1 (it is the final sigma), got {self.shift_terminal}; "
                "use a value like 0.1, or null to disable it")
        for name in ("use_dynamic_shifting", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                     "use_beta_sigmas", "stochastic_sampling"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise Sd3trtError(f"{where}: {name} must be true or false, got {getattr(self, name)!r}")
        if self.time_shift_type not in _TIME_SHIFT_TYPES:
            raise Sd3trtError(
                f"{where}: time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        if sum(bool(x) for x in (self.use_karras_sigmas, self.use_exponential_sigmas, self.use_beta_sigmas)) > 1:
            raise Sd3trtError(
                f"{where}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be true")
        if self.use_beta_sigmas:
            raise Sd3trtError(
                f"{where}: use_beta_sigmas is not supported by the sd3trt runtime (it needs scipy's beta "
                "distribution); set it to false, or use use_karras_sigmas / use_exponential_sigmas")
        if self.stochastic_sampling:
            raise Sd3trtError(
                f"{where}: stochastic_sampling is not supported by the sd3trt runtime (it samples with the "
                "deterministic Euler step); set it to false")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """Read a diffusers ``scheduler_config.json`` dict.

        Keys starting with ``_`` are metadata and ignored, except that ``_class_name``, when present,
        must name FlowMatchEulerDiscreteScheduler. Keys this class does not know are ignored (as
        diffusers ignores them); missing keys take diffusers' defaults.
        """
        if not isinstance(d, Mapping):
            raise Sd3trtError(f"scheduler config must be a JSON object, got {type(d).__name__}")
        cls_name = d.get("_class_name")
        if cls_name is not None and cls_name != CLASS_NAME:
            raise Sd3trtError(
                f"scheduler config: _class_name is {cls_name!r}, but the sd3trt runtime implements only "
                f"{CLASS_NAME}; export the model with its FlowMatchEulerDiscreteScheduler")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and not k.startswith("_")}
        return cls(**kwargs)


def _check_number(v: Any, name: str, where: str) -> None:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(v):
        raise Sd3trtError(f"{where}: {name} must be a finite number, got {v!r}")


def _check_int(v: Any, name: str, where: str, minimum: int) -> None:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise Sd3trtError(f"{where}: {name} must be an integer >= {minimum}, got {v!r}")


# --------------------------------------------------------------------------- resolution shift (mu)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for dynamic shifting: linear in the image token count (diffusers' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    mu = image_seq_len * m + b
    return mu


def image_seq_len(latent_height: int, latent_width: int, patch_size: int) -> int:
    """The transformer's image token count, as the img2img pipeline computes it for mu.

    diffusers uses ``(height // vae_scale_factor // patch_size) * (width // ...)`` on pixel sizes;
    with ``latent_height = height // vae_scale_factor`` this is the same number.
    """
    for name, v in (("latent_height", latent_height), ("latent_width", latent_width)):
        _check_int(v, name, "image size", minimum=1)
    _check_int(patch_size, "patch_size", "transformer config", minimum=1)
    return (int(latent_height) // int(patch_size)) * (int(latent_width) // int(patch_size))


def dynamic_mu(config: SchedulerConfig, latent_height: int, latent_width: int, patch_size: int) -> float:
    """mu the img2img pipeline computes when ``use_dynamic_shifting`` is set and no mu is given."""
    if config.base_shift is None or config.max_shift is None:
        missing = [n for n in ("base_shift", "max_shift") if getattr(config, n) is None]
        raise Sd3trtError(
            f"use_dynamic_shifting needs mu, and mu cannot be computed: scheduler config has {' and '.join(missing)} "
            "= null; pass mu explicitly or set base_shift/max_shift in scheduler_config.json")
    if config.max_image_seq_len == config.base_image_seq_len:
        raise Sd3trtError(
            "use_dynamic_shifting needs mu, and mu cannot be computed: scheduler config has "
            f"base_image_seq_len == max_image_seq_len ({config.base_image_seq_len}); pass mu explicitly")
    return calculate_shift(image_seq_len(latent_height, latent_width, patch_size), config.base_image_seq_len,
                           config.max_image_seq_len, config.base_shift, config.max_shift)


# --------------------------------------------------------------------------- the schedule


def _train_sigma_bounds(config: SchedulerConfig) -> tuple[float, float]:
    """(sigma_max, sigma_min) as the scheduler's __init__ leaves them (float32, shifted unless dynamic)."""
    n = config.num_train_timesteps
    t = np.linspace(1, n, n, dtype=np.float32)[::-1]
    sig = np.array([t[0], t[-1]], dtype=np.float32) / n
    if not config.use_dynamic_shifting:
        shift = config.shift
        sig = shift * sig / (1 + (shift - 1) * sig)
    return float(sig[0]), float(sig[-1])


def _time_shift(config: SchedulerConfig, mu: float, t: np.ndarray) -> np.ndarray:
    sigma = 1.0
    with np.errstate(divide="ignore"):  # t == 0 gives 1/t = inf -> shifted sigma 0, as in diffusers
        if config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)


def set_timesteps(config: SchedulerConfig, num_inference_steps: int | None = None,
                  sigmas: Sequence[float] | np.ndarray | None = None,
                  mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The full schedule: ``(timesteps[n], sigmas[n + 1])``, both float32.

    ``sigmas`` ends with the terminal value (0, or 1 with ``invert_sigmas``); ``timesteps`` is
    ``sigmas[:-1] * num_train_timesteps`` computed in float32 — that is what the transformer gets.
    Give ``num_inference_steps`` or custom ``sigmas`` (or both, if they agree). ``mu`` is required with
    ``use_dynamic_shifting`` (see ``dynamic_mu``) and ignored otherwise, as in diffusers.
    """
    if mu is not None:
        _check_number(mu, "mu", "set_timesteps")
    if config.use_dynamic_shifting and mu is None:
        raise Sd3trtError(
            "the scheduler config sets use_dynamic_shifting, so mu is required; pass mu, or compute it with "
            "dynamic_mu(config, latent_height, latent_width, patch_size)")
    if num_inference_steps is not None:
        if isinstance(num_inference_steps, (bool, np.bool_)) or not isinstance(num_inference_steps, (int, np.integer)):
            raise Sd3trtError(f"steps must be an integer, got {num_inference_steps!r}")
        if num_inference_steps < 1:
            raise Sd3trtError(f"steps must be at least 1, got {num_inference_steps}")
    if sigmas is None and num_inference_steps is None:
        raise Sd3trtError("set_timesteps needs the number of steps or a custom list of sigmas; pass steps >= 1")

    n_train = config.num_train_timesteps
    if sigmas is None:
        sigma_max, sigma_min = _train_sigma_bounds(config)
        timesteps = np.linspace(sigma_max * n_train, sigma_min * n_train, num_inference_steps)
        sig = timesteps / n_train
    else:
        sig = np.array(sigmas).astype(np.float32)
        if sig.ndim != 1 or sig.size == 0:
            raise Sd3trtError(f"custom sigmas must be a non-empty flat list of numbers, got shape {sig.shape}")
        if not np.all(np.isfinite(sig)) or sig.min() < 0 or sig.max() > 1:
            raise Sd3trtError("custom sigmas must be finite numbers in [0, 1] (1 = pure noise), "
                              f"got min {sig.min()} max {sig.max()}")
        if num_inference_steps is not None and len(sig) != num_inference_steps:
            raise Sd3trtError(
                f"{len(sig)} custom sigmas were given with steps={num_inference_steps}; they must agree — "
                "pass one sigma per step, or leave steps out when giving sigmas")
        num_inference_steps = len(sig)

    # Shift: resolution-dependent (mu) or the static `shift`. Note that the default path is shifted
    # twice overall: sigma_max/min above are already shifted, as in diffusers.
    if config.use_dynamic_shifting:
        sig = _time_shift(config, mu, sig)
    else:
        sig = config.shift * sig / (1 + (config.shift - 1) * sig)

    if config.shift_terminal:
        one_minus_z = 1 - sig
        scale_factor = one_minus_z[-1] / (1 - config.shift_terminal)
        if scale_factor == 0:
            raise Sd3trtError("shift_terminal cannot stretch a schedule whose last sigma is 1 (diffusers "
                              "gives NaN here; a single step does this); use more steps, end custom sigmas "
                              "below 1, or set shift_terminal to null")
        sig = 1 - (one_minus_z / scale_factor)

    if config.use_karras_sigmas or config.use_exponential_sigmas:
        lo, hi = float(sig[-1]), float(sig[0])
        if config.use_karras_sigmas:
            rho = 7.0
            ramp = np.linspace(0, 1, num_inference_steps)
            min_inv_rho = lo ** (1 / rho)
            max_inv_rho = hi ** (1 / rho)
            sig = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
        else:
            if not (lo > 0 and hi > 0):
                raise Sd3trtError("use_exponential_sigmas needs a schedule with positive first and last sigma "
                                  f"(got {hi} .. {lo}); end custom sigmas above 0 or use use_karras_sigmas")
            sig = np.exp(np.linspace(math.log(hi), math.log(lo), num_inference_steps))

    sig = np.asarray(sig).astype(np.float32)
    if not np.all(np.isfinite(sig)):
        raise Sd3trtError("the scheduler produced non-finite sigmas; check shift, mu and the custom sigmas")
    if config.invert_sigmas:
        sig = 1.0 - sig
        terminal = np.ones(1, dtype=np.float32)
    else:
        terminal = np.zeros(1, dtype=np.float32)
    timesteps = sig * n_train
    return timesteps.astype(np.float32), np.concatenate([sig, terminal])


# --------------------------------------------------------------------------- img2img


def _check_strength(strength: float) -> None:
    if isinstance(strength, (bool, np.bool_)) or not isinstance(strength, (int, float, np.integer, np.floating)) \
            or not 0.0 <= strength <= 1.0:
        raise Sd3trtError(f"strength must be a number in [0, 1], got {strength!r}")


def img2img_start_index(num_inference_steps: int, strength: float) -> int:
    """First schedule index img2img runs (diffusers' ``get_timesteps`` t_start; also step()'s begin index)."""
    if isinstance(num_inference_steps, (bool, np.bool_)) or not isinstance(num_inference_steps, (int, np.integer)) \
            or num_inference_steps < 1:
        raise Sd3trtError(f"steps must be an integer >= 1, got {num_inference_steps!r}")
    _check_strength(strength)
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    t_start = int(max(num_inference_steps - init_timestep, 0))
    if t_start >= num_inference_steps:
        raise Sd3trtError(
            f"strength {strength} with {num_inference_steps} steps leaves no denoising step "
            "(strength 0 returns the input image unchanged); use a strength above 0 — any strength > 0 runs at "
            "least one step, and the number run is about steps * strength")
    return t_start


def img2img_timesteps(timesteps: np.ndarray, sigmas: np.ndarray, num_inference_steps: int,
                      strength: float) -> tuple[np.ndarray, np.ndarray]:
    """The part of the schedule img2img runs: ``(timesteps[k], sigmas[k + 1])``.

    ``timesteps[i]`` goes to the transformer at step ``i``; step ``i`` moves from ``sigmas[i]`` to
    ``sigmas[i + 1]``; ``sigmas[0]`` is the noise level ``scale_noise`` mixes into the init latents.
    """
    timesteps = np.asarray(timesteps)
    sigmas = np.asarray(sigmas)
    if timesteps.ndim != 1 or sigmas.ndim != 1 or len(sigmas) != len(timesteps) + 1:
        raise Sd3trtError(f"img2img_timesteps needs timesteps[n] and sigmas[n + 1] from set_timesteps, got "
                          f"shapes {timesteps.shape} and {sigmas.shape}")
    if num_inference_steps != len(timesteps):
        raise Sd3trtError(f"num_inference_steps={num_inference_steps} disagrees with the {len(timesteps)} "
                          "timesteps given; pass len(timesteps)")
    t_start = img2img_start_index(num_inference_steps, strength)
    return timesteps[t_start:], sigmas[t_start:]


def scale_noise(sample: np.ndarray, sigma: float | np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Flow-matching forward process: ``sigma * noise + (1 - sigma) * sample``.

    ``sigma`` is a scalar or one value per batch item; like diffusers it is cast to the sample's dtype.
    """
    sample = np.asarray(sample)
    noise = np.asarray(noise)
    if sample.shape != noise.shape:
        raise Sd3trtError(f"noise shape {noise.shape} does not match the latents' shape {sample.shape}")
    s = np.asarray(sigma, dtype=np.float32).astype(sample.dtype).reshape(-1)
    if s.size not in (1, sample.shape[0] if sample.ndim else 1):
        raise Sd3trtError(f"scale_noise got {s.size} sigmas for a batch of {sample.shape[0]}")
    s = s.reshape((-1,) + (1,) * max(sample.ndim - 1, 0))
    return s * noise + (1.0 - s) * sample


def euler_step(sample: np.ndarray, model_output: np.ndarray, sigma: float, sigma_next: float) -> np.ndarray:
    """One Euler step ``sample + (sigma_next - sigma) * model_output``, with diffusers' dtype handling.

    The sample is upcast to float32 (``dt`` is float32 as the schedule is), the result is cast to the
    model output's dtype.
    """
    sample = np.asarray(sample)
    model_output = np.asarray(model_output)
    if sample.shape != model_output.shape:
        raise Sd3trtError(f"model output shape {model_output.shape} does not match the latents' shape {sample.shape}")
    dt = np.float32(sigma_next) - np.float32(sigma)
    # torch casts the 0-d float32 dt to the model output's dtype (it does not promote a float16
    # tensor); numpy would promote float16 * float32 to float32, so cast dt explicitly.
    prod = model_output.dtype.type(dt) * model_output
    prev = sample.astype(np.float32) + prod
    return prev.astype(model_output.dtype, copy=False)
