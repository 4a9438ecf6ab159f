"""Training targets, weights, the simple loss and the variational bound (fd.losses, fd.likelihood)."""

import math

import numpy as np
import pytest

import ferrodiff as fd
from ferrodiff import likelihood as L
from ferrodiff import losses

LN2 = math.log(2.0)


def test_golden_values_of_reference_md():
    assert L.normal_kl(1.0, 0.0, 0.0, 0.0) == pytest.approx(0.5, abs=1e-12)
    assert L.normal_kl(0.0, math.log(4.0), 0.0, 0.0) == pytest.approx(0.8068528, abs=1e-7)
    assert L.approx_standard_normal_cdf(2.0) == pytest.approx(0.97729885, abs=1e-8)
    cases = [
        ((0.0, 0.0, 0.01), -1.187371),
        ((1.0, 0.9, 0.1), -1.780969),
        ((-1.0, -1.0, 0.05), -0.632509),
        ((0.5, 0.0, 1.0), -5.892573),
    ]
    for (x, mu, sigma), want in cases:
        assert L.discretized_gaussian_log_likelihood(x, mu, math.log(sigma)) == pytest.approx(want, abs=1e-6)
    s = fd.Schedule.linear(1000)
    assert L.prior_bpd(s, np.ones((1, 1), np.float32))[0] == pytest.approx(2.9113e-5, rel=1e-3)


def test_training_targets_match_the_parameterizations(rng):
    s = fd.Schedule.cosine(1000)
    x0 = rng.standard_normal((4, 3, 2)).astype(np.float32)
    z = rng.standard_normal((4, 3, 2)).astype(np.float32)
    t = np.array([0, 10, 500, 999])
    np.testing.assert_array_equal(losses.training_target(s, x0, z, t), z)
    np.testing.assert_array_equal(losses.training_target(s, x0, z, t, "x0"), x0)
    np.testing.assert_allclose(losses.training_target(s, x0, z, t, "v"), s.velocity(x0, t, z))


def test_loss_weights_per_prediction_type():
    s = fd.Schedule.linear(1000)
    t = np.array([0, 100, 500, 999])
    snr = s.snr[t]
    np.testing.assert_allclose(losses.loss_weight(s, t, "uniform"), 1.0)
    np.testing.assert_allclose(
        losses.loss_weight(s, t, "min_snr", "epsilon"), np.minimum(snr, 5) / snr, rtol=1e-12
    )
    np.testing.assert_allclose(
        losses.loss_weight(s, t, "min_snr", "v"), np.minimum(snr, 5) / (snr + 1), rtol=1e-12
    )
    np.testing.assert_allclose(
        losses.loss_weight(s, t, "min_snr", "x0", gamma=3.0), np.minimum(snr, 3), rtol=1e-12
    )
    np.testing.assert_allclose(
        losses.loss_weight(s, t, "truncated_snr", "x0"), np.maximum(snr, 1), rtol=1e-12
    )
    np.testing.assert_allclose(losses.loss_weight(s, t, "snr", "x0"), snr, rtol=1e-12)
    # The seed's per-t VLB weight on the ε-MSE, with the clipped posterior variance.
    b, a, ab = s.betas[t], s.alphas[t], s.alphas_cumprod[t]
    var = np.exp(s.posterior_log_variance_clipped[t])
    np.testing.assert_allclose(losses.loss_weight(s, t, "vlb"), b**2 / (2 * a * (1 - ab) * var), rtol=1e-10)


@pytest.mark.parametrize("kind", ["uniform", "snr", "min_snr", "truncated_snr", "vlb"])
@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_no_weight_is_infinite_with_zero_terminal_snr(kind, prediction):
    s = fd.Schedule.linear(1000).rescale_zero_terminal_snr()
    w = losses.loss_weight(s, np.arange(1000), kind, prediction)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)


