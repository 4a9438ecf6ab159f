"""The σ-space samplers through the Python API: hand loops, the one sampling loop's features
(guidance, editing, callbacks, models), configs and pickling, the mixture oracle, bad input."""

import pickle

import ferrodiff as fd
import numpy as np
import pytest

N = 1500


def make(kind, schedule, steps=8, **kw):
    return {
        "euler": lambda: fd.Euler(schedule, steps, **kw),
        "euler_churn": lambda: fd.Euler(schedule, steps, s_churn=2.0, **kw),
        "ancestral": lambda: fd.EulerAncestral(schedule, steps, **kw),
        "heun": lambda: fd.Heun(schedule, steps, **kw),
        "dpm2m": lambda: fd.DPMSolver(schedule, steps, **kw),
        "dpm3m_sde": lambda: fd.DPMSolver(schedule, steps, order=3, algorithm="sde-dpmsolver++", **kw),
    }[kind]()


KINDS = ["euler", "euler_churn", "ancestral", "heun", "dpm2m", "dpm3m_sde"]
# With churn, `.step` reads the model output at the churned level as diffusers does (the caller
# evaluated the model before the churn), while `.sample` evaluates the model on the churned x
# (Karras et al.): a hand loop reproduces `.sample` for every sampler without churn.
HAND_LOOP_KINDS = [k for k in KINDS if k != "euler_churn"]


