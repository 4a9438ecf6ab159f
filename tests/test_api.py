"""The Python API against numpy re-implementations of the paper formulas."""

import json
import pickle

import ferrodiff as fd
import numpy as np
import pytest


def numpy_linear(T=1000, b0=1e-4, b1=0.02):
    betas = np.linspace(b0, b1, T, dtype=np.float64)
    return betas, np.cumprod(1 - betas)


def test_schedule_tables_are_float64_and_follow_ddpm_eq7(linear):
    betas, abar = numpy_linear()
    assert linear.betas.dtype == np.float64
    np.testing.assert_allclose(linear.betas, betas, rtol=1e-14)
    np.testing.assert_allclose(linear.alphas_cumprod, abar, rtol=1e-12)
    prev = np.append(1.0, abar[:-1])
    np.testing.assert_allclose(linear.alphas_cumprod_prev, prev, rtol=1e-12)
    var = betas * (1 - prev) / (1 - abar)
    np.testing.assert_allclose(linear.posterior_variance, var, rtol=1e-12)
    np.testing.assert_allclose(
        linear.posterior_log_variance_clipped, np.log(np.append(var[1], var[1:])), rtol=1e-12
    )
    np.testing.assert_allclose(linear.posterior_mean_coef1, betas * np.sqrt(prev) / (1 - abar), rtol=1e-12)
    np.testing.assert_allclose(
        linear.posterior_mean_coef2, (1 - prev) * np.sqrt(1 - betas) / (1 - abar), rtol=1e-12
    )
    np.testing.assert_allclose(linear.snr, abar / (1 - abar), rtol=1e-12)
    np.testing.assert_allclose(linear.sigmas, np.sqrt((1 - abar) / abar), rtol=1e-12)
    assert len(linear) == linear.num_train_timesteps == 1000


def test_rescale_zero_terminal_snr_returns_new_schedule_with_zero_terminal_alpha_bar(linear):
    z = linear.rescale_zero_terminal_snr()
    assert z.alphas_cumprod[-1] == 0.0 and linear.alphas_cumprod[-1] > 0
    assert z.snr[-1] == 0.0
    assert np.isclose(z.alphas_cumprod[0], linear.alphas_cumprod[0], rtol=1e-12)


def test_schedule_round_trips_through_dict_json_and_pickle():
    for s in [fd.Schedule.cosine(100), fd.Schedule.scaled_linear(50).rescale_zero_terminal_snr()]:
        d = json.loads(json.dumps(s.to_dict()))
        assert fd.Schedule.from_dict(d) == s
        assert pickle.loads(pickle.dumps(s)) == s
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(s)).alphas_cumprod, s.alphas_cumprod)


@pytest.mark.parametrize(
    "make",
    [
        lambda s: fd.DDPM(s, steps=20, spacing="trailing", variance="fixed_large", clip_sample=2.0),
        lambda s: fd.DDPM(s, spacing="ddim25", prediction="v", threshold=fd.DynamicThreshold(0.99, 1.5)),
        lambda s: fd.DDIM(s, steps=10, spacing=[900, 500, 10], eta=0.3, prediction="x0", steps_offset=0),
        lambda s: fd.DDIM(
            s,
            steps=7,
            spacing="linspace",
            set_alpha_to_one=False,
            use_clipped_model_output=True,
            clip_sample=1.0,
        ),
    ],
)
def test_samplers_round_trip_through_dict_and_pickle(linear, make, rng):
    a = make(linear)
    for b in [type(a).from_dict(json.loads(json.dumps(a.to_dict()))), pickle.loads(pickle.dumps(a))]:
        np.testing.assert_array_equal(a.timesteps, b.timesteps)
        assert a.to_dict() == b.to_dict()
        x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
        m = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
        t = int(a.timesteps[1])
        np.testing.assert_array_equal(
            a.step(m, t, x, seed=3).prev_sample, b.step(m, t, x, seed=3).prev_sample
        )


