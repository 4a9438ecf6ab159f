"""Conditioning on embeddings: a U-Net with cross-attention to a context [B, M, d] given as
numpy, a learned null context for classifier-free guidance, trained on paired arrays."""

import pickle

import ferrodiff as fd
import numpy as np
import pytest

K, M, D = 4, 2, 8  # classes, context tokens, context width


def quadrant_data(n, seed=0):
    """4x4 images: -1 everywhere except quadrant k (= +1), plus a little noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    x = -np.ones((n, 1, 4, 4), np.float32)
    for k in range(K):
        r, c = divmod(k, 2)
        x[y == k, 0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = 1.0
    x += 0.05 * rng.standard_normal(x.shape).astype(np.float32)
    return x, y


def quadrant_of(x):
    """The brightest quadrant of each 4x4 image: the class a sample shows."""
    q = [x[:, 0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean(axis=(1, 2)) for r in range(2) for c in range(2)]
    return np.stack(q, 1).argmax(1)


def small_unet(**kw):
    args = dict(
        in_channels=1, image_size=4, channel_mult=(1,), attention_resolutions=(), groups=4, context_dim=D
    )
    args.update(kw)
    return fd.nn.UNet(**args)


@pytest.fixture(scope="module")
def embeddings():
    """A fixed random embedding (M tokens of width D) per class: what a text encoder would give."""
    return np.random.default_rng(7).standard_normal((K, M, D)).astype(np.float32)


@pytest.fixture(scope="module")
def trained(embeddings):
    """The task is only solvable through the context: the class is in nothing else."""
    x, y = quadrant_data(512)
    model = small_unet(base_channels=16, seed=0)
    schedule = fd.Schedule.cosine(1000)
    trainer = fd.Trainer(
        model,
        schedule,
        x,
        context=embeddings[y],
        batch_size=64,
        lr=5e-3,
        lr_schedule="cosine",
        warmup_steps=20,
        total_steps=200,
        class_dropout=0.1,
    )
    trainer.train(200, progress=False)
    return trainer


def test_the_context_decides_what_is_sampled_and_guidance_sharpens_it(trained, embeddings):
    want = np.arange(64) % K
    ddim = fd.DDIM(trained.schedule, steps=20)
    plain = ddim.sample(trained, (64, 1, 4, 4), seed=1, context=embeddings[want])
    guided = ddim.sample(trained, (64, 1, 4, 4), seed=1, context=embeddings[want], guidance_scale=3.0)
    acc_plain = np.mean(quadrant_of(plain) == want)
    acc_guided = np.mean(quadrant_of(guided) == want)
    print(f"context-conditional accuracy {acc_plain:.1%}, with guidance s=3 {acc_guided:.1%}")
    assert acc_plain >= 0.8 and acc_guided >= 0.9, (acc_plain, acc_guided)
    # With the learned null context (no context given) the model draws every class.
    counts = np.bincount(quadrant_of(ddim.sample(trained, (64, 1, 4, 4), seed=1)), minlength=K)
    assert (counts > 0).sum() >= 3, counts


def test_guidance_scale_one_is_plain_conditional_sampling(trained, embeddings):
    c = embeddings[[0, 3, 1]]
    ddim = fd.DDIM(trained.schedule, steps=5)
    a = ddim.sample(trained, (3, 1, 4, 4), seed=2, context=c)
    b = ddim.sample(trained, (3, 1, 4, 4), seed=2, context=c, guidance_scale=1.0)
    np.testing.assert_array_equal(a, b)


def test_guided_prediction_is_the_cfg_combination_of_two_model_calls(trained, embeddings):
    """One DDIM step from x_T with s = 2.5 equals the step computed by hand from
    ε_u + s (ε_c − ε_u), ε_c with the context and ε_u with the null context (no context)."""
    model = trained.ema_model()
    schedule = trained.schedule
    ddim = fd.DDIM(schedule, steps=1)
    t = int(ddim.timesteps[0])
    x = fd.randn((4, 1, 4, 4), 3)
    c = embeddings[[2, 2, 0, 1]]
    eps_c = model(x, t, context=c)
    eps_u = model(x, t)
    eps = eps_u + 2.5 * (eps_c - eps_u)
    want = ddim.step(eps, t, x).prev_sample
    got = ddim.sample(model, x_T=x, context=c, guidance_scale=2.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_context_model_trains_resumes_and_pickles(tmp_path, embeddings):
    x, y = quadrant_data(32, seed=1)
    ctx = embeddings[y]

    def fresh():
        return fd.Trainer(
            small_unet(base_channels=8, seed=3),
            fd.Schedule.linear(100),
            x,
            context=ctx,
            batch_size=8,
            class_dropout=0.2,
            seed=5,
        )

    full = fresh()
    full.train(6, progress=False)
    half = fresh()
    half.train(3, progress=False)
    half.save(tmp_path / "run")
    resumed = fd.Trainer.resume(tmp_path / "run", x, context=ctx)
    resumed.train(3, progress=False)
    np.testing.assert_array_equal(resumed.losses, full.losses)
    for k, v in full.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[k], v)
    m = pickle.loads(pickle.dumps(full.model))
    probe = fd.randn((2, 1, 4, 4), 0)
    np.testing.assert_array_equal(m(probe, 5, context=ctx[:2]), full.model(probe, 5, context=ctx[:2]))
    assert "null_context" in full.model.state_dict()


def test_bad_contexts_are_clear_errors(embeddings):
    model = small_unet(base_channels=8)
    x = np.zeros((2, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="context_dim = 8"):
        model(x, 0, context=np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="2 rows but the batch has 3|batch has 2"):
        model(x, 0, context=np.zeros((3, 1, 8), np.float32))
    with pytest.raises(ValueError, match="shape"):
        model(x, 0, context=np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        model(x, 0, context=np.full((2, 1, 8), np.nan, np.float32))
    plain = fd.nn.UNet(image_size=4, channel_mult=(1,), attention_resolutions=(), groups=4)
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, 0, context=np.zeros((2, 1, 8), np.float32))
    ddim = fd.DDIM(fd.Schedule.linear(100), steps=2)
    with pytest.raises(TypeError, match="close over"):
        ddim.sample(lambda x, t: x, (2, 1, 4, 4), context=np.zeros((2, 1, 8), np.float32))
    with pytest.raises(ValueError, match="guidance_scale needs"):
        ddim.sample(model, (2, 1, 4, 4), guidance_scale=2.0)
    both = small_unet(base_channels=8, num_classes=3)
    with pytest.raises(ValueError, match="labels= with context="):
        ddim.sample(both, (2, 1, 4, 4), context=np.zeros((2, 1, 8), np.float32), guidance_scale=2.0)
    data, y = quadrant_data(8)
    with pytest.raises(ValueError, match="no context was given"):
        fd.Trainer(model, fd.Schedule.linear(100), data)
    with pytest.raises(ValueError, match="rows"):
        fd.Trainer(model, fd.Schedule.linear(100), data, context=embeddings[y][:5])
    with pytest.raises(ValueError, match="no cross-attention"):
        fd.Trainer(plain, fd.Schedule.linear(100), data, context=embeddings[y])
