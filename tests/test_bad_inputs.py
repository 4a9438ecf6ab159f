"""Bad inputs: every one raises the documented exception class with a message naming the problem.

DESIGN.md, "Errors": ValueError for bad values or shapes (naming both shapes), TypeError for
wrong kinds (int / complex / object arrays), FloatingPointError for a non-finite model output
(naming the timestep), a user callback's own exception unchanged. Other float dtypes and
non-contiguous arrays are accepted with one copy and give the same results.
"""

import ferrodiff as fd
import numpy as np
import pytest

SHAPE = (2, 3, 8, 8)
T = 1000


def shape_re(shape):
    """A regex matching a shape however it is printed: (2, 3, 8, 9), [2, 3, 8, 9], 2x3x8x9 ..."""
    return r"\D+".join(str(d) for d in shape)


def all_of(*patterns):
    """A regex that matches when every pattern occurs somewhere in the message (any order)."""
    return "(?is)" + "".join(f"(?=.*(?:{p}))" for p in patterns)


@pytest.fixture(scope="module")
def sched():
    return fd.Schedule.linear(T, 1e-4, 0.02)


@pytest.fixture(scope="module")
def ddim(sched):
    return fd.DDIM(sched, steps=10)  # leading: 900, 800, ..., 0


@pytest.fixture(scope="module")
def ddpm(sched):
    return fd.DDPM(sched, steps=10)


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    z = rng.standard_normal(SHAPE).astype(np.float32)
    return x, eps, z


def zero_denoiser(x, t):
    return np.zeros_like(x)


# --------------------------------------------------------------------------------------------
# schedule parameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctor", ["linear", "scaled_linear", "sigmoid"])
@pytest.mark.parametrize("beta_start", [0.0, -1e-4])
def test_beta_start_not_positive_is_value_error(ctor, beta_start):
    with pytest.raises(ValueError, match="beta_start"):
        getattr(fd.Schedule, ctor)(T, beta_start, 0.02)


@pytest.mark.parametrize("ctor", ["linear", "scaled_linear", "sigmoid"])
def test_swapped_betas_is_value_error(ctor):
    with pytest.raises(ValueError, match=all_of("beta_start", "beta_end")):
        getattr(fd.Schedule, ctor)(T, 0.02, 1e-4)


def test_beta_end_above_one_is_value_error():
    with pytest.raises(ValueError, match="beta_end"):
        fd.Schedule.linear(T, 1e-4, 1.5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fd.Schedule.linear(0, 1e-4, 0.02),
        lambda: fd.Schedule.scaled_linear(0),
        lambda: fd.Schedule.cosine(0),
        lambda: fd.Schedule.sigmoid(0),
        lambda: fd.Schedule.sigmoid_alpha_bar(0),
    ],
    ids=["linear", "scaled_linear", "cosine", "sigmoid", "sigmoid_alpha_bar"],
)
def test_zero_timesteps_is_value_error(make):
    with pytest.raises(ValueError, match=r"\bT\b|num_train_timesteps|timesteps"):
        make()


def test_betas_above_one_is_value_error():
    betas = np.linspace(1e-4, 0.02, 100)
    betas[50] = 1.2
    with pytest.raises(ValueError, match=all_of("beta", r"1\.2|\(0, ?1\]|<= ?1|at most 1|> ?1")):
        fd.Schedule.from_betas(betas)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_betas_is_value_error(bad):
    betas = np.linspace(1e-4, 0.02, 100)
    betas[10] = bad
    with pytest.raises(ValueError, match=all_of("beta", r"nan|inf|finite")):
        fd.Schedule.from_betas(betas)


def test_negative_beta_is_value_error():
    betas = np.linspace(1e-4, 0.02, 100)
    betas[3] = -0.01
    with pytest.raises(ValueError, match="beta"):
        fd.Schedule.from_betas(betas)


def test_empty_betas_is_value_error():
    with pytest.raises(ValueError, match="beta"):
        fd.Schedule.from_betas(np.zeros(0))


