"""Agreement of ferrodiff's σ-space samplers with diffusers' schedulers, step by step.

For random configurations (schedules, prediction types, spacings, Karras / exponential σ on or
off, final σ, churn, DPM-Solver orders and variants) both libraries get the same model outputs
and the same noise at every step, and the same x: each step starts from diffusers' previous
result, so the comparison is of one update at a time while multistep histories build up alike.

Conventions (docs/differences.md): ferrodiff's x is x0 + σ z at every level, diffusers' Euler
and Heun schedulers hold the same, its DPMSolverMultistepScheduler holds α x with
α = 1/√(σ² + 1): the DPM-Solver test scales by α. diffusers computes its tables in float32,
ferrodiff in float64, so results are compared at rtol 1e-4 with an absolute tolerance scaled by
the magnitude of the reference.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
import ferrodiff as fd
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

SHAPE = (2, 3, 4, 4)
RTOL = 1e-4
ATOL = 1e-5

SCHEDULES = [
    {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
]


def assert_close(ours, ref, what="", x=None):
    """`x`: the step's input. diffusers forms x + d·Δσ in float32, which carries rounding errors
    of a few ulp of |x| (at σ = 2e4, the cosine schedule's σ_999, that is ~2e-3 on a result of
    magnitude 5); ferrodiff folds the coefficients in float64 first."""
    ours = np.asarray(ours)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, what
    assert ours.dtype == np.float32, what
    assert np.all(np.isfinite(ours)), what
    scale = max(1.0, float(np.abs(ref).max()))
    atol = ATOL * scale
    if x is not None:
        atol = max(atol, 2e-6 * float(np.abs(x).max()))
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=atol, err_msg=what)


def torch_noise(k):
    """The tensor diffusers' schedulers draw with Generator().manual_seed(k)."""
    return randn_tensor(SHAPE, generator=torch.Generator().manual_seed(k), dtype=torch.float32).numpy()


def random_config(rng, *, predictions=("epsilon", "v_prediction", "sample"), spacing=True, karras=True):
    cfg = {"num_train_timesteps": 1000}
    cfg.update(SCHEDULES[rng.integers(len(SCHEDULES))])
    cfg["prediction_type"] = str(rng.choice(predictions))
    if spacing:
        cfg["timestep_spacing"] = str(rng.choice(["linspace", "leading", "trailing"]))
        if cfg["timestep_spacing"] == "leading":
            cfg["steps_offset"] = int(rng.integers(2))
    if karras:
        kind = rng.integers(3)
        cfg["use_karras_sigmas"] = bool(kind == 1)
        cfg["use_exponential_sigmas"] = bool(kind == 2)
    return cfg


def random_output(rng):
    return rng.standard_normal(SHAPE).astype(np.float32)


def np_alphas_cumprod(cfg):
    """float64 ᾱ of a config, from the formulas (REFERENCE.md)."""
    T = cfg["num_train_timesteps"]
    name = cfg["beta_schedule"]
    if name == "linear":
        b = np.linspace(cfg["beta_start"], cfg["beta_end"], T, dtype=np.float64)
    elif name == "scaled_linear":
        b = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T, dtype=np.float64) ** 2
    else:
        i = np.arange(T, dtype=np.float64)

        def f(u):
            return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2

        b = np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)
    return np.cumprod(1 - b)


def diffusers_scheduler(cls, cfg, steps):
    """A diffusers scheduler with float64 ᾱ, as test_diffusers_parity does: its float32 tables
    put errors of up to 5e-4 into σ_t = √((1 - ᾱ_t)/ᾱ_t) near t = 0 (1 - ᾱ cancels), and
    from there into the whole Karras / exponential grid."""
    d = cls.from_config(cfg)
    d.alphas_cumprod = torch.from_numpy(np_alphas_cumprod(cfg))
    d.set_timesteps(steps)
    return d


def check_grid(ours, d, check_timesteps=True):
    np.testing.assert_allclose(np.asarray(ours.sigmas), d.sigmas.double().numpy(), rtol=2e-5)
    if check_timesteps:
        np.testing.assert_allclose(
            np.asarray(ours.timesteps), d.timesteps.double().numpy(), rtol=1e-5, atol=2e-3
        )


