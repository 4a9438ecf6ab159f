"""Type stubs for the Rust extension module ``ferrodiff._core``."""

import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import numpy as np
import numpy.typing as npt
from typing_extensions import TypeAlias

__version__: str

ArrayLike = npt.ArrayLike
F32: TypeAlias = npt.NDArray[np.float32]
F64: TypeAlias = npt.NDArray[np.float64]
I64: TypeAlias = npt.NDArray[np.int64]
Timesteps: TypeAlias = int | npt.ArrayLike
Spacing: TypeAlias = str | Sequence[int] | npt.NDArray[np.integer[Any]]
Config: TypeAlias = Mapping[str, Any] | str | os.PathLike[str] | Any
Denoiser: TypeAlias = Callable[..., ArrayLike] | Model | Trainer
Callback: TypeAlias = Callable[[int, int, F32, F32 | None], Any]

class Schedule:
    @staticmethod
    def from_checkpoint(path: str | os.PathLike[str]) -> Schedule: ...
    @staticmethod
    def linear(
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        *,
        scale_with_T: bool = False,
    ) -> Schedule: ...
    @staticmethod
    def scaled_linear(
        num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> Schedule: ...
    @staticmethod
    def cosine(num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule: ...
    @staticmethod
    def sigmoid(
        num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02
    ) -> Schedule: ...
    @staticmethod
    def sigmoid_alpha_bar(
        num_train_timesteps: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0
    ) -> Schedule: ...
    @staticmethod
    def from_betas(betas: ArrayLike) -> Schedule: ...
    @staticmethod
    def from_alphas_cumprod(alphas_cumprod: ArrayLike) -> Schedule: ...
    @staticmethod
    def from_diffusers_config(config: Config) -> Schedule: ...
    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Schedule: ...
    def rescale_zero_terminal_snr(self) -> Schedule: ...
    def respaced(self, timesteps: ArrayLike) -> Schedule: ...
    @property
    def num_train_timesteps(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def betas(self) -> F64: ...
    @property
    def alphas(self) -> F64: ...
    @property
    def alphas_cumprod(self) -> F64: ...
    @property
    def alphas_cumprod_prev(self) -> F64: ...
    @property
    def posterior_variance(self) -> F64: ...
    @property
    def posterior_log_variance_clipped(self) -> F64: ...
    @property
    def posterior_mean_coef1(self) -> F64: ...
    @property
    def posterior_mean_coef2(self) -> F64: ...
    @property
    def snr(self) -> F64: ...
    @property
    def sigmas(self) -> F64: ...
    @property
    def sqrt_alphas_cumprod(self) -> F64: ...
    @property
    def sqrt_one_minus_alphas_cumprod(self) -> F64: ...
    def q_sample(self, x0: ArrayLike, t: Timesteps, noise: ArrayLike) -> F32: ...
    def velocity(self, x0: ArrayLike, t: Timesteps, noise: ArrayLike) -> F32: ...
    def predict_x0(
        self, x_t: ArrayLike, t: Timesteps, model_output: ArrayLike, prediction: str = "epsilon"
    ) -> F32: ...
    def predict_eps(
        self, x_t: ArrayLike, t: Timesteps, model_output: ArrayLike, prediction: str = "epsilon"
    ) -> F32: ...
    def score(
        self, x_t: ArrayLike, t: Timesteps, model_output: ArrayLike, prediction: str = "epsilon"
    ) -> F32: ...
    def q_posterior(self, x0: ArrayLike, x_t: ArrayLike, t: Timesteps) -> tuple[F32, F32, F32]: ...
    def eps_from_score(self, score: ArrayLike, t: Timesteps) -> F32: ...
    def to_dict(self) -> dict[str, Any]: ...
    def __len__(self) -> int: ...
    def __reduce__(self) -> Any: ...

class DynamicThreshold:
    def __init__(self, ratio: float = 0.995, max_value: float | None = None) -> None: ...
    @property
    def ratio(self) -> float: ...
    @property
    def max_value(self) -> float | None: ...
    def __reduce__(self) -> Any: ...

class StepOutput:
    def __init__(self, prev_sample: Any, pred_x0: Any) -> None: ...
    @property
    def prev_sample(self) -> Any: ...
    @property
    def pred_x0(self) -> Any: ...
    @property
    def pred_original_sample(self) -> Any: ...
    def __iter__(self) -> Iterator[Any]: ...
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Any: ...

class DiscreteSampler:
    @classmethod
    def from_diffusers_config(
        cls, config: Config, steps: int | None = None, **overrides: Any
    ) -> DiscreteSampler: ...
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DiscreteSampler: ...
    @property
    def timesteps(self) -> I64: ...
    @property
    def schedule(self) -> Schedule: ...
    @property
    def steps(self) -> int: ...
    @property
    def num_evaluations(self) -> int: ...
    @property
    def prediction(self) -> str: ...
    def step(
        self,
        model_output: ArrayLike,
        t: Timesteps,
        x: ArrayLike,
        *,
        noise: ArrayLike | None = None,
        seed: int | None = None,
        out: F32 | None = None,
        pred_x0_out: F32 | None = None,
        return_pred_x0: bool = True,
        check_finite: bool = True,
    ) -> StepOutput: ...
    def sample(
        self,
        denoiser: Denoiser,
        shape: Sequence[int] | None = None,
        *,
        x_T: ArrayLike | None = None,
        seed: int | None = 0,
        progress: bool = False,
        callback: Callback | None = None,
        check_finite: bool = True,
        labels: Timesteps | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        null_label: int | None = None,
        image: ArrayLike | None = None,
        strength: float = 1.0,
        mask: ArrayLike | None = None,
        classifier: Classifier | Callable[[F32, I64, I64], ArrayLike] | None = None,
        classifier_scale: float = 1.0,
        context: ArrayLike | None = None,
        control_image: ArrayLike | None = None,
        conditioning_scale: float | None = None,
    ) -> F32: ...
    def to_dict(self) -> dict[str, Any]: ...
    def __reduce__(self) -> Any: ...

class DDPM(DiscreteSampler):
    def __init__(
        self,
        schedule: Schedule,
        steps: int | None = None,
        spacing: Spacing | None = None,
        prediction: str = "epsilon",
        variance: str = "fixed_small",
        clip_sample: float | None = None,
        threshold: DynamicThreshold | None = None,
        *,
        steps_offset: int = 0,
    ) -> None: ...
    @property
    def variance(self) -> str: ...

class DDIM(DiscreteSampler):
    def __init__(
        self,
        schedule: Schedule,
        steps: int = 50,
        spacing: Spacing | None = None,
        eta: float = 0.0,
        prediction: str = "epsilon",
        clip_sample: float | None = None,
        threshold: DynamicThreshold | None = None,
        set_alpha_to_one: bool = True,
        use_clipped_model_output: bool = False,
        *,
        steps_offset: int = 0,
    ) -> None: ...
    @property
    def eta(self) -> float: ...
    def invert(
        self,
        denoiser: Denoiser,
        x0: ArrayLike,
        *,
        progress: bool = False,
        callback: Callback | None = None,
        check_finite: bool = True,
        labels: Timesteps | None = None,
        context: ArrayLike | None = None,
    ) -> F32: ...

class SolverState:
    @property
    def next(self) -> int: ...

class SigmaSampler:
    @classmethod
    def from_diffusers_config(cls, config: Config, steps: int = 25, **overrides: Any) -> SigmaSampler: ...
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SigmaSampler: ...
    @property
    def sigmas(self) -> F64: ...
    @property
    def timesteps(self) -> F64: ...
    @property
    def evaluation_sigmas(self) -> F64: ...
    @property
    def steps(self) -> int: ...
    @property
    def num_evaluations(self) -> int: ...
    @property
    def init_noise_sigma(self) -> float: ...
    @property
    def prediction(self) -> str: ...
    @property
    def schedule(self) -> Schedule | None: ...
    def new_state(self, start: int = 0) -> SolverState: ...
    def scale_model_input(self, x: ArrayLike, i: int) -> F32: ...
    def step(
        self,
        model_output: ArrayLike,
        i: int,
        x: ArrayLike,
        *,
        state: SolverState | None = None,
        noise: ArrayLike | None = None,
        seed: int | None = None,
        check_finite: bool = True,
    ) -> StepOutput: ...
    def sample(
        self,
        denoiser: Denoiser,
        shape: Sequence[int] | None = None,
        *,
        x_T: ArrayLike | None = None,
        seed: int | None = 0,
        progress: bool = False,
        callback: Callable[[int, float, F32, F32 | None], Any] | None = None,
        check_finite: bool = True,
        labels: Timesteps | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        null_label: int | None = None,
        image: ArrayLike | None = None,
        strength: float = 1.0,
        mask: ArrayLike | None = None,
        classifier: Classifier | Callable[[F32, I64, I64], ArrayLike] | None = None,
        classifier_scale: float = 1.0,
        context: ArrayLike | None = None,
        control_image: ArrayLike | None = None,
        conditioning_scale: float | None = None,
    ) -> F32: ...
    def to_dict(self) -> dict[str, Any]: ...
    def __reduce__(self) -> Any: ...

class Euler(SigmaSampler):
    def __init__(
        self,
        schedule: Schedule | None = None,
        steps: int | None = None,
        *,
        prediction: str = "epsilon",
        sigmas: str | Sequence[float] | None = None,
        rho: float = 7.0,
        sigma_min: float | None = None,
        sigma_max: float | str | None = None,
        spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        timestep_mode: str = "interpolate",
        sigma_data: float = 0.5,
        clip_sample: float | None = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = ...,
        s_noise: float = 1.0,
    ) -> None: ...

class EulerAncestral(SigmaSampler):
    def __init__(
        self,
        schedule: Schedule | None = None,
        steps: int | None = None,
        *,
        eta: float = 1.0,
        s_noise: float = 1.0,
        prediction: str = "epsilon",
        sigmas: str | Sequence[float] | None = None,
        rho: float = 7.0,
        sigma_min: float | None = None,
        sigma_max: float | str | None = None,
        spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        timestep_mode: str = "interpolate",
        sigma_data: float = 0.5,
        clip_sample: float | None = None,
    ) -> None: ...

class Heun(SigmaSampler):
    def __init__(
        self,
        schedule: Schedule | None = None,
        steps: int | None = None,
        *,
        prediction: str = "epsilon",
        sigmas: str | Sequence[float] | None = None,
        rho: float = 7.0,
        sigma_min: float | None = None,
        sigma_max: float | str | None = None,
        spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        timestep_mode: str = "interpolate",
        sigma_data: float = 0.5,
        clip_sample: float | None = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = ...,
        s_noise: float = 1.0,
    ) -> None: ...

class DPMSolver(SigmaSampler):
    def __init__(
        self,
        schedule: Schedule | None = None,
        steps: int | None = None,
        *,
        algorithm: str = "dpmsolver++",
        order: int = 2,
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        prediction: str = "epsilon",
        sigmas: str | Sequence[float] | None = None,
        rho: float = 7.0,
        sigma_min: float | None = None,
        sigma_max: float | str | None = None,
        spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        timestep_mode: str = "interpolate",
        sigma_data: float = 0.5,
        clip_sample: float | None = None,
    ) -> None: ...

class DPMAdaptive:
    def __init__(
        self,
        schedule: Schedule | None = None,
        *,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        order: int = 3,
        rtol: float = 0.05,
        atol: float = 0.0078,
        h_init: float = 0.05,
        pcoeff: float = 0.0,
        icoeff: float = 1.0,
        dcoeff: float = 0.0,
        accept_safety: float = 0.81,
        eta: float = 0.0,
        s_noise: float = 1.0,
        denoise_to_zero: bool = True,
        prediction: str = "epsilon",
        timestep_mode: str = "interpolate",
        sigma_data: float = 0.5,
    ) -> None: ...
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DPMAdaptive: ...
    @property
    def sigma_min(self) -> float: ...
    @property
    def sigma_max(self) -> float: ...
    @property
    def init_noise_sigma(self) -> float: ...
    @property
    def schedule(self) -> Schedule | None: ...
    def sample(
        self,
        denoiser: Denoiser,
        shape: Sequence[int] | None = None,
        *,
        x_T: ArrayLike | None = None,
        seed: int | None = 0,
        progress: bool = False,
        callback: Callable[[int, float, F32, F32 | None], Any] | None = None,
        check_finite: bool = True,
        labels: Timesteps | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        null_label: int | None = None,
        image: ArrayLike | None = None,
        strength: float = 1.0,
        mask: ArrayLike | None = None,
        classifier: Classifier | Callable[[F32, I64, I64], ArrayLike] | None = None,
        classifier_scale: float = 1.0,
        context: ArrayLike | None = None,
        return_info: bool = False,
    ) -> Any: ...
    def to_dict(self) -> dict[str, Any]: ...
    def __reduce__(self) -> Any: ...

def ode_bits_per_dim(
    model: Any,
    schedule: Schedule | None,
    x0: ArrayLike,
    *,
    labels: Timesteps | None = None,
    prediction: str = "epsilon",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    data_variance: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dequantize: bool = False,
    seed: int = 0,
    timestep_mode: str = "interpolate",
    sigma_data: float = 0.5,
    delta: float = 0.001,
    return_info: bool = False,
) -> Any: ...

class GaussianMixture:
    def __init__(self, weights: ArrayLike, means: ArrayLike, stds: ArrayLike) -> None: ...
    @property
    def dim(self) -> int: ...
    @property
    def weights(self) -> F64: ...
    @property
    def means(self) -> F64: ...
    @property
    def stds(self) -> F64: ...
    def eps(self, x: ArrayLike, t: Timesteps, schedule: Schedule) -> F32: ...
    def class_posterior(self, x: ArrayLike, t: Timesteps, schedule: Schedule) -> F64: ...
    def denoiser(self, schedule: Schedule, prediction: str = "epsilon") -> MixtureCallable: ...
    def sample(self, n: int, seed: int = 0) -> F32: ...

class MixtureCallable:
    def __call__(self, x: ArrayLike, t: Timesteps) -> F32: ...

def timesteps(
    num_train_timesteps: int,
    steps: int | None = None,
    spacing: Spacing | None = None,
    steps_offset: int = 0,
) -> I64: ...
def space_timesteps(num_train_timesteps: int, section_counts: str) -> I64: ...
def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> F64: ...
def cosine_log_snr(u: float | ArrayLike, log_snr_min: float = -20.0, log_snr_max: float = 20.0) -> Any: ...
def randn(shape: Sequence[int], seed: int | None = None, *, out: F32 | None = None) -> F32: ...
def energy_distance(a: ArrayLike, b: ArrayLike) -> float: ...

# losses and likelihood
def training_target(
    schedule: Schedule, x0: ArrayLike, noise: ArrayLike, t: Timesteps, prediction: str = "epsilon"
) -> F32: ...
def loss_weight(
    schedule: Schedule, t: Timesteps, kind: str = "uniform", prediction: str = "epsilon", gamma: float = 5.0
) -> F64: ...
def simple_loss(
    model_output: ArrayLike, target: ArrayLike, weights: ArrayLike | None = None
) -> tuple[F64, F32]: ...
def vb_terms_bpd(
    schedule: Schedule,
    x0: ArrayLike,
    x_t: ArrayLike,
    t: Timesteps,
    model_output: ArrayLike,
    *,
    prediction: str = "epsilon",
    variance: str = "fixed_small",
    bins: int = 256,
    clip_denoised: bool = True,
) -> F64: ...
def prior_bpd(schedule: Schedule, x0: ArrayLike) -> F64: ...
def bits_per_dim(
    denoiser: Denoiser,
    schedule: Schedule,
    x0: ArrayLike,
    *,
    prediction: str = "epsilon",
    variance: str = "fixed_small",
    bins: int = 256,
    seed: int = 0,
    clip_denoised: bool = True,
    progress: bool = False,
    labels: Timesteps | None = None,
) -> BitsPerDim: ...

class BitsPerDim:
    @property
    def total(self) -> F64: ...
    @property
    def prior(self) -> F64: ...
    @property
    def terms(self) -> F64: ...
    @property
    def mse(self) -> F64: ...

def hybrid_loss(
    schedule: Schedule,
    x0: ArrayLike,
    x_t: ArrayLike,
    noise: ArrayLike,
    t: Timesteps,
    model_output: ArrayLike,
    *,
    prediction: str = "epsilon",
    bins: int = 256,
) -> tuple[F64, F32]: ...

class TimestepSampler:
    def __init__(
        self, num_timesteps: int, kind: str = "uniform", history: int = 10, uniform_prob: float = 0.001
    ) -> None: ...
    @property
    def kind(self) -> str: ...
    @property
    def num_timesteps(self) -> int: ...
    @property
    def warmed_up(self) -> bool: ...
    def probabilities(self) -> F64: ...
    def sample(self, batch: int, seed: int = 0) -> tuple[I64, F64]: ...
    def update(self, t: Timesteps, losses: ArrayLike) -> None: ...
    def to_dict(self) -> dict[str, Any]: ...
    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> TimestepSampler: ...
    def __reduce__(self) -> Any: ...

# score matching and Langevin dynamics
def sgld(
    score_fn: Callable[[F32], ArrayLike],
    x_init: ArrayLike,
    step_size: float,
    steps: int,
    seed: int = 0,
    *,
    progress: bool = False,
    callback: Callable[[int, F32], Any] | None = None,
) -> F32: ...
def annealed(
    score_fn: Callable[[F32, float], ArrayLike],
    sigmas: ArrayLike,
    shape: Sequence[int] | None = None,
    steps_per_level: int = 100,
    eps: float = 2e-5,
    seed: int = 0,
    *,
    x_init: ArrayLike | None = None,
    progress: bool = False,
) -> F32: ...
def geometric_sigmas(sigma_max: float = 1.0, sigma_min: float = 0.01, n: int = 10) -> F64: ...
def dsm_loss(
    score_output: ArrayLike, x_noisy: ArrayLike, x0: ArrayLike, sigmas_per_sample: ArrayLike
) -> tuple[F64, F32]: ...
def mmd(x: ArrayLike, y: ArrayLike, bandwidths: float | Sequence[float] | None = None) -> float: ...
def frechet_distance(x: ArrayLike, y: ArrayLike) -> float: ...
def gaussian_stats(x: ArrayLike) -> tuple[F64, F64]: ...
def frechet_distance_from_stats(
    mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike
) -> float: ...

class Model:
    def __init__(self, config: Mapping[str, Any], seed: int = 0) -> None: ...
    def __call__(
        self, x: ArrayLike, t: Timesteps, y: Timesteps | None = None, *, context: ArrayLike | None = None
    ) -> F32: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def num_parameters(self) -> int: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def learn_sigma(self) -> bool: ...
    @property
    def data_shape(self) -> list[int]: ...
    def state_dict(self) -> dict[str, F32]: ...
    def load_state_dict(
        self, state: Mapping[str, ArrayLike], strict: bool = True
    ) -> tuple[list[str], list[str]] | None: ...
    def save(self, path: str | os.PathLike[str]) -> None: ...
    @staticmethod
    def load(path: str | os.PathLike[str], ema: bool = True) -> Model: ...
    def with_control(self, images: ArrayLike, *, conditioning_scale: float | None = None) -> Model: ...
    @staticmethod
    def from_diffusers(folder: str | os.PathLike[str], **kwargs: Any) -> Model: ...
    def save_diffusers(self, folder: str | os.PathLike[str]) -> None: ...
    def __reduce__(self) -> Any: ...
    # Autoencoders (fd.nn.AutoencoderKL / fd.nn.VQModel).
    def encode(self, x: ArrayLike, *, sample: bool = False, seed: int = 0) -> F32: ...
    def decode(self, z: ArrayLike) -> F32: ...
    def reconstruct(self, x: ArrayLike) -> F32: ...
    def codes(self, x: ArrayLike) -> npt.NDArray[np.int64]: ...
    def codebook_usage(self, x: ArrayLike) -> dict[str, Any]: ...
    @property
    def scaling_factor(self) -> float: ...
    def with_scaling_factor(self, scaling_factor: float) -> Model: ...
    def latent_shape(self, size: int | None = None) -> list[int]: ...
    # Super-resolution U-Nets (cond_channels > 0).
    def with_low_res(
        self,
        images: ArrayLike,
        aug_level: float = 0.0,
        *,
        seed: int = 0,
        add_noise: bool = True,
        upsample: str = "bilinear",
    ) -> Model: ...

def _model_from_bytes(data: bytes) -> Model: ...
def _time_op(op: str, dims: Sequence[int], repeats: int = 10) -> tuple[float, float]: ...
def _dit_variant(name: str) -> dict[str, Any]: ...
def _controlnet_from(
    base: Model,
    conditioning_channels: int = 1,
    conditioning_embedding_channels: list[int] = ...,
    conditioning_scale: float = 1.0,
    seed: int = 0,
) -> Model: ...
def _classifier_from_bytes(data: bytes) -> Classifier: ...

class Trainer:
    def __init__(
        self,
        model: Model,
        schedule: Schedule | None,
        data: ArrayLike,
        labels: ArrayLike | None = None,
        *,
        context: ArrayLike | None = None,
        control: ArrayLike | None = None,
        batch_size: int = 128,
        lr: float = 0.001,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        total_steps: int = 0,
        grad_clip: float | None = 1.0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-08,
        ema_decay: float = 0.9999,
        ema_power: float = 0.75,
        ema_warmup: bool = True,
        ema_update_after_step: int = 0,
        prediction: str = "epsilon",
        loss: str = "mse",
        weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        timestep_sampling: str = "uniform",
        class_dropout: float = 0.0,
        bins: int = 256,
        seed: int = 0,
        objective: str = "diffusion",
        objective_options: dict[str, Any] | None = None,
        teacher: Model | Trainer | str | os.PathLike[str] | Callable[..., Any] | None = None,
    ) -> None: ...
    def train(
        self,
        steps: int,
        *,
        progress: bool = True,
        callback: Callable[[int, float], Any] | None = None,
        callback_every: int = 100,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 0,
    ) -> None: ...
    def save(self, path: str | os.PathLike[str]) -> str: ...
    @staticmethod
    def resume(
        path: str | os.PathLike[str],
        data: ArrayLike,
        labels: ArrayLike | None = None,
        *,
        context: ArrayLike | None = None,
        control: ArrayLike | None = None,
        teacher: Model | Trainer | str | os.PathLike[str] | Callable[..., Any] | None = None,
    ) -> Trainer: ...
    @property
    def objective(self) -> str: ...
    @property
    def objective_metrics(self) -> dict[str, Any] | None: ...
    @property
    def _consistency_params(self) -> tuple[float, float, float, float] | None: ...
    @property
    def model(self) -> Model: ...
    def ema_model(self) -> Model: ...
    @property
    def schedule(self) -> Schedule: ...
    @property
    def step(self) -> int: ...
    @property
    def losses(self) -> F32: ...
    @property
    def lr(self) -> float: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def extra(self) -> Any: ...
    @extra.setter
    def extra(self, value: Any) -> None: ...

class Classifier:
    def __init__(
        self, in_dim: int, hidden: Sequence[int], num_classes: int, seed: int = 0, time_embed_dim: int = 0
    ) -> None: ...
    def fit(
        self,
        data: ArrayLike,
        labels: ArrayLike,
        *,
        steps: int = 2000,
        batch_size: int = 128,
        lr: float = 0.003,
        seed: int = 0,
        schedule: Schedule | None = None,
    ) -> F32: ...
    def features(self, x: ArrayLike, t: Timesteps | None = None) -> F32: ...
    def predict_proba(self, x: ArrayLike, t: Timesteps | None = None) -> F32: ...
    def grad_log_prob(self, x: ArrayLike, t: Timesteps | None, y: Timesteps) -> F32: ...
    def save(self, path: str | os.PathLike[str]) -> pathlib.Path: ...
    @staticmethod
    def load(path: str | os.PathLike[str]) -> Classifier: ...
    def __reduce__(self) -> Any: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def schedule(self) -> Schedule | None: ...
    @property
    def is_noisy(self) -> bool: ...
    @property
    def num_classes(self) -> int: ...

class ConsistencySampler:
    def __init__(
        self,
        model: Model | Trainer | Callable[..., Any] | None = None,
        sigmas: Sequence[float] | None = None,
        *,
        steps: int = 1,
        num_scales: int = 40,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_data: float | None = None,
        rho: float | None = None,
        clip_denoised: bool = True,
    ) -> None: ...
    @property
    def sigmas(self) -> list[float]: ...
    @property
    def timesteps(self) -> list[float]: ...
    @property
    def steps(self) -> int: ...
    @property
    def sigma_min(self) -> float: ...
    @property
    def sigma_max(self) -> float: ...
    @property
    def sigma_data(self) -> float: ...
    def sample(
        self,
        denoiser: Model | Trainer | Callable[..., Any] | Sequence[int] | None = None,
        shape: Sequence[int] | None = None,
        *,
        x_T: ArrayLike | None = None,
        seed: int | None = None,
        progress: bool = False,
        callback: Callable[[int, float, F32, F32], Any] | None = None,
        check_finite: bool = True,
        labels: ArrayLike | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        null_label: int | None = None,
        image: ArrayLike | None = None,
        strength: float = 1.0,
        mask: ArrayLike | None = None,
        context: ArrayLike | None = None,
        control_image: ArrayLike | None = None,
        conditioning_scale: float | None = None,
    ) -> F32: ...

def student_sigmas(schedule: Schedule, steps: int, sigma_max: float | None = 80.0) -> list[float]: ...
def consistency_training_schedule(
    k: int,
    total_steps: int,
    *,
    recipe: str = "ct",
    s0: int | None = None,
    s1: int | None = None,
    mu0: float = 0.9,
) -> tuple[int, float]: ...
def consistency_function(
    model: Model | Trainer,
    x: ArrayLike,
    sigma: float,
    labels: ArrayLike | None = None,
    *,
    sigma_min: float = 0.002,
    sigma_data: float = 0.5,
) -> F32: ...