def test_two_dimensional_betas_is_value_error():
    with pytest.raises(ValueError, match=all_of("beta", r"1-d|one-dimensional|shape|ndim|dimension")):
        fd.Schedule.from_betas(np.full((10, 2), 0.01))


def test_complex_betas_is_type_error():
    with pytest.raises(TypeError, match=all_of("beta", r"complex|dtype|real|float")):
        fd.Schedule.from_betas(np.full(10, 0.01 + 0.0j))


def test_non_monotone_alphas_cumprod_is_value_error():
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 100))
    ac[40] = ac[38]  # goes up between 39 and 40
    with pytest.raises(ValueError, match=all_of("alphas_cumprod", r"monoton|increas|decreas")):
        fd.Schedule.from_alphas_cumprod(ac)


def test_alphas_cumprod_outside_unit_interval_is_value_error():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        fd.Schedule.from_alphas_cumprod(np.array([1.5, 0.9, 0.5]))


# --------------------------------------------------------------------------------------------
# unknown names list the valid ones
# --------------------------------------------------------------------------------------------


def test_unknown_spacing_lists_valid_ones(sched):
    listing = all_of("middle", "leading", "trailing", "linspace")
    with pytest.raises(ValueError, match=listing):
        fd.DDIM(sched, steps=10, spacing="middle")
    with pytest.raises(ValueError, match=listing):
        fd.DDPM(sched, steps=10, spacing="middle")
    with pytest.raises(ValueError, match=listing):
        fd.timesteps(T, 10, "middle")


def test_unknown_prediction_lists_valid_ones(sched):
    listing = all_of("eps_pred", "epsilon", r"\bx0\b", r"\bv\b")
    with pytest.raises(ValueError, match=listing):
        fd.DDIM(sched, steps=10, prediction="eps_pred")
    with pytest.raises(ValueError, match=listing):
        fd.DDPM(sched, steps=10, prediction="eps_pred")


def test_unknown_prediction_in_parameterization_lists_valid_ones(sched, arrays):
    x, eps, _ = arrays
    with pytest.raises(ValueError, match=all_of("eps_pred", "epsilon", r"\bx0\b", r"\bv\b")):
        sched.predict_x0(x, 500, eps, prediction="eps_pred")


def test_unknown_variance_lists_valid_ones(sched):
    with pytest.raises(ValueError, match=all_of("banana", "fixed_small", "fixed_large", "learned_range")):
        fd.DDPM(sched, steps=10, variance="banana")


def test_config_unknown_beta_schedule_lists_valid_ones():
    cfg = {"num_train_timesteps": 1000, "beta_schedule": "quadratic"}
    listing = all_of("quadratic", r"'?linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
    with pytest.raises(ValueError, match=listing):
        fd.Schedule.from_diffusers_config(cfg)
    with pytest.raises(ValueError, match=listing):
        fd.DDIM.from_diffusers_config(cfg, steps=10)


def test_config_unknown_timestep_spacing_lists_valid_ones():
    cfg = {"num_train_timesteps": 1000, "timestep_spacing": "middle"}
    with pytest.raises(ValueError, match=all_of("middle", "leading", "trailing", "linspace")):
        fd.DDIM.from_diffusers_config(cfg, steps=10)


def test_config_unknown_prediction_type_lists_valid_ones():
    cfg = {"num_train_timesteps": 1000, "prediction_type": "noise"}
    with pytest.raises(ValueError, match=all_of("noise", "epsilon", r"v_prediction|\bv\b")):
        fd.DDPM.from_diffusers_config(cfg, steps=10)


def test_config_unknown_variance_type_lists_valid_ones():
    cfg = {"num_train_timesteps": 1000, "variance_type": "banana"}
    with pytest.raises(ValueError, match=all_of("banana", "fixed_small", "fixed_large", "learned_range")):
        fd.DDPM.from_diffusers_config(cfg, steps=10)


def test_config_missing_file_is_file_not_found(tmp_path):
    missing = tmp_path / "nope" / "scheduler_config.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        fd.DDIM.from_diffusers_config(str(missing), steps=10)


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_shape",
    [(2, 3, 8, 9), (3, 3, 8, 8), (2, 9, 8, 8), (2, 3, 64)],
    ids=["width", "batch", "3C_channels", "rank"],
)
def test_model_output_shape_mismatch_names_both_shapes(ddim, arrays, bad_shape):
    x, _, _ = arrays
    out = np.zeros(bad_shape, np.float32)
    with pytest.raises(ValueError, match=all_of(shape_re(bad_shape), shape_re(SHAPE))):
        ddim.step(out, 900, x)