# --------------------------------------------------------------------------------------------
# Euler and Euler ancestral
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(16))
def test_euler_steps_match_diffusers(case):
    rng = np.random.default_rng(1000 + case)
    churn = case % 4 == 3
    # diffusers reads a v-prediction at σ but an ε one at the churned σ̂ (docs/differences.md):
    # churn is compared for ε and x0 models.
    cfg = random_config(
        rng, predictions=("epsilon", "sample") if churn else ("epsilon", "v_prediction", "sample")
    )
    cfg["final_sigmas_type"] = str(rng.choice(["zero", "sigma_min"]))
    steps = int(rng.integers(4, 12))
    d = diffusers_scheduler(EulerDiscreteScheduler, cfg, steps)
    ours = fd.Euler.from_diffusers_config(cfg, steps=steps)
    check_grid(ours, d)
    kw = {"s_churn": 4.0, "s_tmin": 0.5, "s_tmax": 50.0, "s_noise": 1.003} if churn else {}
    if churn:
        ours = fd.Euler.from_diffusers_config(cfg, steps=steps, **kw)
    x = (rng.standard_normal(SHAPE) * float(d.init_noise_sigma)).astype(np.float32)
    for i, t in enumerate(d.timesteps):
        out = random_output(rng)
        noise = torch_noise(i)
        ref = d.step(
            torch.from_numpy(out), t, torch.from_numpy(x), generator=torch.Generator().manual_seed(i), **kw
        )
        res = ours.step(out, i, x, noise=noise)
        what = f"{cfg} step {i}"
        assert_close(res.pred_x0, ref.pred_original_sample.numpy(), what + " pred_x0", x=x)
        assert_close(res.prev_sample, ref.prev_sample.numpy(), what + " prev_sample", x=x)
        x = ref.prev_sample.numpy()


@pytest.mark.parametrize("case", range(10))
def test_euler_ancestral_steps_match_diffusers(case):
    rng = np.random.default_rng(2000 + case)
    # diffusers' ancestral scheduler has no Karras option and no x0 ("sample") prediction
    cfg = random_config(rng, karras=False, predictions=("epsilon", "v_prediction"))
    steps = int(rng.integers(4, 12))
    d = diffusers_scheduler(EulerAncestralDiscreteScheduler, cfg, steps)
    ours = fd.EulerAncestral.from_diffusers_config(cfg, steps=steps)
    check_grid(ours, d)
    x = (rng.standard_normal(SHAPE) * float(d.init_noise_sigma)).astype(np.float32)
    for i, t in enumerate(d.timesteps):
        out = random_output(rng)
        noise = torch_noise(i)
        ref = d.step(
            torch.from_numpy(out), t, torch.from_numpy(x), generator=torch.Generator().manual_seed(i)
        )
        res = ours.step(out, i, x, noise=noise)
        what = f"{cfg} step {i}"
        assert_close(res.pred_x0, ref.pred_original_sample.numpy(), what + " pred_x0", x=x)
        assert_close(res.prev_sample, ref.prev_sample.numpy(), what + " prev_sample", x=x)
        x = ref.prev_sample.numpy()


# --------------------------------------------------------------------------------------------
# Heun
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(12))
def test_heun_steps_match_diffusers(case):
    rng = np.random.default_rng(3000 + case)
    cfg = random_config(rng)
    cfg["clip_sample"] = bool(case % 3 == 0)
    steps = int(rng.integers(3, 9))
    d = diffusers_scheduler(HeunDiscreteScheduler, cfg, steps)
    ours = fd.Heun.from_diffusers_config(cfg, steps=steps)
    check_grid_heun = np.asarray(ours.evaluation_sigmas)
    assert ours.num_evaluations == len(d.timesteps) == 2 * steps - 1
    np.testing.assert_allclose(np.asarray(ours.timesteps), d.timesteps.double().numpy(), rtol=1e-5, atol=2e-3)
    np.testing.assert_allclose(check_grid_heun, d.sigmas.double().numpy()[:-1], rtol=2e-5)
    state = ours.new_state()
    x = (rng.standard_normal(SHAPE) * float(d.init_noise_sigma)).astype(np.float32)
    for i, t in enumerate(d.timesteps):
        out = random_output(rng)
        ref = d.step(torch.from_numpy(out), t, torch.from_numpy(x))
        res = ours.step(out, i, x, state=state)
        what = f"{cfg} call {i}"
        assert_close(res.pred_x0, ref.pred_original_sample.numpy(), what + " pred_x0", x=x)
        assert_close(res.prev_sample, ref.prev_sample.numpy(), what + " prev_sample", x=x)
        x = ref.prev_sample.numpy()
    assert state.next == len(d.timesteps)


