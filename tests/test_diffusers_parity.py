"""Agreement of ferrodiff's DDPM / DDIM with diffusers' DDPMScheduler / DDIMScheduler.

Both libraries are fed the SAME model outputs and the SAME noise:
  * DDIM: the noise array is passed as ``noise=`` to ferrodiff and as ``variance_noise=`` to diffusers;
  * DDPM: diffusers 0.42.1's ``DDPMScheduler.step`` has no ``variance_noise`` argument; it draws
    ``randn_tensor(model_output.shape, generator=generator, dtype=model_output.dtype)``. We draw that
    exact tensor ourselves from ``torch.Generator().manual_seed(k)``, hand it to ferrodiff as
    ``noise=`` and call diffusers with a fresh generator seeded with the same ``k``.

ferrodiff computes its schedules in float64, diffusers in float32, so arrays are compared with
``rtol=1e-4`` and an absolute tolerance of ``1e-5`` scaled by the magnitude of the reference array
(float32 rounding is relative to the operands: an x0 prediction of magnitude 1e3 carries errors of
~1e-4 in every element, including the ones close to zero).

The documented deliberate differences (DDIM previous timestep taken from the list, no noise at the
last DDPM step, diffusers #10003, zero-terminal-SNR guard) are tested against numpy formulas.
"""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
import ferrodiff as fd
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

SHAPE = (2, 3, 8, 8)
RTOL = 1e-4
ATOL = 1e-5

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

SCHEDULES = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "sigmoid": {"beta_schedule": "sigmoid", "beta_start": 1e-4, "beta_end": 0.02},
    # zero terminal SNR is only usable with v-prediction in diffusers (epsilon divides by 0)
    "zero_snr": {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "rescale_betas_zero_snr": True,
    },
}
STANDARD_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]


def make_cfg(schedule="linear", **kw):
    cfg = {"num_train_timesteps": 1000, "clip_sample": False}
    cfg.update(SCHEDULES[schedule])
    cfg.update(kw)
    return cfg


def np_betas(cfg):
    """float64 betas of a diffusers config, straight from the formulas (REFERENCE.md)."""
    T = cfg["num_train_timesteps"]
    name = cfg.get("beta_schedule", "linear")
    b0, b1 = cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02)
    if name == "linear":
        b = np.linspace(b0, b1, T, dtype=np.float64)
    elif name == "scaled_linear":
        b = np.linspace(b0**0.5, b1**0.5, T, dtype=np.float64) ** 2
    elif name == "squaredcos_cap_v2":

        def f(u):
            return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2

        i = np.arange(T, dtype=np.float64)
        b = np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)
    elif name == "sigmoid":
        b = 1 / (1 + np.exp(-np.linspace(-6, 6, T, dtype=np.float64))) * (b1 - b0) + b0
    else:  # pragma: no cover - test bug
        raise AssertionError(name)
    if cfg.get("rescale_betas_zero_snr"):
        # Lin et al. 2023, Algorithm 1
        sq = np.sqrt(np.cumprod(1 - b))
        s0, sT = sq[0], sq[-1]
        ac = ((sq - sT) * s0 / (s0 - sT)) ** 2
        b = 1 - np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return b


def with_f64_tables(d, cfg):
    """Give a diffusers scheduler float64 tables computed by numpy.

    diffusers' float32 tables carry cancellation errors of up to ~1e-3 relative in the strided
    betas 1 - a_t/a_prev at small t (and in 1 - a_t where a_t is close to 1); with float64 tables
    its step() code is compared as an algorithm, at rtol 1e-4. The float32 tables themselves are
    compared in test_schedule_tables_match_diffusers and the stock schedulers in the full loops.
    """
    b = np_betas(cfg)
    d.betas = torch.from_numpy(b)
    d.alphas = torch.from_numpy(1 - b)
    d.alphas_cumprod = torch.from_numpy(np.cumprod(1 - b))
    if isinstance(d, DDIMScheduler):
        if cfg.get("set_alpha_to_one", True):
            d.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
        else:
            d.final_alpha_cumprod = d.alphas_cumprod[0]
    return d


def diffusers_ddpm(cfg, steps=None, f64=True):
    d = DDPMScheduler.from_config(cfg)
    if steps is not None:
        d.set_timesteps(steps)
    return with_f64_tables(d, cfg) if f64 else d


def diffusers_ddim(cfg, steps, f64=True):
    cfg = dict(cfg)
    if cfg.get("beta_schedule") == "sigmoid" and cfg.get("trained_betas") is None:
        # diffusers' DDIMScheduler does not implement "sigmoid" (NotImplementedError); give it the
        # betas its DDPMScheduler computes for the same config instead.
        cfg["trained_betas"] = DDPMScheduler.from_config(cfg).betas.numpy().tolist()
        d = DDIMScheduler.from_config(dict(cfg, beta_schedule="linear"))
        del cfg["trained_betas"]
    else:
        d = DDIMScheduler.from_config(cfg)
    d.set_timesteps(steps)
    return with_f64_tables(d, cfg) if f64 else d


def plain_schedule(cfg):
    """The ferrodiff schedule for a diffusers config, built with the plain constructors."""
    T = cfg["num_train_timesteps"]
    name = cfg["beta_schedule"]
    if name == "linear":
        s = fd.Schedule.linear(T, cfg["beta_start"], cfg["beta_end"])
    elif name == "scaled_linear":
        s = fd.Schedule.scaled_linear(T, cfg["beta_start"], cfg["beta_end"])
    elif name == "squaredcos_cap_v2":
        s = fd.Schedule.cosine(T)
    elif name == "sigmoid":
        s = fd.Schedule.sigmoid(T, cfg["beta_start"], cfg["beta_end"])
    else:  # pragma: no cover - test bug
        raise AssertionError(name)
    if cfg.get("rescale_betas_zero_snr"):
        s = s.rescale_zero_terminal_snr()
    return s


def plain_kwargs(cfg):
    kw = {
        "spacing": cfg.get("timestep_spacing", "leading"),
        "steps_offset": cfg.get("steps_offset", 0),
        "prediction": cfg.get("prediction_type", "epsilon"),
    }
    if cfg.get("thresholding"):
        kw["threshold"] = fd.DynamicThreshold(
            cfg.get("dynamic_thresholding_ratio", 0.995), max_value=cfg.get("sample_max_value", 1.0)
        )
        kw["clip_sample"] = None
    elif cfg.get("clip_sample", True):
        kw["clip_sample"] = cfg.get("clip_sample_range", 1.0)
    else:
        kw["clip_sample"] = None
    return kw