def test_weights_are_equivalent_across_targets(rng):
    # For consistent predictions, weight · ‖target error‖² is the same for every target type.
    s = fd.Schedule.linear(1000)
    x0 = rng.standard_normal((3, 8)).astype(np.float64)
    z = rng.standard_normal((3, 8))
    t = np.array([20, 400, 900])
    ab = s.alphas_cumprod[t][:, None]
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * z
    x0_hat = x0 + 0.1 * rng.standard_normal(x0.shape)
    eps_hat = (xt - np.sqrt(ab) * x0_hat) / np.sqrt(1 - ab)
    v, v_hat = np.sqrt(ab) * z - np.sqrt(1 - ab) * x0, np.sqrt(ab) * eps_hat - np.sqrt(1 - ab) * x0_hat
    for kind in ["snr", "min_snr", "truncated_snr", "vlb"]:
        errs = {
            "x0": ((x0_hat - x0) ** 2).sum(1),
            "epsilon": ((eps_hat - z) ** 2).sum(1),
            "v": ((v_hat - v) ** 2).sum(1),
        }
        vals = {p: losses.loss_weight(s, t, kind, p) * e for p, e in errs.items()}
        np.testing.assert_allclose(vals["epsilon"], vals["x0"], rtol=1e-6)
        np.testing.assert_allclose(vals["v"], vals["x0"], rtol=1e-6)


def test_simple_loss_and_its_gradient_against_finite_differences(rng):
    o = rng.standard_normal((3, 2, 4)).astype(np.float32)
    y = rng.standard_normal((3, 2, 4)).astype(np.float32)
    w = np.array([1.0, 0.5, 2.0])
    loss, grad = losses.simple_loss(o, y, w)
    np.testing.assert_allclose(loss, w * ((o - y) ** 2).reshape(3, -1).mean(1), rtol=1e-6)
    h = 1e-3
    for idx in [(0, 0, 0), (1, 1, 3), (2, 0, 2)]:
        op, om = o.astype(np.float64).copy(), o.astype(np.float64).copy()
        op[idx] += h
        om[idx] -= h
        f = lambda a: (w * ((a - y) ** 2).reshape(3, -1).mean(1)).sum()  # noqa: E731
        assert grad[idx] == pytest.approx((f(op) - f(om)) / (2 * h), rel=1e-4, abs=1e-6)


def test_torch_diffusion_loss_backpropagates_ferrodiffs_gradient(rng):
    torch = pytest.importorskip("torch")
    from ferrodiff.torch import DiffusionLoss

    o = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, 5, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    loss = DiffusionLoss()(o, y, w)
    loss.backward()
    ref_o = o.detach().clone().requires_grad_(True)
    ref = (w * ((ref_o - y) ** 2).mean(dim=(1, 2))).mean()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    np.testing.assert_allclose(o.grad.numpy(), ref_o.grad.numpy(), rtol=1e-4, atol=1e-7)


def numpy_vb_term(s, x0, xt, t, eps):
    """OpenAI's vb term for fixed_small variance, written in numpy (t > 0 rows only)."""
    ab = s.alphas_cumprod[t]
    x0_hat = np.clip((xt - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)
    c1, c2 = s.posterior_mean_coef1[t], s.posterior_mean_coef2[t]
    lv = s.posterior_log_variance_clipped[t]
    true_mean, model_mean = c1 * x0 + c2 * xt, c1 * x0_hat + c2 * xt
    kl = 0.5 * (-1 + lv - lv + np.exp(lv - lv) + (true_mean - model_mean) ** 2 * np.exp(-lv))
    return kl.mean() / LN2


def test_vb_terms_bpd_matches_a_numpy_computation(rng):
    s = fd.Schedule.linear(1000)
    x0 = np.clip(rng.standard_normal((3, 6)) * 0.5, -1, 1).astype(np.float32)
    z = rng.standard_normal((3, 6)).astype(np.float32)
    t = np.array([1, 300, 999])
    xt = s.q_sample(x0, t, z)
    eps = (z + 0.2 * rng.standard_normal(z.shape)).astype(np.float32)
    got = L.vb_terms_bpd(s, x0, xt, t, eps)
    for b in range(3):
        want = numpy_vb_term(
            s, x0[b].astype(np.float64), xt[b].astype(np.float64), t[b], eps[b].astype(np.float64)
        )
        assert got[b] == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_vb_term_at_t0_is_the_decoder_nll(rng):
    s = fd.Schedule.linear(1000)
    x0 = (rng.integers(0, 256, (2, 5)) / 127.5 - 1).astype(np.float32)
    xt = s.q_sample(x0, 0, np.zeros_like(x0))
    eps = np.zeros_like(x0)
    got = L.vb_terms_bpd(s, x0, xt, 0, eps)
    ab = s.alphas_cumprod[0]
    mean = s.posterior_mean_coef1[0] * np.clip(xt / np.sqrt(ab), -1, 1) + s.posterior_mean_coef2[0] * xt
    nll = -L.discretized_gaussian_log_likelihood(x0, mean, 0.5 * s.posterior_log_variance_clipped[0])
    np.testing.assert_allclose(got, nll.mean(1) / LN2, rtol=1e-5)


def numpy_bound(s, mix, x0, rng):
    """The whole bound (fixed_small, ε-prediction, 256 bins) in numpy with numpy's own noise."""
    T = len(s)
    ab = s.alphas_cumprod
    total = np.zeros(len(x0))
    for t in range(T):
        z = rng.standard_normal(x0.shape)
        xt = np.sqrt(ab[t]) * x0 + np.sqrt(1 - ab[t]) * z
        eps = mix.eps(xt.astype(np.float32), np.full(len(x0), t), s).astype(np.float64)
        x0_hat = np.clip((xt - np.sqrt(1 - ab[t]) * eps) / np.sqrt(ab[t]), -1, 1)
        c1, c2, lv = s.posterior_mean_coef1[t], s.posterior_mean_coef2[t], s.posterior_log_variance_clipped[t]
        model_mean = c1 * x0_hat + c2 * xt
        if t == 0:
            nll = -L.discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * lv)
            total += nll.mean(1) / LN2
        else:
            total += (0.5 * (c1 * x0 + c2 * xt - model_mean) ** 2 * np.exp(-lv)).mean(1) / LN2
    mean_T, lv_T = np.sqrt(ab[-1]) * x0, np.log(1 - ab[-1])
    total += (0.5 * (-1 - lv_T + np.exp(lv_T) + mean_T**2)).mean(1) / LN2
    return total