# --------------------------------------------------------------------------------------------
# DPM-Solver++ (multistep)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", range(24))
def test_dpm_solver_steps_match_diffusers(case):
    rng = np.random.default_rng(4000 + case)
    cfg = random_config(rng)
    cfg["algorithm_type"] = ["dpmsolver++", "sde-dpmsolver++"][case % 2]
    cfg["solver_order"] = 1 + (case // 2) % 3
    cfg["solver_type"] = str(rng.choice(["midpoint", "heun"]))
    cfg["lower_order_final"] = bool(rng.integers(2))
    cfg["euler_at_final"] = bool(rng.integers(2))
    cfg["final_sigmas_type"] = str(rng.choice(["zero", "sigma_min"]))
    steps = int(rng.choice([5, 8, 16, 20]))
    if cfg["final_sigmas_type"] == "sigma_min" and (
        cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]
    ):
        # the grid already ends at σ_min: a last step of length 0, NaN in diffusers (0/0),
        # the identity in ferrodiff (test_dpm_solver_zero_length_last_step_is_the_identity)
        cfg["final_sigmas_type"] = "zero"
    d = diffusers_scheduler(DPMSolverMultistepScheduler, cfg, steps)
    ours = fd.DPMSolver.from_diffusers_config(cfg, steps=steps)
    # diffusers truncates (int64 cast) the fractional timesteps of cosine/exponential grids
    # where ferrodiff rounds them (docs/differences.md); the σ levels agree in every case.
    exact_t = not (
        cfg.get("use_exponential_sigmas")
        or (cfg.get("use_karras_sigmas") and "squaredcos" in cfg["beta_schedule"])
    )
    check_grid(ours, d, check_timesteps=exact_t)
    sig = np.asarray(ours.sigmas)
    alpha = 1.0 / np.sqrt(sig**2 + 1.0)
    state = ours.new_state()
    x_vp = rng.standard_normal(SHAPE).astype(np.float32)
    for i, t in enumerate(d.timesteps):
        out = random_output(rng)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        ref = d.step(torch.from_numpy(out), t, torch.from_numpy(x_vp), variance_noise=torch.from_numpy(noise))
        x = (x_vp / alpha[i]).astype(np.float32)
        res = ours.step(out, i, x, state=state, noise=noise)
        prev_vp = (res.prev_sample.astype(np.float64) * alpha[i + 1]).astype(np.float32)
        assert_close(prev_vp, ref.prev_sample.numpy(), f"{cfg} step {i}", x=x_vp)
        x_vp = ref.prev_sample.numpy()


def test_dpm_solver_defaults_match_diffusers_defaults():
    cfg = dict(DPMSolverMultistepScheduler().config)
    d = diffusers_scheduler(DPMSolverMultistepScheduler, cfg, 10)
    ours = fd.DPMSolver.from_diffusers_config(dict(cfg), steps=10)
    check_grid(ours, d)
    assert ours.to_dict()["order"] == 2 and ours.to_dict()["algorithm"] == "dpmsolver++"


@pytest.mark.parametrize(
    "option",
    [
        {"use_lu_lambdas": True},
        {"thresholding": True},
        {"use_beta_sigmas": True},
        {"timestep_type": "continuous"},
    ],
)
def test_unsupported_diffusers_options_are_named(option):
    cfg = {"num_train_timesteps": 1000, **option}
    key = next(iter(option))
    with pytest.raises(ValueError, match=key):
        fd.DPMSolver.from_diffusers_config(cfg, steps=10)


def test_dpm_solver_zero_length_last_step_is_the_identity():
    cfg = {"num_train_timesteps": 1000, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}
    cfg.update(SCHEDULES[1])
    ours = fd.DPMSolver.from_diffusers_config(cfg, steps=5, order=3, lower_order_final=False)
    sig = np.asarray(ours.sigmas)
    assert sig[-1] == sig[-2]
    d = diffusers_scheduler(
        DPMSolverMultistepScheduler, dict(cfg, solver_order=3, lower_order_final=False), 5
    )
    rng = np.random.default_rng(0)
    state = ours.new_state()
    x = rng.standard_normal(SHAPE).astype(np.float32)
    for i, t in enumerate(d.timesteps):
        out = random_output(rng)
        ref = d.step(torch.from_numpy(out), t, torch.from_numpy(x * np.float32(1 / np.sqrt(sig[i] ** 2 + 1))))
        res = ours.step(out, i, x, state=state)
        if i == len(d.timesteps) - 1:
            assert not np.all(np.isfinite(ref.prev_sample.numpy()))  # diffusers: 0/0
            np.testing.assert_array_equal(res.prev_sample, x)
        x = res.prev_sample