def test_q_sample_velocity_and_conversions_match_numpy(linear, rng):
    x0 = rng.standard_normal((5, 3, 4, 4)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 10, 500, 998, 999])
    a = linear.alphas_cumprod[t][:, None, None, None]
    xt = linear.q_sample(x0, t, eps)
    np.testing.assert_allclose(xt, np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, rtol=1e-5, atol=1e-6)
    v = linear.velocity(x0, t, eps)
    np.testing.assert_allclose(v, np.sqrt(a) * eps - np.sqrt(1 - a) * x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(linear.predict_x0(xt, t, eps), x0, rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(linear.predict_x0(xt, t, v, prediction="v"), x0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(linear.predict_x0(xt, t, x0, prediction="sample"), x0)
    np.testing.assert_allclose(
        linear.predict_eps(xt, t, v, prediction="v_prediction"), eps, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(linear.predict_eps(xt, t, x0, prediction="x0"), eps, rtol=1e-3, atol=5e-3)
    np.testing.assert_allclose(linear.score(xt, t, eps), -eps / np.sqrt(1 - a), rtol=1e-5, atol=1e-5)


def test_q_sample_broadcasts_an_int_timestep(linear, rng):
    x0 = rng.standard_normal((3, 2)).astype(np.float32)
    eps = rng.standard_normal((3, 2)).astype(np.float32)
    np.testing.assert_array_equal(linear.q_sample(x0, 7, eps), linear.q_sample(x0, np.full(3, 7), eps))


def test_q_posterior_matches_ddpm_eq7(linear, rng):
    x0 = rng.standard_normal((3, 2, 4)).astype(np.float32)
    xt = rng.standard_normal((3, 2, 4)).astype(np.float32)
    t = np.array([0, 1, 700])
    mean, var, logvar = linear.q_posterior(x0, xt, t)
    c1 = linear.posterior_mean_coef1[t][:, None, None]
    c2 = linear.posterior_mean_coef2[t][:, None, None]
    np.testing.assert_allclose(mean, c1 * x0 + c2 * xt, rtol=1e-5, atol=1e-6)
    assert var.shape == (3, 1, 1) and logvar.shape == (3, 1, 1)
    np.testing.assert_allclose(var.ravel(), linear.posterior_variance[t], rtol=1e-6)
    np.testing.assert_allclose(logvar.ravel(), linear.posterior_log_variance_clipped[t], rtol=1e-6)


def test_timesteps_helpers(linear):
    np.testing.assert_array_equal(fd.timesteps(1000, 10, "trailing"), np.arange(999, 0, -100))
    np.testing.assert_array_equal(fd.space_timesteps(10, "1,2,3"), [0, 4, 6, 7, 8, 9])
    np.testing.assert_array_equal(
        fd.DDPM(linear, spacing="10").timesteps, fd.space_timesteps(1000, "10")[::-1]
    )
    np.testing.assert_allclose(fd.karras_sigmas(5), [80, 17.5278, 2.51522, 0.169753, 0.002, 0], rtol=1e-5)
    np.testing.assert_allclose(fd.cosine_log_snr(np.array([0.0, 0.5, 1.0])), [20, 0, -20], atol=1e-9)


def test_randn_is_standard_normal_and_a_pure_function_of_the_seed():
    a = fd.randn((1000, 1000), seed=5)
    assert a.dtype == np.float32 and a.shape == (1000, 1000)
    np.testing.assert_array_equal(a, fd.randn((1000, 1000), seed=5))
    assert abs(a.mean()) < 5e-3 and abs(a.std() - 1) < 5e-3
    # The prefix of a longer draw is the shorter draw: values depend only on the element index.
    np.testing.assert_array_equal(fd.randn((10,), seed=5), a.ravel()[:10])
    assert not np.array_equal(fd.randn((10,), seed=6), a.ravel()[:10])
    assert not np.array_equal(fd.randn((10,)), fd.randn((10,)))


def test_hand_written_loop_with_one_seed_reproduces_sample(linear):
    mix = fd.oracles.eight_gaussians()
    den = mix.denoiser(linear)
    for sampler in [fd.DDPM(linear, steps=25), fd.DDIM(linear, steps=10, eta=0.7)]:
        ref = sampler.sample(den, (64, 2), seed=11)
        x = fd.randn((64, 2), seed=11)
        for t in sampler.timesteps:
            x = sampler.step(den(x, np.full(64, t)), int(t), x, seed=11).prev_sample
        np.testing.assert_array_equal(x, ref)


def test_step_output_fields_and_unpacking(linear, rng):
    d = fd.DDIM(linear, steps=10, clip_sample=1.0)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    m = rng.standard_normal((2, 4)).astype(np.float32) * 5
    res = d.step(m, 900, x)
    prev, x0 = res
    assert prev is res.prev_sample and x0 is res.pred_x0 and res.pred_original_sample is res.pred_x0
    assert np.all(np.abs(x0) <= 1.0)
    a = linear.alphas_cumprod[900]
    np.testing.assert_allclose(
        x0, np.clip((x - np.sqrt(1 - a) * m) / np.sqrt(a), -1, 1), rtol=1e-5, atol=1e-5
    )


def test_step_into_out_and_in_place_give_the_same_result(linear, rng):
    d = fd.DDPM(linear, steps=50)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    m = rng.standard_normal(x.shape).astype(np.float32)
    t = int(d.timesteps[3])
    ref = d.step(m, t, x, seed=1).prev_sample
    buf = np.empty_like(x)
    res = d.step(m, t, x, seed=1, out=buf)
    assert res.prev_sample is buf
    np.testing.assert_array_equal(buf, ref)
    x2 = x.copy()
    d.step(m, t, x2, seed=1, out=x2)
    np.testing.assert_array_equal(x2, ref)


def test_user_noise_is_used_exactly(linear, rng):
    d = fd.DDIM(linear, steps=10, eta=1.0)
    x = rng.standard_normal((2, 5)).astype(np.float32)
    m = rng.standard_normal((2, 5)).astype(np.float32)
    z = rng.standard_normal((2, 5)).astype(np.float32)
    a0 = d.step(m, 500, x, noise=z).prev_sample
    a1 = d.step(m, 500, x, noise=np.zeros_like(z)).prev_sample
    ap, a = linear.alphas_cumprod[400], linear.alphas_cumprod[500]
    sigma = np.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    np.testing.assert_allclose(a0 - a1, sigma * z, rtol=1e-4, atol=1e-6)


def test_per_row_timesteps_equal_separate_calls(linear, rng):
    d = fd.DDPM(linear, steps=100, variance="fixed_large")
    x = rng.standard_normal((3, 6)).astype(np.float32)
    m = rng.standard_normal((3, 6)).astype(np.float32)
    z = rng.standard_normal((3, 6)).astype(np.float32)
    t = np.array([990, 500, 0])
    both = d.step(m, t, x, noise=z).prev_sample
    for i in range(3):
        one = d.step(m[i : i + 1], int(t[i]), x[i : i + 1], noise=z[i : i + 1]).prev_sample
        np.testing.assert_array_equal(both[i : i + 1], one)


def test_learned_range_interpolates_log_variance(linear, rng):
    d = fd.DDPM(linear, steps=1000, variance="learned_range")
    x = rng.standard_normal((2, 1, 3)).astype(np.float32)
    mean = rng.standard_normal((2, 1, 3)).astype(np.float32)
    for v_val in [-1.0, 1.0, 0.3]:
        out = np.concatenate([mean, np.full_like(mean, v_val)], axis=1)
        z = np.ones_like(x)
        a = d.step(out, 500, x, noise=z).prev_sample - d.step(out, 500, x, noise=0 * z).prev_sample
        frac = (v_val + 1) / 2
        logvar = frac * np.log(linear.betas[500]) + (1 - frac) * np.log(linear.posterior_variance[500])
        np.testing.assert_allclose(a, np.exp(0.5 * logvar), rtol=1e-4)


def test_ddim_invert_then_sample_round_trips_with_first_order_error(linear):
    # Inversion evaluates ε one level behind the exact ODE step, so the round-trip error of an
    # exact denoiser is O(1/steps): it must halve when the steps double and be small at T steps.
    mix = fd.oracles.GaussianMixture([0.5, 0.5], [[-1.0, 0.5], [1.0, -0.5]], [0.3, 0.3])
    den = mix.denoiser(linear)
    x0 = mix.sample(32, seed=4)
    errors = {}
    for steps in (100, 200, 1000):
        d = fd.DDIM(linear, steps=steps)
        z = d.invert(den, x0)
        errors[steps] = np.abs(d.sample(den, x_T=z) - x0).mean()
        if steps == 1000:
            assert abs(z.std() - 1.0) < 0.3  # the latent is noise-like, not the data
    assert 1.6 < errors[100] / errors[200] < 2.5, errors
    assert errors[1000] < 5e-3, errors


def test_callback_receives_every_step(linear):
    seen = []
    d = fd.DDIM(linear, steps=5)
    den = fd.oracles.eight_gaussians().denoiser(linear)
    d.sample(den, (4, 2), callback=lambda i, t, x, x0: seen.append((i, t, x.shape, x0.shape)))
    assert [s[0] for s in seen] == list(range(5))
    assert [s[1] for s in seen] == list(d.timesteps)
    assert all(s[2] == (4, 2) and s[3] == (4, 2) for s in seen)


def test_from_diffusers_config_reads_a_folder_and_overrides(tmp_path, linear):
    cfg = {
        "beta_schedule": "linear",
        "prediction_type": "v_prediction",
        "clip_sample": False,
        "timestep_spacing": "trailing",
    }
    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    d = fd.DDIM.from_diffusers_config(tmp_path, steps=20, eta=0.5)
    assert d.prediction == "v" and d.eta == 0.5 and d.steps == 20
    assert d.timesteps[0] == 999
    assert fd.Schedule.from_diffusers_config(cfg) == linear


def test_keyboard_interrupt_stops_a_long_loop_between_steps(linear):
    import os
    import signal

    calls = []
    den = fd.oracles.eight_gaussians().denoiser(linear)

    def interrupting(x, t):
        calls.append(int(t[0]))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return den(x, t)

    with pytest.raises(KeyboardInterrupt):
        fd.DDPM(linear).sample(interrupting, (4, 2))
    assert len(calls) < 10


def test_pred_x0_can_be_written_into_a_buffer_or_skipped(linear, rng):
    d = fd.DDIM(linear, steps=10, clip_sample=1.0)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    m = rng.standard_normal((2, 3, 4)).astype(np.float32)
    ref = d.step(m, 500, x)
    buf = np.empty_like(x)
    got = d.step(m, 500, x, pred_x0_out=buf)
    assert got.pred_x0 is buf
    np.testing.assert_array_equal(buf, ref.pred_x0)
    skipped = d.step(m, 500, x, return_pred_x0=False)
    assert skipped.pred_x0 is None
    np.testing.assert_array_equal(skipped.prev_sample, ref.prev_sample)
    with pytest.raises(ValueError, match="overlap"):
        d.step(m, 500, x, pred_x0_out=x)
    with pytest.raises(ValueError, match="shape"):
        d.step(m, 500, x, pred_x0_out=np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="return_pred_x0=False"):
        d.step(m, 500, x, pred_x0_out=buf, return_pred_x0=False)


def test_randn_into_a_buffer_equals_the_allocating_call():
    buf = np.empty((3, 1000), np.float32)
    assert fd.randn((3, 1000), seed=9, out=buf) is buf
    np.testing.assert_array_equal(buf, fd.randn((3, 1000), seed=9))
    with pytest.raises(ValueError, match="shape"):
        fd.randn((3, 999), seed=9, out=buf)


def test_eps_from_score_inverts_score(linear, rng):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    eps = rng.standard_normal((3, 5)).astype(np.float32)
    t = np.array([1, 500, 999])
    score = linear.score(x, t, eps)
    np.testing.assert_allclose(linear.eps_from_score(score, t), eps, rtol=1e-5, atol=1e-6)