def test_ddpm_model_output_shape_mismatch_names_both_shapes(ddpm, arrays):
    x, _, _ = arrays
    out = np.zeros((2, 3, 4, 8), np.float32)
    with pytest.raises(ValueError, match=all_of(shape_re((2, 3, 4, 8)), shape_re(SHAPE))):
        ddpm.step(out, 900, x)


def test_t_length_not_batch_is_value_error(ddim, arrays):
    x, eps, _ = arrays
    with pytest.raises(ValueError, match=all_of(r"\bt\b|timestep", r"\b3\b", r"\b2\b")):
        ddim.step(eps, np.array([900, 900, 900]), x)


def test_t_two_dimensional_is_value_error(ddim, arrays):
    x, eps, _ = arrays
    with pytest.raises(ValueError, match=r"\bt\b|timestep"):
        ddim.step(eps, np.array([[900], [900]]), x)


def test_noise_shape_mismatch_names_noise_and_shapes(ddpm, arrays):
    x, eps, _ = arrays
    z = np.zeros((2, 3, 8, 7), np.float32)
    with pytest.raises(ValueError, match=all_of("noise", shape_re((2, 3, 8, 7)), shape_re(SHAPE))):
        ddpm.step(eps, 900, x, noise=z)


def test_out_shape_mismatch_names_out_and_shapes(ddim, arrays):
    x, eps, _ = arrays
    out = np.empty((2, 3, 8, 4), np.float32)
    with pytest.raises(ValueError, match=all_of(r"\bout\b", shape_re((2, 3, 8, 4)), shape_re(SHAPE))):
        ddim.step(eps, 900, x, out=out)


def test_q_sample_noise_shape_mismatch_is_value_error(sched, arrays):
    x, _, _ = arrays
    with pytest.raises(ValueError, match=all_of(shape_re((2, 3, 8, 5)), shape_re(SHAPE))):
        sched.q_sample(x, 10, np.zeros((2, 3, 8, 5), np.float32))


def test_q_sample_t_length_not_batch_is_value_error(sched, arrays):
    x, eps, _ = arrays
    with pytest.raises(ValueError, match=all_of(r"\bt\b|timestep", r"\b5\b", r"\b2\b")):
        sched.q_sample(x, np.arange(5), eps)


def test_denoiser_returning_wrong_shape_names_both_shapes(ddim):
    def bad(x, t):
        return np.zeros((x.shape[0], 3, 4, 4), np.float32)

    with pytest.raises(ValueError, match=all_of(shape_re((2, 3, 4, 4)), shape_re(SHAPE))):
        ddim.sample(bad, SHAPE, seed=0)


def test_x_T_and_shape_disagree_is_value_error(ddim, arrays):
    x, _, _ = arrays
    with pytest.raises(ValueError, match=all_of(shape_re((4, 3, 8, 8)), shape_re(SHAPE))):
        ddim.sample(zero_denoiser, (4, 3, 8, 8), x_T=x)