def affine_eps(x, t):
    """A smooth ε-model whose output depends on x and t."""
    t = np.asarray(t, dtype=np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    return (0.3 * x * np.cos(t / 400.0) + 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def mixture():
    return fd.oracles.eight_gaussians(radius=2.0, std=0.15)


@pytest.mark.parametrize("kind", HAND_LOOP_KINDS)
def test_hand_loop_over_timesteps_reproduces_sample(linear, kind):
    s = make(kind, linear)
    shape = (3, 2, 4, 4)
    x = fd.randn(shape, seed=4) * np.float32(s.init_noise_sigma)
    state = s.new_state()
    for i, t in enumerate(s.timesteps):
        out = affine_eps(s.scale_model_input(x, i), np.full(shape[0], t))
        x = s.step(out, i, x, state=state, seed=4).prev_sample
    np.testing.assert_array_equal(x, s.sample(affine_eps, shape, seed=4))


def test_fractional_timesteps_reach_a_callable_as_float64_and_whole_ones_as_int64(linear):
    seen = []

    def record(x, t):
        seen.append(t.dtype)
        return np.zeros_like(x)

    fd.Euler(linear, 4).sample(record, (2, 3), seed=0)
    assert np.float64 in seen  # Karras levels fall between trained timesteps
    seen.clear()
    fd.Euler(linear, 4, timestep_mode="nearest").sample(record, (2, 3), seed=0)
    assert set(seen) == {np.dtype(np.int64)}


def test_edm_model_sees_c_in_x_and_c_noise():
    calls = []

    def net(x, t):
        calls.append((float(np.abs(x).max()), float(t[0])))
        return np.zeros_like(x)

    s = fd.Euler(None, 3, prediction="edm", sigma_min=0.002, sigma_max=80.0)
    x0 = np.ones((1, 2), np.float32) * 80.0
    out = s.sample(net, x_T=x0)
    sig = s.sigmas
    assert calls[0][1] == pytest.approx(np.log(80.0) / 4)  # c_noise = ln σ / 4
    assert calls[0][0] == pytest.approx(80.0 / np.sqrt(80.0**2 + 0.25), rel=1e-6)  # c_in x
    # F = 0: D = c_skip x, so each Euler step scales x by 1 + (σ'/σ - 1)(1 - c_skip(σ))
    x = 80.0
    for a, b in zip(sig[:-1], sig[1:]):
        c_skip = 0.25 / (a * a + 0.25)
        x = x + (b - a) / a * (x - c_skip * x)
    np.testing.assert_allclose(out, np.full((1, 2), x), rtol=1e-5)


@pytest.mark.parametrize("kind", ["dpm2m", "heun", "ancestral", "dpm3m_sde"])
def test_samplers_reproduce_the_mixture_through_the_python_api(mixture, kind):
    # linear: σ_max = 157 (the cosine schedule's σ_999 = 2e4 makes Heun's first step, which
    # averages slopes across four orders of magnitude of σ, useless; pass sigma_max there)
    s = fd.Schedule.linear(1000)
    steps = {"dpm2m": 20, "heun": 15, "ancestral": 60, "dpm3m_sde": 30}[kind]
    # levels on trained timesteps: the discrete oracle is then the exact denoiser
    sampler = make(kind, s, steps, sigmas="timesteps", timestep_mode="nearest")
    truth = [mixture.sample(N, seed=100 + i) for i in range(5)]
    floor = max(abs(fd.oracles.energy_distance(truth[0], t)) for t in truth[1:])
    x = sampler.sample(mixture.denoiser(s), (N, 2), seed=5)
    d = fd.oracles.energy_distance(x, mixture.sample(N, seed=98))
    assert d < 3 * floor + 1e-3, (d, floor)


def test_classifier_free_guidance_equals_the_guided_callable(linear):
    def model(x, t, y):
        return (0.2 * x + 0.05 * y.reshape(-1, 1)).astype(np.float32)

    labels = np.array([0, 1, 2])
    s = fd.DPMSolver(linear, 6)
    got = s.sample(model, (3, 2), seed=1, labels=labels, guidance_scale=3.0, null_label=9)

    def guided(x, t):
        c, u = model(x, t, labels), model(x, t, np.full(3, 9))
        return u + 3.0 * (c - u)

    np.testing.assert_allclose(got, s.sample(guided, (3, 2), seed=1), rtol=1e-5, atol=1e-6)


def test_classifier_guidance_at_scale_zero_is_unguided(linear):
    def grad(x, t, y):
        return np.ones_like(x)

    s = fd.Heun(linear, 5, timestep_mode="nearest")
    plain = s.sample(affine_eps, (2, 3), seed=2)
    off = s.sample(affine_eps, (2, 3), seed=2, labels=np.array([0, 1]), classifier=grad, classifier_scale=0.0)
    on = s.sample(affine_eps, (2, 3), seed=2, labels=np.array([0, 1]), classifier=grad, classifier_scale=2.0)
    np.testing.assert_array_equal(plain, off)
    assert not np.allclose(plain, on)


@pytest.mark.parametrize("kind", ["dpm3m_sde", "heun", "ancestral"])
def test_sdedit_runs_the_last_strength_fraction_from_the_noised_image(linear, kind):
    s = make(kind, linear, 10)
    image = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
    got = s.sample(affine_eps, image=image, strength=0.4, seed=3)
    # the last 4 of 10 steps, from image + σ_6 z with z = randn(shape, seed), with no history
    x = image + np.float32(s.sigmas[6]) * fd.randn(image.shape, seed=3)
    first = 6 if kind != "heun" else 2 * 6  # Heun calls the model twice per step
    state = s.new_state(first)
    for i in range(first, s.num_evaluations):
        out = affine_eps(s.scale_model_input(x, i), np.full(2, s.timesteps[i]))
        x = s.step(out, i, x, state=state, seed=3).prev_sample
    np.testing.assert_array_equal(got, x)
    # a small strength stays near the image; strength 1 forgets it
    weak = s.sample(affine_eps, image=image, strength=0.1, seed=3)
    strong = s.sample(affine_eps, image=image, strength=1.0, seed=3)
    assert np.abs(weak - image).mean() < np.abs(strong - image).mean()


def test_a_full_inpainting_mask_returns_the_image(linear):
    image = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    for s in (fd.Euler(linear, 6), fd.Heun(linear, 4), fd.DPMSolver(linear, 6, order=3)):
        out = s.sample(affine_eps, image=image, mask=np.ones_like(image), seed=0)
        np.testing.assert_allclose(out, image, atol=1e-6)


def test_callback_sees_every_step_and_its_exception_propagates(linear):
    seen = []
    s = fd.Heun(linear, 4)
    s.sample(affine_eps, (2, 2), seed=0, callback=lambda i, sigma, x, x0: seen.append((i, sigma)))
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    np.testing.assert_allclose([sg for _, sg in seen], s.sigmas[1:])

    def boom(i, sigma, x, x0):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        s.sample(affine_eps, (2, 2), seed=0, callback=boom)


def test_sampling_a_trained_model_runs_in_rust_with_labels_and_guidance(linear):
    model = fd.nn.MLP((2,), hidden=16, blocks=1, num_classes=3)
    s = fd.DPMSolver(linear, 5, timestep_mode="nearest")
    y = np.array([0, 1, 2, 0])
    x = s.sample(model, (4, 2), seed=0, labels=y, guidance_scale=2.0)
    assert x.shape == (4, 2) and np.all(np.isfinite(x))
    # the same model as a Python callable gives the same result
    ref = s.sample(
        lambda x, t, lab: model(x, t, lab),  # noqa: PLW0108 (a callable, not the Model: the Python path)
        (4, 2),
        seed=0,
        labels=y,
        guidance_scale=2.0,
        null_label=3,
    )
    np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-5)
    # fractional timesteps reach the network's sinusoidal embedding directly
    frac = fd.DPMSolver(linear, 5).sample(model, (4, 2), seed=0, labels=y)
    assert np.all(np.isfinite(frac)) and not np.array_equal(frac, s.sample(model, (4, 2), seed=0, labels=y))


@pytest.mark.parametrize("kind", KINDS)
def test_configs_round_trip_through_dict_and_pickle(linear, kind):
    s = make(kind, linear, sigmas="exponential", final_sigmas_type="sigma_min")
    for t in (
        pickle.loads(pickle.dumps(s)),
        fd.SigmaSampler.from_dict(s.to_dict()),
        type(s).from_dict(s.to_dict()),
    ):
        assert type(t) is type(s)
        np.testing.assert_array_equal(t.sigmas, s.sigmas)
        np.testing.assert_array_equal(
            t.sample(affine_eps, (2, 3), seed=1), s.sample(affine_eps, (2, 3), seed=1)
        )
    import json

    json.dumps(s.to_dict())


def test_grids_karras_exponential_explicit_and_final_sigma(linear):
    sig = np.asarray(linear.alphas_cumprod)
    sig = np.sqrt((1 - sig) / sig)
    # Karras levels from EDM's σ_max = 80 (below the schedule's 157) down to the schedule's σ_min
    k = fd.Euler(linear, 5)
    assert k.sigmas[0] == 80.0 and k.sigmas[-2] == pytest.approx(sig[0]) and k.sigmas[-1] == 0
    rho = 7.0
    ramp = np.linspace(0, 1, 5)
    ref = (80.0 ** (1 / rho) + ramp * (sig[0] ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    np.testing.assert_allclose(k.sigmas[:-1], ref, rtol=1e-12)
    full = fd.Euler(linear, 5, sigma_max="schedule")
    assert full.sigmas[0] == pytest.approx(sig[-1])
    e = fd.Euler(linear, 5, sigmas="exponential", sigma_max="schedule")
    np.testing.assert_allclose(np.diff(np.log(e.sigmas[:-1])), np.log(sig[0] / sig[-1]) / 4)
    assert fd.Euler(linear, 5, sigma_max=20.0).sigmas[0] == 20.0
    m = fd.Euler(linear, 5, final_sigmas_type="sigma_min")
    assert m.sigmas[-1] == pytest.approx(sig[0])
    ex = fd.Heun(None, sigmas=[10.0, 1.0, 0.1, 0.0], prediction="denoised")
    assert ex.steps == 3 and ex.num_evaluations == 5
    np.testing.assert_array_equal(ex.timesteps, [10.0, 1.0, 1.0, 0.1, 0.1])


def test_submodule_shim_exports_the_samplers():
    from ferrodiff.sample import DDIM, DPMSolver, Euler, Heun, SigmaSampler

    assert DDIM is fd.DDIM and DPMSolver is fd.DPMSolver and Euler is fd.Euler and Heun is fd.Heun
    assert issubclass(DPMSolver, SigmaSampler)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"prediction": "edm"}, "schedule=None"),
        ({"prediction": "noise"}, "prediction"),
        ({"sigmas": "cosine"}, "sigmas"),
        ({"sigmas": [1.0, 2.0, 0.0]}, "increase"),
        ({"sigmas": [2.0, 1.0, 0.0], "steps": 5}, "steps"),
        ({"final_sigmas_type": "one"}, "final_sigmas_type"),
        ({"timestep_mode": "round"}, "timestep_mode"),
        ({"spacing": "ddim10"}, "spacing"),
        ({"clip_sample": -1.0}, "clip_sample"),
        ({"steps": 0}, "steps"),
        ({"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min"),
        ({"sigma_max": "everything"}, "sigma_max"),
    ],
)
def test_bad_constructor_arguments_are_value_errors_naming_them(linear, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fd.Euler(linear, **kwargs)


def test_bad_solver_arguments_are_value_errors(linear):
    with pytest.raises(ValueError, match="order"):
        fd.DPMSolver(linear, order=4)
    with pytest.raises(ValueError, match="algorithm"):
        fd.DPMSolver(linear, algorithm="dpmsolver")
    with pytest.raises(ValueError, match="solver_type"):
        fd.DPMSolver(linear, solver_type="rk4")
    with pytest.raises(ValueError, match="s_churn"):
        fd.Euler(linear, s_churn=-1.0)
    with pytest.raises(ValueError, match="eta"):
        fd.EulerAncestral(linear, eta=float("nan"))
    with pytest.raises(ValueError, match="zero-terminal-SNR|ᾱ"):
        fd.Euler(fd.Schedule.scaled_linear(1000).rescale_zero_terminal_snr())


def test_bad_step_and_sample_arguments(linear):
    s = fd.DPMSolver(linear, 4)
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="state"):
        s.step(x, 1, x, state=s.new_state())
    with pytest.raises(ValueError, match="noise= or seed="):
        s.step(x, 0, x, noise=x, seed=1)
    with pytest.raises(ValueError, match="noise has shape"):
        s.step(x, 0, x, noise=np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="past"):
        s.step(x, 9, x)
    with pytest.raises(ValueError, match="model_output has shape"):
        s.step(np.zeros((2, 5), np.float32), 0, x)
    with pytest.raises(FloatingPointError, match="σ"):
        s.step(np.full_like(x, np.nan), 0, x)
    with pytest.raises(FloatingPointError):
        s.sample(lambda x, t: np.full_like(x, np.inf), (2, 3))
    with pytest.raises(ValueError, match="shape must have non-negative sizes"):
        s.sample(affine_eps, (-1, 3))
    with pytest.raises(ValueError, match="shape must have non-negative sizes"):
        fd.DDIM(linear, 5).sample(affine_eps, (2, -3))
    with pytest.raises(ValueError, match="shape must have non-negative sizes"):
        fd.randn((-2, 3), seed=0)
    with pytest.raises(TypeError):
        s.sample(42, (2, 3))
    # a callable that takes whole timesteps only says so itself when given fractional ones
    with pytest.raises(TypeError, match="integer timesteps"):
        fd.Euler(linear, 4).sample(fd.oracles.eight_gaussians().denoiser(linear), (2, 2))


