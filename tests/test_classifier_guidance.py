"""Classifier guidance (Dhariwal & Nichol 2021): the DDIM ε form and the DDPM mean shift against
numpy references of the paper's formulas, the exact class posterior of a Gaussian mixture as the
oracle, and a noisy classifier trained by ferrodiff."""

import ferrodiff as fd
import numpy as np
import pytest

MEANS = np.array([[2.0, 0.0], [-2.0, 0.0]])
STD = 0.3


def mixture():
    return fd.oracles.GaussianMixture([0.5, 0.5], MEANS.tolist(), [STD, STD])


def posterior_grad(schedule):
    """∇_x log p(y | x_t) of the mixture, in closed form: x_t | k ~ N(√ᾱ μ_k, (ᾱ s² + 1 - ᾱ) I)."""

    def grad(x, t, y):
        ab = schedule.alphas_cumprod[t][:, None]
        var = ab * STD**2 + 1 - ab
        centred = x[:, None, :] - np.sqrt(ab)[:, None] * MEANS[None]  # [B, K, D]
        score = -centred / var[:, None]
        logits = -0.5 * (centred**2).sum(-1) / var
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        own = score[np.arange(len(x)), y]
        return (own - (p[:, :, None] * score).sum(1)).astype(np.float32)

    return grad


def test_ddim_guidance_is_the_epsilon_form_of_the_paper():
    schedule = fd.Schedule.linear(1000)
    sampler = fd.DDIM(schedule, steps=10)
    denoiser = mixture().denoiser(schedule)
    grad = posterior_grad(schedule)
    y = np.array([0, 1, 0])
    out = sampler.sample(denoiser, (3, 2), seed=5, labels=y, classifier=grad, classifier_scale=2.0)
    x = fd.randn((3, 2), seed=5)
    for t in sampler.timesteps:
        tb = np.full(3, t)
        eps = denoiser(x, tb) - np.sqrt(1 - schedule.alphas_cumprod[t]) * 2.0 * grad(x, tb, y)
        x = sampler.step(eps.astype(np.float32), int(t), x, seed=5).prev_sample
    np.testing.assert_allclose(out, x, rtol=1e-4, atol=1e-5)