def test_bits_per_dim_of_the_exact_denoiser_bounds_the_true_nll_and_matches_numpy():
    # Data: K points on the 8-bit grid, equally likely: the true NLL is log2(K)/D bits/dim. The
    # bound of the exact denoiser (a mixture of near-point masses) is at least that, and equals
    # an independent numpy evaluation of the same bound within Monte Carlo error.
    s = fd.Schedule.linear(1000)
    points = np.array([[-1.0, 1.0], [127 / 127.5 - 1, -1.0], [1.0, 1.0], [-1.0, 200 / 127.5 - 1]])
    k, d = points.shape
    mix = fd.oracles.GaussianMixture(np.ones(k), points, np.full(k, 1e-3))
    x0 = np.repeat(points, 16, axis=0).astype(np.float32)
    r = L.bits_per_dim(mix.denoiser(s), s, x0, seed=1)
    assert r.terms.shape == (64, 1000) and r.mse.shape == (64, 1000)
    np.testing.assert_allclose(r.total, r.prior + r.terms.sum(1))
    true_nll = math.log2(k) / d
    assert np.all(r.total >= true_nll - 1e-3), (r.total.min(), true_nll)
    ref = numpy_bound(s, mix, x0.astype(np.float64), np.random.default_rng(7))
    se = np.sqrt(r.total.var() / len(x0) + ref.var() / len(x0))
    assert abs(r.total.mean() - ref.mean()) < 4 * se, (r.total.mean(), ref.mean(), se)


def test_bits_per_dim_rejects_data_outside_the_grid_range():
    s = fd.Schedule.linear(100)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        L.bits_per_dim(lambda x, t: x, s, np.full((2, 3), 1.5, np.float32))