def test_dpm_adaptive_reports_its_evaluations_and_tighter_tolerances_cost_more(mixture):
    s = fd.Schedule.linear(1000)
    truth = [mixture.sample(N, seed=100 + i) for i in range(5)]
    floor = max(abs(fd.oracles.energy_distance(truth[0], t)) for t in truth[1:])
    den = mixture.denoiser(s)
    loose = fd.DPMAdaptive(s, timestep_mode="nearest")
    tight = fd.DPMAdaptive(s, timestep_mode="nearest", rtol=0.005, atol=0.0008)
    x1, i1 = loose.sample(den, (N, 2), seed=5, return_info=True)
    x2, i2 = tight.sample(den, (N, 2), seed=5, return_info=True)
    assert i1["nfe"] == 3 * (i1["accepted"] + i1["rejected"]) + 1
    assert i2["nfe"] > i1["nfe"] > 0
    for x in (x1, x2):
        assert fd.oracles.energy_distance(x, mixture.sample(N, seed=98)) < 3 * floor + 1e-3
    assert isinstance(loose.sample(den, (4, 2), seed=5), np.ndarray)


def test_dpm_adaptive_config_pickles_and_rejects_editing(linear):
    a = fd.DPMAdaptive(linear, order=2, rtol=0.01)
    b = pickle.loads(pickle.dumps(a))
    assert b.to_dict() == a.to_dict() and b.sigma_max == a.sigma_max
    np.testing.assert_array_equal(a.sample(affine_eps, (2, 3), seed=1), b.sample(affine_eps, (2, 3), seed=1))
    with pytest.raises(ValueError, match="image="):
        a.sample(affine_eps, image=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="order"):
        fd.DPMAdaptive(linear, order=4)
    with pytest.raises(ValueError, match="rtol"):
        fd.DPMAdaptive(linear, rtol=0.0, atol=0.0)
    with pytest.raises(ValueError, match="schedule"):
        fd.DPMAdaptive(None)


def test_a_model_called_from_python_takes_fractional_timesteps(linear):
    model = fd.nn.MLP((2,), hidden=16, blocks=1)
    x = np.ones((3, 2), np.float32)
    whole = model(x, np.array([10, 10, 10]))
    np.testing.assert_array_equal(model(x, np.array([10.0, 10.0, 10.0])), whole)
    between = model(x, np.array([10.5, 10.5, 10.5]))
    assert not np.array_equal(between, whole)
    s = fd.DPMSolver(linear, 6)  # interpolated t: the Rust path and the Python callable agree
    np.testing.assert_allclose(
        s.sample(model, (3, 2), seed=0),
        s.sample(lambda x, t: model(x, t), (3, 2), seed=0),  # noqa: PLW0108 (the Python path)
        rtol=1e-5,
        atol=1e-6,
    )