def test_ddpm_guidance_is_the_mean_shift_s_sigma_grad():
    schedule = fd.Schedule.linear(1000)
    sampler = fd.DDPM(schedule, steps=50)
    denoiser = mixture().denoiser(schedule)
    grad = posterior_grad(schedule)
    ts = sampler.timesteps
    x = fd.randn((4, 2), seed=1)
    y = np.array([1, 0, 1, 0])
    s = 3.0
    z = fd.randn((4, 2), seed=9)
    i = 20
    t, t_prev = int(ts[i]), int(ts[i + 1])
    ab, ab_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t_prev]
    beta = 1 - ab / ab_prev
    sigma2 = beta * (1 - ab_prev) / (1 - ab)
    eps = denoiser(x, np.full(4, t)).astype(np.float64)
    g = grad(x, np.full(4, t), y).astype(np.float64)
    # The paper's algorithm 1: μ from the model, then μ + s Σ ∇ log p(y | x_t), plus σ z.
    x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    mu = (np.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
    expected = mu + s * sigma2 * g + np.sqrt(sigma2) * z
    # The ε shift that reproduces it: k = Σ √α' √(1-ᾱ) / β'.
    k = sigma2 * np.sqrt(1 - beta) * np.sqrt(1 - ab) / beta
    step = sampler.step((eps - k * s * g).astype(np.float32), t, x, noise=z).prev_sample
    np.testing.assert_allclose(step, expected, rtol=1e-4, atol=1e-4)
    # The guided sampler applies exactly that shift at every step.
    out = sampler.sample(denoiser, x_T=x, seed=4, labels=y, classifier=grad, classifier_scale=s)
    h = x.copy()
    for j, tj in enumerate(ts):
        ab_j = schedule.alphas_cumprod[tj]
        ab_p = schedule.alphas_cumprod[ts[j + 1]] if j + 1 < len(ts) else 1.0
        b_j = 1 - ab_j / ab_p
        s2 = max(b_j * (1 - ab_p) / (1 - ab_j), 1e-20)
        k_j = s2 * np.sqrt(1 - b_j) * np.sqrt(1 - ab_j) / b_j
        tb = np.full(4, tj)
        e = denoiser(h, tb) - k_j * s * grad(h, tb, y)
        h = sampler.step(e.astype(np.float32), int(tj), h, seed=4).prev_sample
    np.testing.assert_allclose(out, h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [lambda s: fd.DDIM(s, steps=50), lambda s: fd.DDPM(s, steps=100)])
def test_guidance_with_the_exact_posterior_draws_from_the_chosen_component(make):
    schedule = fd.Schedule.linear(1000)
    sampler = make(schedule)
    denoiser = mixture().denoiser(schedule)
    y = np.arange(400) % 2
    x = sampler.sample(denoiser, (400, 2), seed=3, labels=y, classifier=posterior_grad(schedule))
    chosen = np.where(y == 0, x[:, 0] > 0, x[:, 0] < 0)
    assert chosen.mean() > 0.97, chosen.mean()
    unguided = sampler.sample(denoiser, (400, 2), seed=3)
    assert 0.3 < (unguided[:, 0] > 0).mean() < 0.7


def test_a_trained_noisy_classifier_guides_towards_its_class():
    schedule = fd.Schedule.linear(1000)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    data = (MEANS[y] + STD * rng.standard_normal((2000, 2))).astype(np.float32)
    clf = fd.nn.Classifier(2, [64, 64], 2, time_embed_dim=32)
    assert clf.is_noisy
    losses = clf.fit(data, y, schedule=schedule, steps=800, batch_size=128, lr=3e-3)
    assert losses[-100:].mean() < losses[:100].mean()
    g = clf.grad_log_prob(data[:5], 10, y[:5])
    assert g.shape == (5, 2) and np.isfinite(g).all()
    sampler = fd.DDIM(schedule, steps=50)
    labels = np.arange(300) % 2
    x = sampler.sample(
        mixture().denoiser(schedule), (300, 2), seed=1, labels=labels, classifier=clf, classifier_scale=3.0
    )
    chosen = np.where(labels == 0, x[:, 0] > 0, x[:, 0] < 0)
    assert chosen.mean() > 0.9, chosen.mean()


def test_classifier_guidance_errors():
    schedule = fd.Schedule.linear(1000)
    sampler = fd.DDIM(schedule, steps=5)
    d = mixture().denoiser(schedule)
    with pytest.raises(ValueError, match="needs labels"):
        sampler.sample(d, (2, 2), classifier=posterior_grad(schedule))
    with pytest.raises(ValueError, match="noisy classifier"):
        sampler.sample(d, (2, 2), labels=[0, 1], classifier=fd.nn.Classifier(2, [8], 2))
    with pytest.raises(ValueError, match="out of range"):
        sampler.sample(d, (2, 2), labels=[0, 5], classifier=fd.nn.Classifier(2, [8], 2, time_embed_dim=8))
    with pytest.raises(ValueError, match="grad_fn returned shape"):
        sampler.sample(d, (2, 2), labels=[0, 1], classifier=lambda x, t, y: np.zeros(3, np.float32))
    with pytest.raises(TypeError):
        sampler.sample(d, (2, 2), labels=[0, 1], classifier=3)
    with pytest.raises(ValueError, match="time embedding|timesteps"):
        fd.nn.Classifier(2, [8], 2).predict_proba(np.zeros((1, 2), np.float32), t=3)


def test_classifier_saves_loads_and_pickles_with_its_schedule(tmp_path):
    import pickle

    schedule = fd.Schedule.cosine(200)
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 256)
    data = (MEANS[y] + STD * rng.standard_normal((256, 2))).astype(np.float32)
    clf = fd.nn.Classifier(2, [16, 8], 2, seed=4, time_embed_dim=8)
    assert clf.schedule is None
    clf.fit(data, y, schedule=schedule, steps=20, batch_size=32)
    assert len(clf.schedule) == 200
    x = rng.standard_normal((5, 2)).astype(np.float32)
    want = clf.predict_proba(x, 50)
    file = clf.save(tmp_path / "clf")
    assert file.name == "classifier.safetensors" and file.parent == tmp_path / "clf"
    assert not [f for f in (tmp_path / "clf").iterdir() if ".tmp" in f.name]
    for other in (fd.nn.Classifier.load(tmp_path / "clf"), pickle.loads(pickle.dumps(clf))):
        np.testing.assert_array_equal(other.predict_proba(x, 50), want)
        np.testing.assert_array_equal(other.schedule.alphas_cumprod, schedule.alphas_cumprod)
        assert other.config == {"in_dim": 2, "hidden": [16, 8], "num_classes": 2, "time_embed_dim": 8}
    clean = fd.nn.Classifier(2, [4], 3)
    clean.save(tmp_path / "c.safetensors")
    assert fd.nn.Classifier.load(tmp_path / "c.safetensors").schedule is None
    with pytest.raises(FileNotFoundError, match="nothing"):
        fd.nn.Classifier.load(tmp_path / "nothing")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        fd.nn.Classifier.load(tmp_path / "bad.safetensors")