def plain_ddpm(cfg, steps=None):
    return fd.DDPM(
        plain_schedule(cfg),
        steps=steps,
        variance=cfg.get("variance_type", "fixed_small"),
        **plain_kwargs(cfg),
    )


def plain_ddim(cfg, steps, eta=0.0, use_clipped_model_output=False):
    return fd.DDIM(
        plain_schedule(cfg),
        steps=steps,
        eta=eta,
        set_alpha_to_one=cfg.get("set_alpha_to_one", True),
        use_clipped_model_output=use_clipped_model_output,
        **plain_kwargs(cfg),
    )


def assert_close(ours, ref, rtol=RTOL, atol=ATOL, what=""):
    ours = np.asarray(ours)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    assert ours.dtype == np.float32, f"{what}: dtype {ours.dtype}"
    assert np.all(np.isfinite(ours)), f"{what}: non-finite values"
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol * scale, err_msg=what)


def torch_noise(shape, k):
    """The tensor diffusers' DDPMScheduler.step draws from Generator().manual_seed(k)."""
    return randn_tensor(tuple(shape), generator=torch.Generator().manual_seed(k), dtype=torch.float32)


def ddpm_diffusers_step(d, model_output, t, x, k):
    noise = torch_noise(x.shape, k)
    res = d.step(
        torch.from_numpy(model_output),
        int(t),
        torch.from_numpy(x),
        generator=torch.Generator().manual_seed(k),
    )
    return res.prev_sample.numpy(), res.pred_original_sample.numpy(), noise.numpy()


def ddim_diffusers_step(d, model_output, t, x, eta, noise, use_clipped_model_output=False):
    res = d.step(
        torch.from_numpy(model_output),
        int(t),
        torch.from_numpy(x),
        eta=eta,
        use_clipped_model_output=use_clipped_model_output,
        variance_noise=torch.from_numpy(noise) if eta > 0 else None,
    )
    return res.prev_sample.numpy(), res.pred_original_sample.numpy()


def random_model_output(rng, prediction, shape=SHAPE):
    out = rng.standard_normal(shape)
    if prediction == "sample":
        out = 1.5 * out  # so that clipping to [-1, 1] bites
    return out.astype(np.float32)


def dummy_model_np(x, t):
    """diffusers' scheduler-test dummy model: x * t / (t + 1)."""
    t = np.asarray(t, dtype=np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    return (x * (t / (t + 1.0))).astype(np.float32)


def dummy_model_torch(x, t):
    return x * t / (t + 1)


def fixture_sample():
    """diffusers' dummy_sample_deter: arange(768).reshape(3,8,8,4)/768 permuted to (4,3,8,8)."""
    s = np.arange(768, dtype=np.float64).reshape(3, 8, 8, 4) / 768
    return np.ascontiguousarray(np.transpose(s, (3, 0, 1, 2))).astype(np.float32)


def linear_alphas_cumprod_np(T=1000, b0=1e-4, b1=0.02):
    return np.cumprod(1.0 - np.linspace(b0, b1, T, dtype=np.float64))


def ddim_step_np(ac, t, prev, x, eps, eta=0.0, z=None, final_alpha=1.0):
    """The DDIM update (paper eq. 12) in float64 with an explicit previous timestep."""
    x = x.astype(np.float64)
    eps = eps.astype(np.float64)
    a_t = ac[t]
    a_p = ac[prev] if prev >= 0 else final_alpha
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
    out = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma**2) * eps
    if eta > 0:
        out = out + sigma * z.astype(np.float64)
    return out, x0


def row_timesteps(sampler, idx):
    ts = np.asarray(sampler.timesteps)
    return [int(ts[i]) for i in idx]


# --------------------------------------------------------------------------------------------
# schedules and timestep lists
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedule_tables_match_diffusers(schedule):
    cfg = make_cfg(schedule)
    d = DDPMScheduler.from_config(cfg)
    s = fd.Schedule.from_diffusers_config(cfg)
    assert s.num_train_timesteps == 1000 and len(s) == 1000
    ac = np.asarray(s.alphas_cumprod)
    assert ac.dtype == np.float64
    ref = d.alphas_cumprod.double().numpy()
    if schedule == "zero_snr":
        # float32 rescaling in diffusers loses ~4e-5 relative accuracy on the last tiny values
        np.testing.assert_allclose(ac, ref, rtol=1e-4, atol=1e-9)
        assert ac[-1] == pytest.approx(0.0, abs=1e-12)
    else:
        np.testing.assert_allclose(ac, ref, rtol=5e-6, atol=1e-12)
    # diffusers' zero-SNR betas are 1 - ratio of float32 cumprods (~2e-4 relative noise)
    beta_rtol = 1e-3 if schedule == "zero_snr" else 1e-5
    np.testing.assert_allclose(np.asarray(s.betas), d.betas.double().numpy(), rtol=beta_rtol, atol=1e-9)
    # the plain constructors give the very same tables
    assert plain_schedule(cfg) == s
    np.testing.assert_array_equal(np.asarray(plain_schedule(cfg).alphas_cumprod), ac)


@pytest.mark.parametrize(
    "spacing,steps,offset",
    [
        ("leading", 10, 0),
        ("leading", 50, 1),
        ("leading", 7, 0),
        ("leading", 3, 1),
        ("leading", 500, 1),
        ("trailing", 10, 0),
        ("trailing", 16, 0),
        ("trailing", 7, 0),
        ("trailing", 1000, 0),
        ("linspace", 10, 0),
        ("linspace", 16, 0),
        ("linspace", 999, 0),
    ],
)
def test_timesteps_match_diffusers(spacing, steps, offset):
    cfg = make_cfg("linear", timestep_spacing=spacing, steps_offset=offset)
    ref = diffusers_ddim(cfg, steps).timesteps.numpy()
    ours = np.asarray(fd.timesteps(1000, steps, spacing, steps_offset=offset))
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(np.asarray(fd.DDIM.from_diffusers_config(cfg, steps=steps).timesteps), ref)
    np.testing.assert_array_equal(np.asarray(fd.DDPM.from_diffusers_config(cfg, steps=steps).timesteps), ref)
    ref_ddpm = diffusers_ddpm(cfg, steps).timesteps.numpy()
    np.testing.assert_array_equal(ours, ref_ddpm)