def test_sample_without_shape_or_x_T_is_value_error(ddim):
    with pytest.raises(ValueError, match=all_of("shape", "x_T")):
        ddim.sample(zero_denoiser)


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg,bad",
    [
        ("model_output", np.zeros(SHAPE, np.int64)),
        ("model_output", np.zeros(SHAPE, np.complex64)),
        ("model_output", np.zeros(SHAPE, object)),
        ("x", np.zeros(SHAPE, np.int32)),
        ("x", np.zeros(SHAPE, np.complex128)),
        ("x", np.zeros(SHAPE, object)),
        ("x", np.zeros(SHAPE, bool)),
        ("noise", np.zeros(SHAPE, np.int64)),
        ("noise", np.zeros(SHAPE, np.complex64)),
    ],
    ids=[
        "mo-int",
        "mo-complex",
        "mo-object",
        "x-int",
        "x-complex",
        "x-object",
        "x-bool",
        "noise-int",
        "noise-complex",
    ],
)
def test_non_float_arrays_are_type_errors_naming_the_argument(ddpm, arrays, arg, bad):
    x, eps, z = arrays
    kw = {"model_output": eps, "x": x, "noise": z}
    kw[arg] = bad
    with pytest.raises(TypeError, match=all_of(rf"\b{arg}\b", r"float|dtype")):
        ddpm.step(kw["model_output"], 900, kw["x"], noise=kw["noise"])


def test_float_timesteps_are_type_error(ddim, arrays):
    x, eps, _ = arrays
    with pytest.raises(TypeError, match=all_of(r"\bt\b|timestep", r"int")):
        ddim.step(eps, np.array([900.0, 900.0]), x)


def test_q_sample_int_x0_is_type_error(sched, arrays):
    _, eps, _ = arrays
    with pytest.raises(TypeError, match=r"float|dtype"):
        sched.q_sample(np.zeros(SHAPE, np.int64), 10, eps)


def test_threshold_of_wrong_kind_is_type_error(sched):
    with pytest.raises(TypeError, match="threshold"):
        fd.DDIM(sched, steps=10, threshold=0.995)


def test_denoiser_not_callable_is_type_error(ddim):
    with pytest.raises(TypeError, match=r"denoiser|callable"):
        ddim.sample(np.zeros(SHAPE, np.float32), SHAPE, seed=0)