def test_learned_range_needs_twice_the_channels(rng):
    s = fd.Schedule.linear(100)
    x = rng.uniform(-1, 1, (2, 3, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="twice the channels"):
        L.vb_terms_bpd(s, x, x, 5, x, variance="learned_range")
    with pytest.raises(ValueError, match="shape"):
        L.vb_terms_bpd(s, x, x, 5, x[:, :2])
    with pytest.raises(ValueError, match="out of range"):
        L.vb_terms_bpd(s, x, x, 100, x)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        losses.loss_weight(s, 3, "snr2")


def hybrid_inputs(rng, t):
    s = fd.Schedule.linear(1000)
    x0 = (rng.integers(0, 256, (3, 2, 4)) / 127.5 - 1).astype(np.float32)
    z = rng.standard_normal(x0.shape).astype(np.float32)
    xt = s.q_sample(x0, t, z)
    out = np.concatenate(
        [z + 0.3 * rng.standard_normal(z.shape), rng.uniform(-0.9, 0.9, z.shape)], axis=1
    ).astype(np.float32)
    return s, x0, xt, z, out


@pytest.mark.parametrize("t", [np.array([0, 0, 0]), np.array([1, 250, 999])])
def test_hybrid_loss_variance_gradient_against_finite_differences(rng, t):
    # The variance channels' gradient is the derivative of the whole loss (the mean is only
    # frozen inside the bound, and the mse does not see the variance channels).
    s, x0, xt, z, out = hybrid_inputs(rng, t)
    loss, grad = losses.hybrid_loss(s, x0, xt, z, t, out)
    assert grad.shape == out.shape
    h = 1e-2
    for idx in [(0, 2, 1), (1, 3, 2), (2, 2, 0), (0, 3, 3), (2, 3, 1)]:
        up, dn = out.copy(), out.copy()
        up[idx] += h
        dn[idx] -= h
        f_up = losses.hybrid_loss(s, x0, xt, z, t, up)[0].sum()
        f_dn = losses.hybrid_loss(s, x0, xt, z, t, dn)[0].sum()
        assert grad[idx] == pytest.approx((f_up - f_dn) / (2 * h), rel=2e-2, abs=2e-6), idx


def test_hybrid_variational_term_trains_only_the_variance_channels(rng):
    t = np.array([3, 400, 800])
    s, x0, xt, z, out = hybrid_inputs(rng, t)
    loss, grad = losses.hybrid_loss(s, x0, xt, z, t, out)
    mse = ((out[:, :2] - z) ** 2).reshape(3, -1).mean(1)
    # The mean channels' gradient is exactly the MSE's: the bound sees a frozen mean.
    np.testing.assert_allclose(grad[:, :2], 2 * (out[:, :2] - z) / 8, rtol=1e-5, atol=1e-7)
    assert np.all(np.abs(grad[:, 2:]) > 0)
    vb = L.vb_terms_bpd(s, x0, xt, t, out, variance="learned_range", clip_denoised=False)
    np.testing.assert_allclose(loss, mse + vb, rtol=1e-5)
    with pytest.raises(ValueError, match="twice the channels"):
        losses.hybrid_loss(s, x0, xt, z, t, out[:, :2])


def test_timestep_sampler_concentrates_on_large_losses_and_pickles():
    import pickle

    ts = losses.TimestepSampler(100, "loss_second_moment")
    assert not ts.warmed_up
    np.testing.assert_allclose(ts.probabilities(), 0.01)
    for _ in range(10):
        t = np.arange(100)
        ts.update(t, np.where(t < 10, 10.0, 1.0))
    assert ts.warmed_up
    p = ts.probabilities()
    assert p[:10].sum() == pytest.approx((100 * (1 - 0.001)) / (100 + 90) + 0.001 * 0.1, rel=1e-9)
    t, w = ts.sample(20000, seed=1)
    assert abs((t < 10).mean() - p[:10].sum()) < 0.02
    np.testing.assert_allclose(w, 1 / (100 * p[t]))
    restored = pickle.loads(pickle.dumps(ts))
    np.testing.assert_array_equal(restored.probabilities(), p)
    np.testing.assert_array_equal(restored.sample(5, seed=1)[0], ts.sample(5, seed=1)[0])
    with pytest.raises(ValueError, match="loss_second_moment"):
        losses.TimestepSampler(10, "importance")
    with pytest.raises(ValueError, match="out of range"):
        ts.update([100], [1.0])


def test_bits_per_dim_variance_types_and_errors():
    s = fd.Schedule.linear(50)
    x0 = np.array([[-1.0, 1.0], [1.0, -1.0]], np.float32)
    mix = fd.oracles.GaussianMixture([1, 1], x0.astype(np.float64), [1e-3, 1e-3])
    den = mix.denoiser(s)
    small = L.bits_per_dim(den, s, x0, variance="fixed_small", seed=3)
    large = L.bits_per_dim(den, s, x0, variance="fixed_large", seed=3)
    # learned_range with v = -1 everywhere is fixed_small exactly.
    learned = L.bits_per_dim(
        lambda x, t: np.concatenate([den(x, t), -np.ones_like(x)], axis=1),
        s,
        x0,
        variance="learned_range",
        seed=3,
    )
    np.testing.assert_allclose(learned.total, small.total, rtol=1e-5)
    assert not np.allclose(large.total, small.total)

    class Boom(Exception):
        pass

    def failing(x, t):
        raise Boom("model failed")

    with pytest.raises(Boom, match="model failed"):
        L.bits_per_dim(failing, s, x0)
    with pytest.raises(ValueError, match="twice the channels"):
        L.bits_per_dim(den, s, x0, variance="learned_range")
    with pytest.raises(ValueError, match="bins"):
        L.bits_per_dim(den, s, x0, bins=1)