def test_trailing_16_rounds_half_to_even():
    # REFERENCE.md: 812.5 - 1 rounds to 811 with numpy's round-half-to-even
    ts = np.asarray(fd.timesteps(1000, 16, "trailing"))
    assert 811 in ts and 812 not in ts


# --------------------------------------------------------------------------------------------
# DDPM single steps
# --------------------------------------------------------------------------------------------

DDPM_STEP_IDX = [0, 1, 24, 48, 49]  # 50 leading steps: t = 980, 960, 500, 20, 0


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", STANDARD_SCHEDULES)
def test_ddpm_single_step_matches_diffusers(schedule, prediction, variance, clip):
    cfg = make_cfg(schedule, prediction_type=prediction, variance_type=variance, clip_sample=clip)
    d = diffusers_ddpm(cfg, 50)
    ours_cfg = fd.DDPM.from_diffusers_config(cfg, steps=50)
    ours_plain = plain_ddpm(cfg, steps=50)
    np.testing.assert_array_equal(np.asarray(ours_cfg.timesteps), d.timesteps.numpy())
    rng = np.random.default_rng(1234)
    for k, t in enumerate(row_timesteps(ours_cfg, DDPM_STEP_IDX)):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        out = random_model_output(rng, prediction)
        if variance == "learned_range":
            v = rng.uniform(-1, 1, SHAPE).astype(np.float32)
            out = np.concatenate([out, v], axis=1)  # [mean | v], 2C channels
        ref_prev, ref_x0, noise = ddpm_diffusers_step(d, out, t, x, k)
        for name, ours in (("config", ours_cfg), ("plain", ours_plain)):
            res = ours.step(out, t, x, noise=noise)
            what = f"{name} t={t}"
            assert_close(res.pred_x0, ref_x0, what=what + " pred_x0")
            assert_close(res.prev_sample, ref_prev, what=what + " prev_sample")


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_all_1000_steps_single_step_matches_diffusers(variance):
    # steps=None: every training timestep, diffusers without set_timesteps (prev = t - 1)
    cfg = make_cfg("linear", variance_type=variance, clip_sample=True)
    d = diffusers_ddpm(cfg, None)
    ours = fd.DDPM.from_diffusers_config(cfg)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), np.arange(999, -1, -1))
    rng = np.random.default_rng(7)
    for k, t in enumerate([999, 998, 500, 2, 1, 0]):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        out = rng.standard_normal(SHAPE).astype(np.float32)
        if variance == "learned_range":
            out = np.concatenate([out, rng.uniform(-1, 1, SHAPE).astype(np.float32)], axis=1)
        ref_prev, ref_x0, noise = ddpm_diffusers_step(d, out, t, x, k)
        res = ours.step(out, t, x, noise=noise)
        assert_close(res.pred_x0, ref_x0, what=f"t={t} pred_x0")
        assert_close(res.prev_sample, ref_prev, what=f"t={t} prev_sample")