def test_denoiser_returning_none_is_type_error(ddim):
    with pytest.raises(TypeError, match=all_of("denoiser", "NoneType|None")):
        ddim.sample(lambda x, t: None, SHAPE, seed=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_other_float_dtypes_accepted_with_equal_results(ddpm, dtype):
    rng = np.random.default_rng(1)
    # values exactly representable in both dtypes, so the conversion is exact
    x = rng.standard_normal(SHAPE).astype(np.float16).astype(np.float32)
    eps = rng.standard_normal(SHAPE).astype(np.float16).astype(np.float32)
    z = rng.standard_normal(SHAPE).astype(np.float16).astype(np.float32)
    ref = ddpm.step(eps, 500, x, noise=z)
    got = ddpm.step(eps.astype(dtype), 500, x.astype(dtype), noise=z.astype(dtype))
    assert got.prev_sample.dtype == np.float32 and got.pred_x0.dtype == np.float32
    np.testing.assert_array_equal(got.prev_sample, ref.prev_sample)
    np.testing.assert_array_equal(got.pred_x0, ref.pred_x0)


@pytest.mark.parametrize("layout", ["strided", "transposed", "fortran"])
def test_non_contiguous_arrays_accepted_with_equal_results(ddim, layout):
    rng = np.random.default_rng(2)
    if layout == "strided":
        big_x = rng.standard_normal((2, 3, 8, 16)).astype(np.float32)
        big_e = rng.standard_normal((2, 3, 8, 16)).astype(np.float32)
        x, eps = big_x[..., ::2], big_e[..., ::2]
    elif layout == "transposed":
        x = rng.standard_normal((8, 8, 3, 2)).astype(np.float32).transpose(3, 2, 1, 0)
        eps = rng.standard_normal((8, 8, 3, 2)).astype(np.float32).transpose(3, 2, 1, 0)
    else:
        x = np.asfortranarray(rng.standard_normal(SHAPE).astype(np.float32))
        eps = np.asfortranarray(rng.standard_normal(SHAPE).astype(np.float32))
    assert not x.flags.c_contiguous and x.shape == SHAPE
    ref = ddim.step(np.ascontiguousarray(eps), 900, np.ascontiguousarray(x))
    x_before = x.copy()
    got = ddim.step(eps, 900, x)
    np.testing.assert_array_equal(got.prev_sample, ref.prev_sample)
    np.testing.assert_array_equal(got.pred_x0, ref.pred_x0)
    np.testing.assert_array_equal(x, x_before)  # the input is not modified


# --------------------------------------------------------------------------------------------
# timesteps and sampler parameters
# --------------------------------------------------------------------------------------------


def test_t_not_in_timesteps_lists_them(ddim, arrays):
    x, eps, _ = arrays
    with pytest.raises(ValueError, match=all_of("timesteps", r"\b123\b", r"\b900\b", r"\b800\b")):
        ddim.step(eps, 123, x)


def test_t_not_in_timesteps_in_a_row_of_the_batch(ddpm, arrays):
    x, eps, _ = arrays
    with pytest.raises(ValueError, match=all_of("timesteps", r"\b901\b")):
        ddpm.step(eps, np.array([900, 901]), x)


@pytest.mark.parametrize("t", [-1, 1000])
def test_q_sample_t_out_of_range_is_value_error(sched, arrays, t):
    x, eps, _ = arrays
    with pytest.raises(ValueError, match=all_of(rf"{t}", r"\bt\b|timestep|range|1000")):
        sched.q_sample(x, t, eps)


def test_clip_sample_and_threshold_together_is_value_error(sched):
    th = fd.DynamicThreshold(0.995, max_value=2.0)
    with pytest.raises(ValueError, match=all_of("clip", "threshold")):
        fd.DDIM(sched, steps=10, clip_sample=1.0, threshold=th)
    with pytest.raises(ValueError, match=all_of("clip", "threshold")):
        fd.DDPM(sched, steps=10, clip_sample=1.0, threshold=th)


@pytest.mark.parametrize("clip", [0.0, -1.0])
def test_clip_sample_not_positive_is_value_error(sched, clip):
    with pytest.raises(ValueError, match="clip_sample"):
        fd.DDIM(sched, steps=10, clip_sample=clip)


@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.1])
def test_dynamic_threshold_ratio_out_of_range_is_value_error(ratio):
    with pytest.raises(ValueError, match="ratio"):
        fd.DynamicThreshold(ratio)


def test_steps_more_than_T_is_value_error(sched):
    for make in (fd.DDIM, fd.DDPM):
        with pytest.raises(ValueError, match=all_of("steps", r"\b1001\b", r"\b1000\b")):
            make(sched, steps=1001)
    with pytest.raises(ValueError, match=all_of("steps", r"\b1001\b")):
        fd.timesteps(T, 1001, "leading")


def test_zero_steps_is_value_error(sched):
    with pytest.raises(ValueError, match="steps"):
        fd.DDIM(sched, steps=0)


def test_negative_eta_is_value_error(sched):
    with pytest.raises(ValueError, match=all_of("eta", r"-0\.5")):
        fd.DDIM(sched, steps=10, eta=-0.5)


def test_noise_and_seed_together_is_value_error(ddpm, arrays):
    x, eps, z = arrays
    with pytest.raises(ValueError, match=all_of("noise", "seed")):
        ddpm.step(eps, 900, x, noise=z, seed=0)


# --------------------------------------------------------------------------------------------
# non-finite outputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("which", ["ddim", "ddpm"])
def test_non_finite_model_output_is_floating_point_error_naming_t(sched, arrays, bad, which):
    x, eps, z = arrays
    sampler = fd.DDIM(sched, steps=10) if which == "ddim" else fd.DDPM(sched, steps=10)
    eps = eps.copy()
    eps[1, 2, 3, 4] = bad
    with pytest.raises(FloatingPointError, match=r"\b700\b"):
        sampler.step(eps, 700, x, noise=z)


def test_check_finite_off_lets_nan_through(ddim, arrays):
    x, eps, _ = arrays
    eps = eps.copy()
    eps[0, 0, 0, 0] = np.nan
    res = ddim.step(eps, 700, x, check_finite=False)
    assert np.isnan(res.prev_sample[0, 0, 0, 0])
    assert np.isfinite(res.prev_sample[1]).all()


def test_denoiser_nan_in_sample_is_floating_point_error_naming_t(ddim):
    calls = []

    def den(x, t):
        calls.append(int(t[0]))
        out = np.zeros_like(x)
        if t[0] == 600:
            out[:] = np.nan
        return out

    with pytest.raises(FloatingPointError, match=r"\b600\b"):
        ddim.sample(den, SHAPE, seed=0)
    assert calls == [900, 800, 700, 600]  # it stopped at the bad step


# --------------------------------------------------------------------------------------------
# user code raising
# --------------------------------------------------------------------------------------------


class DenoiserBroke(Exception):
    pass


def test_denoiser_exception_propagates_unchanged(ddim):
    err = DenoiserBroke("model exploded")

    def den(x, t):
        if t[0] == 800:
            raise err
        return np.zeros_like(x)

    with pytest.raises(DenoiserBroke) as info:
        ddim.sample(den, SHAPE, seed=0)
    assert info.value is err


def test_denoiser_exception_propagates_unchanged_from_ddpm_and_invert(sched, ddim):
    err = KeyError("missing conditioning")

    def den(x, t):
        raise err

    with pytest.raises(KeyError) as info:
        fd.DDPM(sched, steps=10).sample(den, SHAPE, seed=0)
    assert info.value is err
    with pytest.raises(KeyError) as info:
        ddim.invert(den, np.zeros(SHAPE, np.float32))
    assert info.value is err


def test_callback_exception_propagates_unchanged(ddim):
    err = DenoiserBroke("stop here")
    seen = []

    def cb(i, t, x, pred_x0):
        seen.append((i, int(t)))
        if i == 2:
            raise err

    with pytest.raises(DenoiserBroke) as info:
        ddim.sample(zero_denoiser, SHAPE, seed=0, callback=cb)
    assert info.value is err
    assert seen == [(0, 900), (1, 800), (2, 700)]


# --------------------------------------------------------------------------------------------
# zero-size batches
# --------------------------------------------------------------------------------------------

EMPTY = (0, 3, 8, 8)


@pytest.mark.parametrize("which", ["ddim", "ddpm"])
def test_zero_size_batch_step_returns_empty(sched, which):
    sampler = fd.DDIM(sched, steps=10, eta=1.0) if which == "ddim" else fd.DDPM(sched, steps=10)
    e = np.zeros(EMPTY, np.float32)
    for t in (900, np.zeros(0, np.int64)):
        res = sampler.step(e, t, e, seed=0)
        assert res.prev_sample.shape == EMPTY and res.prev_sample.dtype == np.float32
        assert res.pred_x0.shape == EMPTY
    res = sampler.step(e, 900, e, noise=e)
    assert res.prev_sample.shape == EMPTY


def test_zero_size_batch_q_sample_returns_empty(sched):
    e = np.zeros(EMPTY, np.float32)
    for t in (10, np.zeros(0, np.int64)):
        out = sched.q_sample(e, t, e)
        assert out.shape == EMPTY and out.dtype == np.float32


@pytest.mark.parametrize("which", ["ddim", "ddpm"])
def test_zero_size_batch_sample_returns_empty(sched, which):
    sampler = fd.DDIM(sched, steps=10) if which == "ddim" else fd.DDPM(sched, steps=10)
    out = sampler.sample(zero_denoiser, EMPTY, seed=0)
    assert out.shape == EMPTY and out.dtype == np.float32
    out = sampler.sample(zero_denoiser, x_T=np.zeros(EMPTY, np.float32))
    assert out.shape == EMPTY