@pytest.mark.parametrize("steps", [10, 50])
def test_ddpm_zero_snr_v_prediction_trailing_matches_diffusers(steps):
    cfg = make_cfg(
        "zero_snr", prediction_type="v_prediction", timestep_spacing="trailing", variance_type="fixed_small"
    )
    d = diffusers_ddpm(cfg, steps)
    ours = fd.DDPM.from_diffusers_config(cfg, steps=steps)
    plain = plain_ddpm(cfg, steps=steps)
    rng = np.random.default_rng(3)
    for k, t in enumerate(row_timesteps(ours, [0, 1, steps // 2, steps - 2])):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        out = rng.standard_normal(SHAPE).astype(np.float32)
        ref_prev, ref_x0, noise = ddpm_diffusers_step(d, out, t, x, k)
        for s in (ours, plain):
            res = s.step(out, t, x, noise=noise)
            assert_close(res.pred_x0, ref_x0, what=f"t={t} pred_x0")
            assert_close(res.prev_sample, ref_prev, what=f"t={t} prev_sample")


# --------------------------------------------------------------------------------------------
# DDIM single steps
# --------------------------------------------------------------------------------------------

DDIM_STEP_IDX = [0, 1, 10, 18, 19]  # 20 leading steps: t = 950, 900, 450, 50, 0


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", STANDARD_SCHEDULES)
def test_ddim_single_step_matches_diffusers(schedule, prediction, eta, clip):
    cfg = make_cfg(schedule, prediction_type=prediction, clip_sample=clip)
    d = diffusers_ddim(cfg, 20)
    ours_cfg = fd.DDIM.from_diffusers_config(cfg, steps=20, eta=eta)
    ours_plain = plain_ddim(cfg, 20, eta=eta)
    np.testing.assert_array_equal(np.asarray(ours_cfg.timesteps), d.timesteps.numpy())
    rng = np.random.default_rng(99)
    for t in row_timesteps(ours_cfg, DDIM_STEP_IDX):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        out = random_model_output(rng, prediction)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        ref_prev, ref_x0 = ddim_diffusers_step(d, out, t, x, eta, noise)
        for name, ours in (("config", ours_cfg), ("plain", ours_plain)):
            res = ours.step(out, t, x, noise=noise)
            what = f"{name} t={t}"
            assert_close(res.pred_x0, ref_x0, what=what + " pred_x0")
            assert_close(res.prev_sample, ref_prev, what=what + " prev_sample")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_zero_snr_v_prediction_trailing_matches_diffusers(eta):
    # trailing with T % N == 0 is a case where diffusers' t - T//N is the list's next entry
    cfg = make_cfg("zero_snr", prediction_type="v_prediction", timestep_spacing="trailing")
    d = diffusers_ddim(cfg, 10)
    ours = fd.DDIM.from_diffusers_config(cfg, steps=10, eta=eta)
    plain = plain_ddim(cfg, 10, eta=eta)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), d.timesteps.numpy())
    assert int(ours.timesteps[0]) == 999  # the zero-SNR timestep itself is visited
    rng = np.random.default_rng(5)
    for t in row_timesteps(ours, range(10)):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        out = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        ref_prev, ref_x0 = ddim_diffusers_step(d, out, t, x, eta, noise)
        for s in (ours, plain):
            res = s.step(out, t, x, noise=noise)
            assert_close(res.pred_x0, ref_x0, what=f"t={t} pred_x0")
            assert_close(res.prev_sample, ref_prev, what=f"t={t} prev_sample")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_use_clipped_model_output_matches_diffusers(eta):
    cfg = make_cfg("linear", clip_sample=True)
    d = diffusers_ddim(cfg, 20)
    ours = fd.DDIM.from_diffusers_config(cfg, steps=20, eta=eta, use_clipped_model_output=True)
    plain = plain_ddim(cfg, 20, eta=eta, use_clipped_model_output=True)
    unclipped = fd.DDIM.from_diffusers_config(cfg, steps=20, eta=eta)
    rng = np.random.default_rng(11)
    for t in row_timesteps(ours, [0, 5, 15]):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        out = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        ref_prev, ref_x0 = ddim_diffusers_step(d, out, t, x, eta, noise, use_clipped_model_output=True)
        for s in (ours, plain):
            res = s.step(out, t, x, noise=noise)
            assert_close(res.pred_x0, ref_x0, what=f"t={t} pred_x0")
            assert_close(res.prev_sample, ref_prev, what=f"t={t} prev_sample")
        # at these timesteps clipping bites, so the flag must change the result
        plain_res = unclipped.step(out, t, x, noise=noise)
        assert not np.allclose(plain_res.prev_sample, ref_prev, rtol=RTOL, atol=1e-3)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_set_alpha_to_one_last_step_matches_diffusers(set_alpha_to_one):
    cfg = make_cfg("linear", beta_start=0.01, set_alpha_to_one=set_alpha_to_one)
    d = diffusers_ddim(cfg, 10)
    ours = fd.DDIM.from_diffusers_config(cfg, steps=10)
    plain = plain_ddim(cfg, 10)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    out = rng.standard_normal(SHAPE).astype(np.float32)
    assert int(ours.timesteps[-1]) == 0
    ref_prev, ref_x0 = ddim_diffusers_step(d, out, 0, x, 0.0, None)
    for s in (ours, plain):
        res = s.step(out, 0, x)
        assert_close(res.prev_sample, ref_prev)
        assert_close(res.pred_x0, ref_x0)
    # numpy: with set_alpha_to_one the last step returns x0 itself, without it uses alphas_cumprod[0]
    ac = linear_alphas_cumprod_np(1000, 0.01, 0.02)
    final = 1.0 if set_alpha_to_one else ac[0]
    ref_np, _ = ddim_step_np(ac, 0, -1, x, out, final_alpha=final)
    assert_close(ours.step(out, 0, x).prev_sample, ref_np)


def test_ddim_accepts_2c_output_and_uses_first_half():
    cfg = make_cfg("linear")
    d = diffusers_ddim(cfg, 20)
    ours = fd.DDIM.from_diffusers_config(cfg, steps=20)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    out = rng.standard_normal(SHAPE).astype(np.float32)
    var = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    ref_prev, ref_x0 = ddim_diffusers_step(d, out, 500, x, 0.0, None)
    res = ours.step(np.concatenate([out, var], axis=1), 500, x)
    assert_close(res.prev_sample, ref_prev)
    assert_close(res.pred_x0, ref_x0)


# --------------------------------------------------------------------------------------------
# clipping range and dynamic thresholding
# --------------------------------------------------------------------------------------------


def _threshold_inputs(rng):
    # three rows whose |x0| 0.9-quantiles are < 1, between 1 and 3, and > 3 (clamped to max_value)
    base = rng.standard_normal((3, 3, 8, 8))
    scales = np.array([0.4, 1.6, 10.0]).reshape(3, 1, 1, 1)
    return (base * scales).astype(np.float32), rng.standard_normal((3, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction", ["sample", "epsilon"])
def test_dynamic_thresholding_matches_diffusers(sampler, prediction):
    cfg = make_cfg(
        "linear",
        prediction_type=prediction,
        thresholding=True,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=3.0,
        clip_sample=False,
    )
    rng = np.random.default_rng(17)
    t = 500
    out, x = _threshold_inputs(rng)
    if prediction == "epsilon":
        # x_t = q_sample(x0_target, eps), so the predicted x0 has the per-row spread we want
        x0_target = out
        ac = linear_alphas_cumprod_np()
        eps = rng.standard_normal(out.shape)
        x = (math.sqrt(ac[t]) * x0_target + math.sqrt(1 - ac[t]) * eps).astype(np.float32)
        out = eps.astype(np.float32)
    if sampler == "ddpm":
        d = diffusers_ddpm(cfg, 50)
        ref_prev, ref_x0, noise = ddpm_diffusers_step(d, out, t, x, 0)
        ours = [fd.DDPM.from_diffusers_config(cfg, steps=50), plain_ddpm(cfg, 50)]
    else:
        d = diffusers_ddim(cfg, 50)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        ref_prev, ref_x0 = ddim_diffusers_step(d, out, t, x, 1.0, noise)
        ours = [fd.DDIM.from_diffusers_config(cfg, steps=50, eta=1.0), plain_ddim(cfg, 50, eta=1.0)]
    # the three rows really exercise the three regimes of the threshold
    assert np.abs(ref_x0[0]).max() <= 1.0 + 1e-6
    assert 1.0 - 1e-6 <= np.abs(ref_x0[1]).max() <= 1.0 + 1e-6
    for s in ours:
        res = s.step(out, t, x, noise=noise)
        assert_close(res.pred_x0, ref_x0, what="pred_x0")
        assert_close(res.prev_sample, ref_prev, what="prev_sample")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_config_with_thresholding_and_clip_sample_behaves_like_diffusers(sampler):
    # diffusers' default clip_sample=True is ignored when thresholding=True (thresholding wins);
    # a config saved that way must load and behave the same in ferrodiff.
    cfg = make_cfg(
        "linear",
        prediction_type="sample",
        thresholding=True,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=3.0,
        clip_sample=True,
    )
    rng = np.random.default_rng(21)
    out, x = _threshold_inputs(rng)
    if sampler == "ddpm":
        d = diffusers_ddpm(cfg, 50)
        ref_prev, ref_x0, noise = ddpm_diffusers_step(d, out, 500, x, 0)
        ours = fd.DDPM.from_diffusers_config(cfg, steps=50)
    else:
        d = diffusers_ddim(cfg, 50)
        noise = None
        ref_prev, ref_x0 = ddim_diffusers_step(d, out, 500, x, 0.0, None)
        ours = fd.DDIM.from_diffusers_config(cfg, steps=50)
    res = ours.step(out, 500, x, noise=noise)
    assert_close(res.pred_x0, ref_x0)
    assert_close(res.prev_sample, ref_prev)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clip_sample_range_matches_diffusers(sampler):
    cfg = make_cfg("linear", prediction_type="sample", clip_sample=True, clip_sample_range=2.5)
    rng = np.random.default_rng(8)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    out = (3 * rng.standard_normal(SHAPE)).astype(np.float32)
    if sampler == "ddpm":
        d = diffusers_ddpm(cfg, 50)
        ref_prev, ref_x0, noise = ddpm_diffusers_step(d, out, 300, x, 0)
        ours = [fd.DDPM.from_diffusers_config(cfg, steps=50), plain_ddpm(cfg, 50)]
    else:
        d = diffusers_ddim(cfg, 50)
        noise = None
        ref_prev, ref_x0 = ddim_diffusers_step(d, out, 300, x, 0.0, None)
        ours = [fd.DDIM.from_diffusers_config(cfg, steps=50), plain_ddim(cfg, 50)]
    assert np.abs(ref_x0).max() == pytest.approx(2.5)
    for s in ours:
        res = s.step(out, 300, x, noise=noise)
        assert_close(res.pred_x0, ref_x0)
        assert_close(res.prev_sample, ref_prev)


# --------------------------------------------------------------------------------------------
# per-row timesteps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_per_row_timesteps_match_diffusers_row_by_row(sampler):
    cfg = make_cfg("linear", clip_sample=True)
    rng = np.random.default_rng(31)
    shape = (3, 3, 8, 8)
    x = rng.standard_normal(shape).astype(np.float32)
    out = rng.standard_normal(shape).astype(np.float32)
    ts = np.array([980, 500, 0], dtype=np.int64)
    if sampler == "ddpm":
        d = diffusers_ddpm(cfg, 50)
        ours = fd.DDPM.from_diffusers_config(cfg, steps=50)
        refs = [ddpm_diffusers_step(d, out[i : i + 1], ts[i], x[i : i + 1], i) for i in range(3)]
        noise = np.concatenate([r[2] for r in refs])
    else:
        d = diffusers_ddim(cfg, 50)
        ours = fd.DDIM.from_diffusers_config(cfg, steps=50, eta=1.0)
        noise = rng.standard_normal(shape).astype(np.float32)
        refs = [
            ddim_diffusers_step(d, out[i : i + 1], ts[i], x[i : i + 1], 1.0, noise[i : i + 1])
            for i in range(3)
        ]
    res = ours.step(out, ts, x, noise=noise)
    assert_close(res.prev_sample, np.concatenate([r[0] for r in refs]))
    assert_close(res.pred_x0, np.concatenate([r[1] for r in refs]))


# --------------------------------------------------------------------------------------------
# full loops with the deterministic dummy model
# --------------------------------------------------------------------------------------------


def diffusers_ddim_loop(d, x, eta, noises):
    xt = torch.from_numpy(x.copy())
    for i, t in enumerate(d.timesteps):
        out = dummy_model_torch(xt, t)
        vn = torch.from_numpy(noises[i]) if eta > 0 else None
        xt = d.step(out, t, xt, eta=eta, variance_noise=vn).prev_sample
    return xt.numpy()


def numpy_ddim_v_clip_loop(ac, timesteps, x, eta, noises):
    """DDIM (paper eq. 12) for a v-prediction dummy model with x0 clipped to [-1, 1] and ε from
    the unclipped output (diffusers' defaults), in float64 with the list's previous timestep."""
    x = x.astype(np.float64)
    ts = [int(t) for t in timesteps]
    for i, t in enumerate(ts):
        v = x * (t / (t + 1.0))
        a_t = ac[t]
        a_p = ac[ts[i + 1]] if i + 1 < len(ts) else 1.0
        x0 = np.clip(math.sqrt(a_t) * x - math.sqrt(1 - a_t) * v, -1, 1)
        eps = math.sqrt(a_t) * v + math.sqrt(1 - a_t) * x
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        x = math.sqrt(a_p) * x0 + math.sqrt(max(0.0, 1 - a_p - sigma**2)) * eps + sigma * noises[i]
    return x


def ours_loop(sampler, x, noises):
    for i, t in enumerate(np.asarray(sampler.timesteps)):
        tb = np.full(x.shape[0], t, dtype=np.int64)
        x = sampler.step(dummy_model_np(x, tb), int(t), x, noise=noises[i]).prev_sample
    return x


LOOP_CASES = [(s, p) for s in STANDARD_SCHEDULES for p in PREDICTIONS] + [("zero_snr", "v_prediction")]


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("schedule,prediction", LOOP_CASES)
def test_ddim_full_loop_matches_diffusers(schedule, prediction, eta):
    spacing = "trailing" if schedule == "zero_snr" else "leading"
    cfg = make_cfg(schedule, prediction_type=prediction, clip_sample=True, timestep_spacing=spacing)
    steps = 20
    d = diffusers_ddim(cfg, steps, f64=False)
    rng = np.random.default_rng(5)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((steps,) + SHAPE).astype(np.float32)
    ref = diffusers_ddim_loop(d, x, eta, noises)
    ours = fd.DDIM.from_diffusers_config(cfg, steps=steps, eta=eta)
    if schedule == "zero_snr" and not np.all(np.isfinite(ref)):
        # At ᾱ_999 = 0 with η = 1, σ² = 1 - ᾱ_prev and diffusers' float32 √(1 - ᾱ_prev - σ²)
        # takes the root of a rounding residue that is negative on some CPUs' torch kernels
        # (NaN); compare with the float64 loop of the same update instead.
        ref = numpy_ddim_v_clip_loop(np.asarray(ours.schedule.alphas_cumprod), ours.timesteps, x, eta, noises)
    assert_close(ours_loop(ours, x, noises), ref, what="step loop")
    if eta == 0.0:
        got = ours.sample(dummy_model_np, x_T=x)
        assert_close(got, ref, what="sample(x_T=...)")
        assert_close(plain_ddim(cfg, steps).sample(dummy_model_np, x_T=x), ref, what="plain sample")


@pytest.mark.parametrize(
    "spacing,steps,offset",
    [("leading", 50, 1), ("trailing", 10, 0), ("trailing", 25, 0)],
)
def test_ddim_full_loop_spacings_where_diffusers_is_right(spacing, steps, offset):
    # trailing with T % N == 0: diffusers' t - T//N coincides with the list's next entry
    cfg = make_cfg("scaled_linear", timestep_spacing=spacing, steps_offset=offset, clip_sample=False)
    d = diffusers_ddim(cfg, steps, f64=False)
    rng = np.random.default_rng(6)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((steps,) + SHAPE).astype(np.float32)
    for eta in (0.0, 1.0):
        ref = diffusers_ddim_loop(d, x, eta, noises)
        ours = fd.DDIM.from_diffusers_config(cfg, steps=steps, eta=eta)
        assert_close(ours_loop(ours, x, noises), ref, what=f"eta={eta}")
        assert_close(ours_loop(plain_ddim(cfg, steps, eta=eta), x, noises), ref, what=f"plain eta={eta}")


def test_ddim_full_loop_linspace_all_steps_matches_diffusers():
    # linspace is only right in diffusers when N == T (then t - T//N = t - 1)
    cfg = make_cfg("linear", num_train_timesteps=50, timestep_spacing="linspace", clip_sample=True)
    d = diffusers_ddim(cfg, 50, f64=False)
    rng = np.random.default_rng(9)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((50,) + SHAPE).astype(np.float32)
    ours = fd.DDIM.from_diffusers_config(cfg, steps=50, eta=1.0)
    assert_close(ours_loop(ours, x, noises), diffusers_ddim_loop(d, x, 1.0, noises))


def diffusers_ddpm_loop(d, x, learned):
    xt = torch.from_numpy(x.copy())
    noises = []
    for k, t in enumerate(d.timesteps):
        out = dummy_model_torch(xt, t)
        if learned:
            out = torch.cat([out, torch.tanh(xt)], dim=1)
        noises.append(torch_noise(xt.shape, k).numpy())
        xt = d.step(out, t, xt, generator=torch.Generator().manual_seed(k)).prev_sample
    return xt.numpy(), noises


def ours_ddpm_loop(sampler, x, noises, learned):
    for k, t in enumerate(np.asarray(sampler.timesteps)):
        tb = np.full(x.shape[0], t, dtype=np.int64)
        out = dummy_model_np(x, tb)
        if learned:
            out = np.concatenate([out, np.tanh(x)], axis=1).astype(np.float32)
        x = sampler.step(out, int(t), x, noise=noises[k]).prev_sample
    return x


DDPM_LOOP_CASES = (
    [("linear", p, v) for p in PREDICTIONS for v in ("fixed_small", "fixed_large", "learned_range")]
    + [(s, "epsilon", "fixed_small") for s in ("scaled_linear", "squaredcos_cap_v2", "sigmoid")]
    + [("zero_snr", "v_prediction", "fixed_small")]
)


@pytest.mark.parametrize("schedule,prediction,variance", DDPM_LOOP_CASES)
def test_ddpm_full_loop_matches_diffusers(schedule, prediction, variance):
    spacing = "trailing" if schedule == "zero_snr" else "leading"
    cfg = make_cfg(
        schedule,
        prediction_type=prediction,
        variance_type=variance,
        clip_sample=True,
        timestep_spacing=spacing,
    )
    d = diffusers_ddpm(cfg, 50, f64=False)
    rng = np.random.default_rng(12)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    learned = variance == "learned_range"
    ref, noises = diffusers_ddpm_loop(d, x, learned)
    assert_close(ours_ddpm_loop(fd.DDPM.from_diffusers_config(cfg, steps=50), x, noises, learned), ref)
    assert_close(ours_ddpm_loop(plain_ddpm(cfg, 50), x, noises, learned), ref, what="plain")


@pytest.mark.parametrize(
    "spacing,steps,offset",
    [("leading", 50, 1), ("trailing", 20, 0), ("linspace", 20, 0), ("linspace", 16, 0)],
)
def test_ddpm_full_loop_spacings_match_diffusers(spacing, steps, offset):
    # diffusers 0.42.1's DDPM previous_timestep reads the list once set_timesteps(N) was called, so
    # every spacing agrees; fixed_small's variance at the final step (prev = -1) is 1e-20 in diffusers.
    cfg = make_cfg("linear", timestep_spacing=spacing, steps_offset=offset, clip_sample=True)
    d = diffusers_ddpm(cfg, steps, f64=False)
    ts = [int(t) for t in d.timesteps]
    for i in range(len(ts) - 1):
        assert int(d.previous_timestep(ts[i])) == ts[i + 1]  # list-based in diffusers 0.42.1 too
    if spacing == "linspace":
        assert any(ts[i] - 1000 // steps != ts[i + 1] for i in range(len(ts) - 1))  # t - T//N would differ
    rng = np.random.default_rng(13)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    ref, noises = diffusers_ddpm_loop(d, x, False)
    assert_close(ours_ddpm_loop(fd.DDPM.from_diffusers_config(cfg, steps=steps), x, noises, False), ref)


def test_from_diffusers_config_accepts_saved_json_path(tmp_path):
    cfg = make_cfg(
        "scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False
    )
    d = diffusers_ddim(cfg, 25, f64=False)
    d.save_config(str(tmp_path))  # writes scheduler_config.json with _class_name/_diffusers_version
    path = tmp_path / "scheduler_config.json"
    assert "_class_name" in json.loads(path.read_text())
    ours = fd.DDIM.from_diffusers_config(str(path), steps=25)
    rng = np.random.default_rng(14)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    ref = diffusers_ddim_loop(d, x, 0.0, None)
    assert_close(ours.sample(dummy_model_np, x_T=x), ref)
    assert fd.Schedule.from_diffusers_config(str(path)) == fd.Schedule.from_diffusers_config(cfg)


def test_from_diffusers_config_uses_diffusers_defaults_for_missing_keys():
    # an almost empty config means diffusers' defaults: linear 1e-4..0.02, T=1000, clip_sample=True
    cfg = {"num_train_timesteps": 1000}
    d = DDIMScheduler.from_config(cfg)
    d.set_timesteps(10)
    ours = fd.DDIM.from_diffusers_config(cfg, steps=10)
    x = (3 * np.random.default_rng(15).standard_normal(SHAPE)).astype(np.float32)
    ref = diffusers_ddim_loop(d, x, 0.0, None)
    assert_close(ours.sample(dummy_model_np, x_T=x), ref)
    # and clip_sample=True is what diffusers used here: the unclipped loop is different
    unclipped = fd.DDIM(fd.Schedule.linear(1000, 1e-4, 0.02), steps=10).sample(dummy_model_np, x_T=x)
    assert not np.allclose(unclipped, ref, atol=1e-3)


# --------------------------------------------------------------------------------------------
# REFERENCE.md golden values (ferrodiff alone)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,beta_start,exp_sum,exp_mean,tol_sum,tol_mean",
    [
        ({}, 1e-4, 172.0067, 0.223967, 2e-3, 3e-6),
        ({"prediction": "v"}, 1e-4, 52.5302, 0.0684, 2e-3, 1e-4),
        ({"set_alpha_to_one": True}, 0.01, 149.8295, 0.1951, 2e-3, 1e-4),
        ({"set_alpha_to_one": False}, 0.01, 149.0784, 0.1941, 2e-3, 1e-4),
    ],
    ids=["epsilon", "v", "alpha_to_one", "no_alpha_to_one"],
)
def test_ddim_fixture_full_loop_reference_values(kwargs, beta_start, exp_sum, exp_mean, tol_sum, tol_mean):
    s = fd.Schedule.linear(1000, beta_start, 0.02)
    sampler = fd.DDIM(s, steps=10, spacing="leading", eta=0.0, clip_sample=1.0, **kwargs)
    x = sampler.sample(dummy_model_np, x_T=fixture_sample())
    assert x.dtype == np.float32 and x.shape == (4, 3, 8, 8)
    assert float(np.abs(x.astype(np.float64)).sum()) == pytest.approx(exp_sum, abs=tol_sum)
    assert float(np.abs(x.astype(np.float64)).mean()) == pytest.approx(exp_mean, abs=tol_mean)
    # the same result by hand with step()
    y = fixture_sample()
    for t in np.asarray(sampler.timesteps):
        y = sampler.step(dummy_model_np(y, np.full(4, t)), int(t), y).prev_sample
    np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------
# deliberate differences
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spacing,steps", [("linspace", 10), ("linspace", 16), ("trailing", 16), ("trailing", 7)]
)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_linspace_prev_timestep_follows_list(spacing, steps, eta):
    T = 1000
    cfg = make_cfg("linear", timestep_spacing=spacing)
    ours = fd.DDIM.from_diffusers_config(cfg, steps=steps, eta=eta)
    d = diffusers_ddim(cfg, steps)
    ts = [int(t) for t in np.asarray(ours.timesteps)]
    np.testing.assert_array_equal(ts, d.timesteps.numpy())
    # a timestep whose diffusers predecessor t - T//N is not the next list entry (nor any entry)
    bad = [i for i in range(len(ts) - 1) if ts[i] - T // steps != ts[i + 1]]
    assert bad, "test needs a spacing where diffusers' previous timestep is wrong"
    i = bad[0]
    t, prev_list, prev_diffusers = ts[i], ts[i + 1], ts[i] - T // steps
    assert prev_diffusers not in ts
    ac = linear_alphas_cumprod_np()
    rng = np.random.default_rng(40)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    z = rng.standard_normal(SHAPE).astype(np.float32)
    # diffusers really uses t - T//N (confirms our reading of its code) ...
    d_prev, _ = ddim_diffusers_step(d, eps, t, x, eta, z)
    ref_diffusers, _ = ddim_step_np(ac, t, prev_diffusers, x, eps, eta, z)
    assert_close(d_prev, ref_diffusers)
    # ... while ours uses the next entry of its own list
    ref_list, ref_x0 = ddim_step_np(ac, t, prev_list, x, eps, eta, z)
    res = ours.step(eps, t, x, noise=z)
    assert_close(res.prev_sample, ref_list)
    assert_close(res.pred_x0, ref_x0)
    assert not np.allclose(res.prev_sample, d_prev, rtol=RTOL, atol=1e-3)


def test_ddim_linspace_full_loop_follows_list_numpy_reference():
    steps = 10
    cfg = make_cfg("linear", timestep_spacing="linspace", clip_sample=False)
    ours = fd.DDIM.from_diffusers_config(cfg, steps=steps)
    ts = [int(t) for t in np.asarray(ours.timesteps)]
    assert ts == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    ac = linear_alphas_cumprod_np()
    rng = np.random.default_rng(41)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    ref = x0.astype(np.float64)
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps = dummy_model_np(ref.astype(np.float32), np.full(2, t)).astype(np.float64)
        ref, _ = ddim_step_np(ac, t, prev, ref, eps)
    got = ours.sample(dummy_model_np, x_T=x0)
    assert_close(got, ref)
    d = diffusers_ddim(cfg, steps)
    assert not np.allclose(got, diffusers_ddim_loop(d, x0, 0.0, None), rtol=RTOL, atol=1e-3)


@pytest.mark.parametrize("spacing,steps,offset", [("trailing", 10, 0), ("leading", 10, 1)])
def test_ddpm_adds_no_noise_at_last_step_of_list(spacing, steps, offset):
    cfg = make_cfg("linear", variance_type="fixed_large", timestep_spacing=spacing, steps_offset=offset)
    ours = fd.DDPM.from_diffusers_config(cfg, steps=steps)
    d = diffusers_ddpm(cfg, steps)
    t = int(ours.timesteps[-1])
    assert t > 0  # diffusers adds noise here (only t == 0 is noise-free there)
    rng = np.random.default_rng(50)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    d_prev, d_x0, z = ddpm_diffusers_step(d, eps, t, x, 0)
    a = linear_alphas_cumprod_np()[t]
    x0_ref = (x.astype(np.float64) - math.sqrt(1 - a) * eps) / math.sqrt(a)
    # previous "timestep" is -1 (alpha_prev = 1): the posterior mean is x0 itself
    r1 = ours.step(eps, t, x, noise=z)
    r2 = ours.step(eps, t, x, noise=-z)
    assert_close(d_x0, x0_ref)
    assert_close(r1.pred_x0, x0_ref)
    assert_close(r1.prev_sample, x0_ref)
    np.testing.assert_array_equal(r1.prev_sample, r2.prev_sample)
    # diffusers added sqrt(beta_t') z with beta_t' = 1 - alphas_cumprod[t]
    assert_close(d_prev, x0_ref + math.sqrt(1 - a) * z.astype(np.float64))
    assert not np.allclose(r1.prev_sample, d_prev, atol=1e-3)


def test_leading_steps_offset_reaching_T_is_value_error_diffusers_10003():
    cfg = make_cfg("linear", steps_offset=1)
    # diffusers 0.42.1 yields t = 1000 = T, an index past alphas_cumprod
    d = DDIMScheduler.from_config(cfg)
    d.set_timesteps(1000)
    assert int(d.timesteps[0]) == 1000
    s = fd.Schedule.linear(1000, 1e-4, 0.02)
    with pytest.raises(ValueError, match="1000"):
        fd.timesteps(1000, 1000, "leading", steps_offset=1)
    with pytest.raises(ValueError, match="1000"):
        fd.DDIM(s, steps=1000, spacing="leading", steps_offset=1)
    with pytest.raises(ValueError, match="1000"):
        fd.DDPM(s, steps=1000, spacing="leading", steps_offset=1)
    with pytest.raises(ValueError, match="1000"):
        fd.DDIM.from_diffusers_config(cfg, steps=1000)
    with pytest.raises(ValueError, match="1000"):
        fd.DDPM.from_diffusers_config(cfg, steps=1000)
    # the boundary: 500 steps with offset 1 ends at 999 and is fine (and equals diffusers)
    d.set_timesteps(500)
    np.testing.assert_array_equal(
        np.asarray(fd.DDIM.from_diffusers_config(cfg, steps=500).timesteps), d.timesteps
    )


def test_zero_terminal_snr_epsilon_is_finite_where_diffusers_is_not():
    cfg = make_cfg("zero_snr", prediction_type="epsilon", timestep_spacing="trailing", clip_sample=False)
    rng = np.random.default_rng(60)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    # diffusers 0.42.1 divides by sqrt(alphas_cumprod[999]) = 0
    d = diffusers_ddim(cfg, 10, f64=False)
    assert float(d.alphas_cumprod[999]) == 0.0
    d_prev, d_x0 = ddim_diffusers_step(d, eps, 999, x, 0.0, None)
    assert not np.all(np.isfinite(d_prev)) and not np.all(np.isfinite(d_x0))
    dp = diffusers_ddpm(cfg, 10, f64=False)
    dp_prev, _, _ = ddpm_diffusers_step(dp, eps, 999, x, 0)
    assert not np.all(np.isfinite(dp_prev))
    # ferrodiff guards it (check_finite is on by default, so a non-finite result would raise)
    s = fd.Schedule.from_diffusers_config(cfg)
    assert float(np.asarray(s.alphas_cumprod)[-1]) == pytest.approx(0.0, abs=1e-12)
    ddim = fd.DDIM.from_diffusers_config(cfg, steps=10)
    ddpm = fd.DDPM.from_diffusers_config(cfg, steps=10)
    assert int(ddim.timesteps[0]) == 999 and int(ddpm.timesteps[0]) == 999
    for sampler in (ddim, ddpm):
        res = sampler.step(eps, 999, x, noise=eps)
        assert np.all(np.isfinite(res.prev_sample)) and np.all(np.isfinite(res.pred_x0))
        out = sampler.sample(dummy_model_np, x_T=x, seed=0)
        assert out.shape == SHAPE and np.all(np.isfinite(out))
    # the steps after the first one are ordinary and agree with diffusers again
    t = int(ddim.timesteps[1])
    d_prev, d_x0 = ddim_diffusers_step(d, eps, t, x, 0.0, None)
    res = ddim.step(eps, t, x)
    assert_close(res.prev_sample, d_prev)
    assert_close(res.pred_x0, d_x0)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_cosine_last_timestep_epsilon_matches_diffusers_and_float64(spacing):
    # ᾱ_999 = 2.43e-9 on the cosine schedule is small but a real noise level: the zero-terminal-SNR
    # guard must not touch it (it used to floor ᾱ to 2^-24 here, a 5x error in x0).
    cfg = make_cfg("squaredcos_cap_v2", prediction_type="epsilon", timestep_spacing=spacing)
    ac = np.cumprod(1 - np_betas(cfg))
    assert ac[999] == pytest.approx(2.428767e-9, rel=1e-5)
    rng = np.random.default_rng(61)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    eps = (x + 0.01 * rng.standard_normal(SHAPE)).astype(np.float32)
    x0_f64 = (x.astype(np.float64) - math.sqrt(1 - ac[999]) * eps) / math.sqrt(ac[999])
    dp = diffusers_ddpm(cfg, 10)
    _, d_x0, noise = ddpm_diffusers_step(dp, eps, 999, x, 0)
    dd = diffusers_ddim(cfg, 10)
    dd_prev, dd_x0 = ddim_diffusers_step(dd, eps, 999, x, 0.0, None)
    ddpm = fd.DDPM.from_diffusers_config(cfg, steps=10)
    ddim = fd.DDIM.from_diffusers_config(cfg, steps=10)
    assert int(ddpm.timesteps[0]) == 999 and int(ddim.timesteps[0]) == 999
    for ref in (d_x0, dd_x0):
        assert_close(ref, x0_f64)  # the reference itself agrees with exact arithmetic
    r_ddpm = ddpm.step(eps, 999, x, noise=noise)
    r_ddim = ddim.step(eps, 999, x)
    for res in (r_ddpm, r_ddim):
        assert_close(res.pred_x0, x0_f64, what="pred_x0 against float64")
        assert_close(res.pred_x0, d_x0, what="pred_x0 against diffusers")
    prev = int(ddim.timesteps[1])
    ref_prev, _ = ddim_step_np(ac, 999, prev, x, eps)
    assert_close(r_ddim.prev_sample, ref_prev, what="DDIM prev_sample against float64")
    if spacing == "trailing":  # diffusers' t - T//N is then the list's next timestep
        assert prev == 899
        assert_close(r_ddim.prev_sample, dd_prev, what="DDIM prev_sample against diffusers")
