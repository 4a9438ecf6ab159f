"""Latent diffusion from Python: the KL and VQ autoencoders (posterior, codes, codebook usage), the
autoencoder objective recomputed in numpy step by step (L1 / L2 + KL per pixel, codebook and
commitment terms, the EMA codebook and dead-code restarts), exact resume, `fd.LatentDiffusion`
(scaling factor, sampling, editing in pixel space, save / load), super-resolution U-Nets with
their objective, and `fd.Cascade`.

Every model is tiny (two levels of width 8 on 8x8 images, 2 latent channels) so the file runs in
seconds; one session fixture trains a KL autoencoder on digits for a few seconds."""

import pickle

import numpy as np
import pytest

import ferrodiff as fd

N = 6  # images per batch: every objective test trains on the whole batch (batch_size=N)
PIXELS = 64  # values per 1x8x8 image, the unit of the per-pixel loss
K = 8  # codebook entries of the VQ models


def kl_autoencoder(seed=0, **kw):
    return fd.nn.AutoencoderKL(
        image_size=8, block_out_channels=(8, 8), norm_num_groups=4, latent_channels=2, seed=seed, **kw
    )


def vq_autoencoder(seed=0, **kw):
    return fd.nn.VQModel(
        image_size=8,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        latent_channels=2,
        num_vq_embeddings=K,
        seed=seed,
        **kw,
    )


def unet(in_channels=1, image_size=8, **kw):
    return fd.nn.UNet(
        in_channels=in_channels,
        image_size=image_size,
        base_channels=8,
        channel_mult=(1,),
        attention_resolutions=(),
        groups=4,
        **kw,
    )


def randomized(model, seed=0, scale=0.3):
    """`model` with every weight drawn from N(0, scale²): an untrained U-Net's zero-initialised
    output layer predicts 0 whatever its inputs, which would make comparisons of outputs vacuous."""
    rng = np.random.default_rng(seed)
    model.load_state_dict(
        {
            k: (scale * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in sorted(model.state_dict().items())
        }
    )
    return model


def digits(n=N):
    return fd.datasets.digits(split="train", seed=0).data[:n]


def ae_trainer(model, images, **options):
    return fd.Trainer(
        model, None, images, objective="autoencoder", objective_options=options, batch_size=len(images)
    )


def tokens(z):
    """Latents [B, d, h, w] as the rows [B·h·w, d] that the quantiser assigns, in (b, y, x) order."""
    return z.transpose(0, 2, 3, 1).reshape(-1, z.shape[1]).astype(np.float64)


def nearest(rows, book):
    """Index of the nearest codebook row (squared Euclidean distance) of each row."""
    d2 = ((rows[:, None, :] - np.asarray(book, np.float64)[None]) ** 2).sum(-1)
    return d2.argmin(1)


def codebook(model):
    return model.state_dict()["quantize.embedding.weight"]


@pytest.fixture(scope="session")
def trained_kl():
    """A KL autoencoder trained 300 steps on 256 digits (a few seconds), and those digits."""
    x = digits(256)
    ae = kl_autoencoder()
    untrained_psnr = fd.metrics.psnr(ae.reconstruct(x), x)
    fd.Trainer(ae, None, x, objective="autoencoder", batch_size=32, lr=3e-3).train(300, progress=False)
    return ae, x, untrained_psnr


# -- the autoencoders -----------------------------------------------------------------------------


def test_kl_encode_decode_shapes_and_reconstruct_is_decode_of_the_posterior_mean():
    ae, x = kl_autoencoder(), digits()
    assert ae.latent_shape() == [2, 4, 4] and ae.latent_shape(16) == [2, 8, 8]
    z = ae.encode(x)
    assert z.shape == (N, *ae.latent_shape()) and z.dtype == np.float32
    assert ae.decode(z).shape == x.shape
    np.testing.assert_array_equal(ae.reconstruct(x), ae.decode(z))
    # Any side divisible by f = 2 works, not only the training size.
    assert ae.encode(np.zeros((1, 1, 6, 6), np.float32)).shape == (1, 2, 3, 3)
    with pytest.raises(ValueError, match="multiple of the downsampling factor 2"):
        ae.latent_shape(7)


def test_kl_posterior_samples_are_seeded_per_row_and_average_to_the_posterior_mean():
    ae, x = kl_autoencoder(), digits()
    mean = ae.encode(x).astype(np.float64)
    a = ae.encode(x, sample=True, seed=3)
    np.testing.assert_array_equal(a, ae.encode(x, sample=True, seed=3))
    assert np.abs(a - ae.encode(x, sample=True, seed=4)).min() > 0
    # Row i's noise depends only on (seed, i): a prefix of the batch draws the same samples.
    np.testing.assert_array_equal(ae.encode(x[:2], sample=True, seed=3), a[:2])
    # S copies of the batch in one call draw S independent samples of each posterior.
    S = 500
    z = ae.encode(np.tile(x, (S, 1, 1, 1)), sample=True, seed=7).reshape(S, *mean.shape).astype(np.float64)
    sd = z.std(axis=0)
    assert (sd > 0).all()
    # The sample mean lies within 5 standard errors σ/√S of the posterior mean in every entry.
    assert (np.abs(z.mean(axis=0) - mean) < 5 * sd / np.sqrt(S)).all()


@pytest.mark.parametrize("reconstruction", ["l1", "l2"])
def test_kl_objective_first_loss_is_the_reconstruction_error_plus_kl_weight_times_kl_per_pixel(
    reconstruction,
):
    x = digits()
    error = kl_autoencoder().reconstruct(x) - x
    expected = np.abs(error).mean() if reconstruction == "l1" else (error.astype(np.float64) ** 2).mean()
    options = dict(reconstruction=reconstruction, sample_posterior=False)
    plain = ae_trainer(kl_autoencoder(), x, kl_weight=0.0, **options)
    plain.train(1, progress=False)
    np.testing.assert_allclose(plain.losses[0], expected, rtol=1e-5)
    np.testing.assert_allclose(plain.objective_metrics["reconstruction"], expected, rtol=1e-5)
    # The KL enters as kl_weight × (KL summed over a sample's latents) / (values per image).
    weighted = ae_trainer(kl_autoencoder(), x, kl_weight=0.5, **options)
    weighted.train(1, progress=False)
    kl = weighted.objective_metrics["kl"]
    assert kl == pytest.approx(plain.objective_metrics["kl"], rel=1e-6)
    np.testing.assert_allclose(weighted.losses[0] - plain.losses[0], 0.5 * kl / PIXELS, rtol=1e-4)


def test_kl_metric_is_the_closed_form_kl_of_the_posterior_moments_estimated_by_sampling():
    x = digits()
    ae = kl_autoencoder()
    mean = ae.encode(x).astype(np.float64)
    S = 2000
    z = ae.encode(np.tile(x, (S, 1, 1, 1)), sample=True, seed=11).reshape(S, *mean.shape).astype(np.float64)
    var = ((z - mean) ** 2).mean(axis=0)  # unbiased for σ², relative sd √(2/S)
    # KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²), summed per image, mean over the batch.
    kl = 0.5 * (mean**2 + var - 1 - np.log(var))
    estimate = kl.reshape(N, -1).sum(1).mean()
    # Error of ½(v − 1 − log v) at v̂ = v(1 + δ), δ ~ N(0, 2/S): ½(v − 1)δ to first order, plus a
    # bias of about 1/(2S) per entry from E[log v̂] ≈ log v − 1/S.
    sd = np.sqrt((0.5 * np.abs(var - 1)) ** 2 * 2 / S).reshape(N, -1)
    tol = 5 * np.sqrt((sd**2).sum()) / N + kl[0].size / (2 * S)
    t = ae_trainer(ae, x, sample_posterior=False)
    t.train(1, progress=False)
    assert abs(t.objective_metrics["kl"] - estimate) < tol, (t.objective_metrics["kl"], estimate, tol)


def test_vq_codes_are_nearest_codebook_entries_and_usage_is_exp_entropy_of_their_histogram():
    vq, x = vq_autoencoder(), digits()
    z = vq.encode(x)
    assert z.shape == (N, *vq.latent_shape()) == (N, 2, 4, 4)
    book = codebook(vq)
    assert book.shape == (K, 2)
    codes = nearest(tokens(z), book)
    got = vq.codes(x)
    assert got.shape == (N, 4, 4) and got.dtype == np.int64
    np.testing.assert_array_equal(got.ravel(), codes)
    p = np.bincount(codes, minlength=K) / codes.size
    usage = vq.codebook_usage(x)
    assert usage["num_codes"] == K and usage["codes_used"] == (p > 0).sum()
    assert usage["perplexity"] == pytest.approx(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), rel=1e-9)
    # decode quantises first: decoding z is decoding its nearest codebook vectors.
    e = book[codes].reshape(N, 4, 4, 2).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(vq.decode(z), vq.decode(np.ascontiguousarray(e, dtype=np.float32)))
    np.testing.assert_array_equal(vq.reconstruct(x), vq.decode(z))


def test_vq_objective_first_loss_is_reconstruction_plus_codebook_and_commitment_terms():
    x = digits()
    vq = vq_autoencoder()
    z = vq.encode(x)
    book = codebook(vq)
    e = book[nearest(tokens(z), book)]
    squared = ((tokens(z) - e) ** 2).mean()  # ‖z − e‖², mean over latent values
    recon = np.abs(vq.reconstruct(x) - x).mean()
    t = ae_trainer(vq, x, commitment=0.25)
    t.train(1, progress=False)
    # Codebook loss ‖sg[z] − e‖² plus β‖z − sg[e]‖², both equal to `squared` in value.
    np.testing.assert_allclose(t.losses[0], recon + 1.25 * squared, rtol=1e-5)
    np.testing.assert_allclose(t.objective_metrics["commitment"], squared, rtol=1e-5)
    # With the EMA codebook the codebook loss leaves the loss.
    ema = ae_trainer(vq_autoencoder(), x, commitment=0.25, codebook_update="ema")
    ema.train(1, progress=False)
    np.testing.assert_allclose(ema.losses[0], recon + 0.25 * squared, rtol=1e-5)


def test_vq_ema_step_sets_the_codebook_to_laplace_smoothed_cluster_means():
    x, gamma, eps = digits(), 0.9, 1e-5
    vq = vq_autoencoder()
    rows = tokens(vq.encode(x))
    book0 = codebook(vq).astype(np.float64)
    codes = nearest(rows, book0)
    counts = np.bincount(codes, minlength=K).astype(np.float64)
    sums = np.zeros_like(book0)
    np.add.at(sums, codes, rows)
    # Razavi et al. 2019: N ← γN + (1 − γ)n, m ← γm + (1 − γ)Σz, e = m / Ñ, with the usage counts
    # starting at 1 (as if each code were used once), the sums at the initial codebook, Ñ
    # Laplace-smoothed.
    cluster = gamma * 1.0 + (1 - gamma) * counts
    embed_sum = gamma * book0 + (1 - gamma) * sums
    total = cluster.sum()
    smoothed = (cluster + eps) / (total + K * eps) * total
    expected = embed_sum / smoothed[:, None]
    t = ae_trainer(vq, x, codebook_update="ema", ema_decay=gamma)
    t.train(1, progress=False)
    np.testing.assert_allclose(codebook(t.model), expected, rtol=2e-5, atol=1e-6)
    assert t.objective_metrics["restarted"] == 0
    p = counts / counts.sum()
    assert t.objective_metrics["codes_used"] == (counts > 0).sum()
    assert t.objective_metrics["perplexity"] == pytest.approx(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))


def test_ema_codebook_keeps_unused_codes_at_the_scale_of_the_encoder_outputs():
    x = digits()
    vq = vq_autoencoder()
    scale = max(np.abs(vq.encode(x)).max(), np.abs(codebook(vq)).max())
    t = ae_trainer(vq, x, codebook_update="ema")  # the default decay 0.99, no restarts
    t.train(1, progress=False)
    assert np.abs(codebook(t.model)).max() < 10 * scale


def test_dead_codes_restart_to_encoder_outputs_of_the_batch_once_the_usage_counts_are_warm():
    # γ = 0.5: the counts are warm after 1 / (1 − γ) = 2 steps, so step 0 restarts nothing and
    # step 1 restarts every code (every EMA usage is below the threshold 1e9).
    x = digits()
    vq = vq_autoencoder()
    t = ae_trainer(vq, x, codebook_update="ema", ema_decay=0.5, dead_code_threshold=1e9)
    before = vq.codebook_usage(x)["codes_used"]
    t.train(1, progress=False)
    assert t.objective_metrics["restarted"] == 0
    rows = tokens(t.model.encode(x))  # the encoder outputs step 1 sees
    t.train(1, progress=False)
    assert t.objective_metrics["restarted"] == K
    book = codebook(t.model).astype(np.float64)
    distance = np.sqrt(((book[:, None] - rows[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(distance, 0.0, atol=1e-5)
    assert before < K and t.model.codebook_usage(x)["codes_used"] > before


@pytest.mark.parametrize(
    ("make", "options"),
    [
        (kl_autoencoder, {"sample_posterior": True, "kl_weight": 0.01}),
        (vq_autoencoder, {"codebook_update": "ema", "ema_decay": 0.5, "dead_code_threshold": 0.5}),
        # The discriminator joins at step 1, inside the first half: its weights and Adam moments
        # must come back from the checkpoint.
        (kl_autoencoder, {"disc_weight": 0.5, "disc_start": 1, "disc_layers": 1, "disc_channels": 4}),
    ],
    ids=["kl-sampled-posterior", "vq-ema-restarts", "kl-adversarial"],
)
def test_autoencoder_training_resumed_from_a_checkpoint_is_exact(make, options, tmp_path):
    x = digits(12)
    kw = dict(objective="autoencoder", objective_options=options, batch_size=4, seed=5)
    straight = fd.Trainer(make(), None, x, **kw)
    straight.train(4, progress=False)
    first = fd.Trainer(make(), None, x, **kw)
    first.train(2, progress=False)
    if "dead_code_threshold" in options:
        assert first.objective_metrics["restarted"] > 0  # the run does restart codes
    first.save(tmp_path / "run")
    resumed = fd.Trainer.resume(tmp_path / "run", x)
    resumed.train(2, progress=False)
    np.testing.assert_array_equal(straight.losses, resumed.losses)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert straight.objective_metrics == resumed.objective_metrics


def test_adversarial_term_reports_from_disc_start_and_resumes_with_its_discriminator(tmp_path):
    x = digits(12)
    options = {"disc_weight": 0.5, "disc_start": 2, "disc_layers": 1, "disc_channels": 4}
    t = fd.Trainer(
        kl_autoencoder(), None, x, objective="autoencoder", objective_options=options, batch_size=4
    )
    t.train(2, progress=False)
    assert t.objective_metrics["adversarial"] is None and t.objective_metrics["disc_loss"] is None
    t.train(1, progress=False)
    m = t.objective_metrics
    assert m["adversarial_weight"] > 0 and np.isfinite(m["adversarial"])
    # The hinge loss of a discriminator whose logits start near 0 is near 1.
    assert 0.0 <= m["disc_loss"] < 2.0 and np.isfinite(m["logits_real"]) and np.isfinite(m["logits_fake"])
    # The run's settings (and so the discriminator) come back with the checkpoint.
    t.save(tmp_path / "adv")
    resumed = fd.Trainer.resume(tmp_path / "adv", x)
    resumed.train(1, progress=False)
    assert resumed.step == 4 and resumed.objective_metrics["disc_loss"] is not None


def test_trained_autoencoder_reconstructs_digits_with_higher_psnr(trained_kl):
    ae, x, untrained_psnr = trained_kl
    r = ae.reconstruct(x)
    mse = ((r.astype(np.float64) - x) ** 2).reshape(len(x), -1).mean(1)
    psnr = fd.metrics.psnr(r, x)
    assert psnr == pytest.approx(np.mean(10 * np.log10(2.0**2 / mse)), rel=1e-9)
    assert psnr > untrained_psnr + 6.0, (psnr, untrained_psnr)


def test_autoencoder_bad_inputs_are_refused():
    ae, vq, x = kl_autoencoder(), vq_autoencoder(), digits()
    with pytest.raises(ValueError, match="multiples of its downsampling factor 2"):
        ae.encode(np.zeros((1, 1, 7, 7), np.float32))
    with pytest.raises(ValueError, match=r"takes \[B, 1, H, W\]"):
        ae.encode(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="images contain a non-finite value at flat index 5"):
        bad = x.copy()
        bad.reshape(-1)[5] = np.inf
        ae.encode(bad)
    with pytest.raises(ValueError, match="latents contain a non-finite value at flat index 0"):
        ae.decode(np.full((1, 2, 4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"decodes \[B, 2, h, w\]"):
        ae.decode(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="deterministic: sample=False"):
        vq.encode(x, sample=True)
    with pytest.raises(ValueError, match="need a VQ autoencoder"):
        ae.codes(x)
    with pytest.raises(ValueError, match="must divide every level's channels"):
        fd.nn.AutoencoderKL(image_size=8, block_out_channels=(8, 8), norm_num_groups=3)
    with pytest.raises(ValueError, match="image_size 6 must be divisible by the downsampling factor f = 4"):
        fd.nn.AutoencoderKL(image_size=6, block_out_channels=(8, 8, 8), norm_num_groups=4)
    with pytest.raises(ValueError, match="objective='autoencoder' trains an autoencoder"):
        fd.Trainer(unet(), None, x, objective="autoencoder")
    with pytest.raises(ValueError, match="an autoencoder trains with objective='autoencoder'"):
        fd.Trainer(ae, fd.Schedule.linear(100), x, objective="diffusion")
    for options, message in [
        ({"reconstruction": "l3"}, "reconstruction must be 'l1' or 'l2'"),
        ({"kl_weight": -1.0}, "kl_weight must be >= 0"),
        ({"codebook_update": "adam"}, "codebook_update must be 'loss' or 'ema'"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \(0, 1\)"),
        ({"dead_code_threshold": -1.0}, "dead_code_threshold must be >= 0"),
        ({"disc_weight": 0.5, "disc_layers": 2}, "at least 12 pixels"),
        ({"disc_weight": 0.5, "disc_channels": 0}, "disc_channels positive"),
        ({"disc_weight": 0.5, "disc_lr": -1.0}, "disc_lr must be positive"),
        ({"disc_wieght": 0.5}, "unknown field"),
    ]:
        with pytest.raises(ValueError, match=message):
            ae_trainer(vq_autoencoder(), x, **options)


def test_autoencoder_weights_and_scaling_factor_survive_save_load_and_pickle(tmp_path):
    x = digits()
    for model in (kl_autoencoder(seed=3), vq_autoencoder(seed=3)):
        scaled = model.with_scaling_factor(2.5)
        assert scaled.config["scaling_factor"] == 2.5 and model.config["scaling_factor"] == 1.0
        path = tmp_path / f"{model.config['kind']}.safetensors"
        scaled.save(path)
        for copy in (fd.nn.Model.load(path), pickle.loads(pickle.dumps(scaled))):
            assert copy.scaling_factor == 2.5
            np.testing.assert_array_equal(copy.encode(x), model.encode(x))
            np.testing.assert_array_equal(copy.reconstruct(x), model.reconstruct(x))
    assert kl_autoencoder(scaling_factor=0.5).scaling_factor == 0.5
    with pytest.raises(ValueError, match="scaling_factor must be positive and finite"):
        kl_autoencoder().with_scaling_factor(0.0)


def test_with_scaling_factor_is_the_scaling_factor_of_the_returned_model():
    assert kl_autoencoder().with_scaling_factor(2.5).scaling_factor == 2.5


# -- LatentDiffusion --------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [kl_autoencoder, vq_autoencoder], ids=["kl", "vq"])
def test_latent_diffusion_scales_latents_and_round_trips_through_save_load(make, tmp_path):
    x = digits()
    ae = make(scaling_factor=0.25)
    den = randomized(unet(in_channels=2, image_size=4))
    ld = fd.LatentDiffusion(ae, den, fd.Schedule.cosine(100))
    assert ld.scaling_factor == 0.25 and ld.latent_shape == (2, 4, 4)
    np.testing.assert_array_equal(ld.encode(x), ae.encode(x) * np.float32(0.25))
    np.testing.assert_allclose(ld.decode(ld.encode(x)), ae.reconstruct(x), atol=1e-5)
    with pytest.raises(ValueError, match=r"latents have shape \(6, 2, 8, 8\)"):
        ld.decode(np.zeros((N, 2, 8, 8), np.float32))
    back = fd.LatentDiffusion.load(ld.save(tmp_path / "ld"))
    assert back.scaling_factor == 0.25 and back.latent_shape == (2, 4, 4)
    np.testing.assert_array_equal(back.encode(x), ld.encode(x))
    prediction = den(ld.encode(x), np.arange(N))
    assert np.abs(prediction).max() > 0
    np.testing.assert_array_equal(back.denoiser(ld.encode(x), np.arange(N)), prediction)
    np.testing.assert_array_equal(back.schedule.alphas_cumprod, ld.schedule.alphas_cumprod)
    with pytest.raises(FileNotFoundError, match="not a saved LatentDiffusion"):
        fd.LatentDiffusion.load(tmp_path)


def test_fit_scaling_factor_is_one_over_the_std_of_the_latents_and_is_saved(tmp_path):
    x = digits(32)
    ae = kl_autoencoder()
    ld = fd.LatentDiffusion(ae, unet(in_channels=2, image_size=4), fd.Schedule.cosine(100))
    s = ld.fit_scaling_factor(x)
    assert s == pytest.approx(1 / np.std(ae.encode(x).astype(np.float64)), rel=1e-5)
    assert ld.scaling_factor == s and ld.autoencoder.scaling_factor == s
    np.testing.assert_allclose(ld.encode(x), ae.encode(x) * s, rtol=1e-6)
    np.testing.assert_allclose(ld.decode(ld.encode(x)), ae.reconstruct(x), atol=1e-5)
    assert fd.LatentDiffusion.load(ld.save(tmp_path / "ld")).scaling_factor == pytest.approx(s)
    # A given factor wins over the fitted one.
    given = fd.LatentDiffusion(
        ae, unet(in_channels=2, image_size=4), fd.Schedule.cosine(100), scaling_factor=3.0
    )
    assert given.scaling_factor == 3.0


def test_latent_diffusion_refuses_models_that_do_not_fit():
    ae, sch = kl_autoencoder(), fd.Schedule.cosine(100)
    with pytest.raises(
        ValueError, match=r"latents have shape \[2, 4, 4\]: build it with in_channels=2, image_size=4"
    ):
        fd.LatentDiffusion(ae, unet(in_channels=1, image_size=8), sch)
    with pytest.raises(TypeError, match="autoencoder must be an fd.nn.AutoencoderKL or fd.nn.VQModel"):
        fd.LatentDiffusion(unet(in_channels=2, image_size=4), unet(in_channels=2, image_size=4), sch)
    with pytest.raises(TypeError, match="denoiser is an autoencoder"):
        fd.LatentDiffusion(ae, vq_autoencoder(), sch)
    with pytest.raises(TypeError, match="schedule must be an fd.Schedule"):
        fd.LatentDiffusion(ae, unet(in_channels=2, image_size=4), "cosine")
    ld = fd.LatentDiffusion(ae, unet(in_channels=2, image_size=4), sch)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        ld.sample(fd.DDIM(sch, steps=2), 0)


def test_latent_diffusion_trains_on_latents_and_samples_decoded_images(trained_kl):
    ae, x, _ = trained_kl
    labels = fd.datasets.digits(split="train", seed=0).labels[:256]
    sch = fd.Schedule.cosine(100)
    ld = fd.LatentDiffusion(ae, unet(in_channels=2, image_size=4, num_classes=10), sch, scaling_factor=1.0)
    t = ld.train(x, labels, steps=5, progress=False, batch_size=32, class_dropout=0.1)
    assert t.step == 5 and np.isfinite(t.losses).all()
    sampler = fd.DDIM(sch, steps=3)
    images, latents = ld.sample(
        sampler, 4, labels=[0, 1, 2, 3], guidance_scale=2.0, seed=1, return_latents=True
    )
    assert images.shape == (4, 1, 8, 8) and latents.shape == (4, 2, 4, 4)
    direct = sampler.sample(ld.denoiser, (4, 2, 4, 4), labels=[0, 1, 2, 3], guidance_scale=2.0, seed=1)
    np.testing.assert_array_equal(latents, direct)
    np.testing.assert_array_equal(images, ld.decode(latents))


def test_latent_diffusion_edits_in_pixel_space_and_inpainting_keeps_the_masked_latents():
    ae, x, sch = kl_autoencoder(), digits(2), fd.Schedule.cosine(100)
    ld = fd.LatentDiffusion(ae, randomized(unet(in_channels=2, image_size=4)), sch, scaling_factor=1.0)
    sampler = fd.DDIM(sch, steps=3)
    known = ld.encode(x)
    edited = ld.sample(sampler, 2, image=x, strength=0.5, seed=2)
    np.testing.assert_array_equal(
        edited, ld.decode(sampler.sample(ld.denoiser, image=known, strength=0.5, seed=2))
    )
    # mask = 1 keeps the image: a full mask returns the image's latents, a left-half pixel mask
    # the left half of the latent columns.
    _, kept = ld.sample(sampler, 2, image=x, mask=np.ones((8, 8)), seed=2, return_latents=True)
    np.testing.assert_allclose(kept, known, atol=1e-6)
    half = np.zeros((8, 8), np.float32)
    half[:, :4] = 1
    _, z = ld.sample(sampler, 2, image=x, mask=half, seed=2, return_latents=True)
    np.testing.assert_allclose(z[..., :2], known[..., :2], atol=1e-6)
    assert np.abs(z[..., 2:] - known[..., 2:]).max() > 1e-3


# -- super-resolution and cascades ------------------------------------------------------------------


def sr_unet(**kw):
    return unet(in_channels=1, image_size=8, cond_channels=1, **kw)


def test_super_resolution_models_and_objective_refuse_what_does_not_fit():
    x, sch = digits(8), fd.Schedule.cosine(100)
    sr = sr_unet(aug_embed=True)
    with pytest.raises(ValueError, match="conditioned on a low-resolution image"):
        sr(x, np.zeros(len(x), np.int64))
    low = fd.datasets.resize(x, 4, method="area")
    for level in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"aug_level must lie in \[0, 1\]"):
            sr.with_low_res(low, level)
    with pytest.raises(ValueError, match="no augmentation embedding"):
        sr_unet().with_low_res(low, 0.3)
    with pytest.raises(ValueError, match="larger than the model's resolution 8"):
        sr.with_low_res(digits(2).repeat(2, axis=2).repeat(2, axis=3), 0.0)
    with pytest.raises(ValueError, match="takes no conditioning image"):
        unet().with_low_res(low, 0.0)
    with pytest.raises(ValueError, match="upsample must be 'nearest' or 'bilinear'"):
        sr.with_low_res(low, 0.0, upsample="bicubic")
    with pytest.raises(ValueError, match="cond_channels must equal in_channels"):
        fd.Trainer(unet(), sch, x, objective="super_resolution")
    with pytest.raises(ValueError, match="needs a U-Net with aug_embed=True"):
        fd.Trainer(sr_unet(), sch, x, objective="super_resolution", objective_options={"max_aug_level": 0.5})
    for options, message in [
        ({"factor": 1}, "factor must be at least 2"),
        ({"factor": 3}, "do not divide by the factor 3"),
        ({"max_aug_level": 1.5}, r"max_aug_level must lie in \[0, 1\]"),
        ({"blur_prob": 2.0}, r"blur_prob must lie in \[0, 1\]"),
        ({"blur_sigma": [0.6, 0.4]}, "blur_sigma must be"),
        ({"upsample": "cubic"}, "upsample must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            fd.Trainer(sr, sch, x, objective="super_resolution", objective_options=options)
    with pytest.raises(ValueError, match="trains a U-Net built with cond_channels"):
        fd.Trainer(fd.nn.MLP(data_shape=(1, 8, 8)), sch, x, objective="super_resolution")


def test_super_resolution_training_runs_and_conditioning_is_seeded():
    x, sch = digits(16), fd.Schedule.cosine(100)
    sr = randomized(sr_unet(aug_embed=True))
    options = {
        "factor": 2,
        "max_aug_level": 0.5,
        "upsample": "bilinear",
        "blur_prob": 0.5,
        "blur_sigma": [0.4, 0.6],
    }
    t = fd.Trainer(sr, sch, x, objective="super_resolution", objective_options=options, batch_size=8)
    t.train(3, progress=False)
    assert t.step == 3 and np.isfinite(t.losses).all()
    low = fd.datasets.resize(x[:2], 4, method="area")
    np.testing.assert_allclose(low, x[:2].reshape(2, 1, 4, 2, 4, 2).mean(axis=(3, 5)), atol=1e-6)
    xt, ts = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32), np.array([10, 50])
    a = sr.with_low_res(low, 0.3, seed=1)(xt, ts)
    np.testing.assert_array_equal(a, sr.with_low_res(low, 0.3, seed=1)(xt, ts))
    assert np.abs(a - sr.with_low_res(low, 0.3, seed=2)(xt, ts)).max() > 0
    # Without noise the conditioning depends on the images only (a level-0 corruption is none).
    np.testing.assert_array_equal(
        sr.with_low_res(low, 0.0, seed=1)(xt, ts), sr.with_low_res(low, 0.0, add_noise=False)(xt, ts)
    )
    # Row i of a batch takes conditioning image i mod N.
    both = sr.with_low_res(low, 0.0)(np.concatenate([xt, xt]), np.concatenate([ts, ts]))
    np.testing.assert_array_equal(both[2:], both[:2])


def test_cascade_samples_the_base_then_super_resolves_its_output():
    sch = fd.Schedule.cosine(100)
    base, sr = randomized(unet(image_size=4), seed=1), randomized(sr_unet(aug_embed=True), seed=2)
    base_sampler, sr_sampler = fd.DDIM(sch, steps=3), fd.DDIM(sch, steps=2)
    cascade = fd.Cascade(
        [fd.CascadeStage(base, base_sampler), fd.CascadeStage(sr, sr_sampler, aug_level=0.0)]
    )
    low, high = cascade.sample(3, seed=4, return_all=True)
    assert low.shape == (3, 1, 4, 4) and high.shape == (3, 1, 8, 8)
    # Stage i draws with seed + i, and the SR stage is conditioned on the base stage's samples.
    np.testing.assert_array_equal(low, base_sampler.sample(base, (3, 1, 4, 4), seed=4))
    np.testing.assert_array_equal(high, sr_sampler.sample(sr.with_low_res(low, 0.0), (3, 1, 8, 8), seed=5))
    np.testing.assert_array_equal(cascade.sample(3, seed=4), high)
    augmented = fd.Cascade([(base, base_sampler), fd.CascadeStage(sr, sr_sampler, aug_level=0.2)])
    out = augmented.sample(3, seed=4)
    assert out.shape == (3, 1, 8, 8) and np.isfinite(out).all() and np.abs(out - high).max() > 0


def test_truncated_cascade_conditions_on_the_base_sampler_stopped_at_the_augmentation_level():
    sch = fd.Schedule.cosine(100)
    base, sr = randomized(unet(image_size=4), seed=1), randomized(sr_unet(aug_embed=True), seed=2)
    base_sampler, sr_sampler = fd.DDIM(sch, steps=5), fd.DDIM(sch, steps=2)
    s = 0.3
    cascade = fd.Cascade([(base, base_sampler), fd.CascadeStage(sr, sr_sampler, aug_level=s, truncate=True)])
    low, high = cascade.sample(2, seed=0, return_all=True)
    assert low.shape == (2, 1, 4, 4) and high.shape == (2, 1, 8, 8)
    # The base run is stopped at the first x whose timestep has ᾱ closest to cos²(πs/2) or below
    # (Ho et al. 2021, truncated conditioning augmentation); the SR stage takes it at that level.
    ab = np.asarray(sch.alphas_cumprod, np.float64)
    t_stop = int(np.argmin(np.abs(ab - np.cos(np.pi * s / 2) ** 2)))
    steps = [int(t) for t in base_sampler.timesteps]
    xs = []
    base_sampler.sample(base, (2, 1, 4, 4), seed=0, callback=lambda i, t, x, p: xs.append(x.copy()))
    i = next(i for i in range(len(steps) - 1) if steps[i + 1] <= t_stop)
    assert i < len(steps) - 2  # the test stops strictly before the end
    np.testing.assert_array_equal(low, xs[i])
    level = 2 / np.pi * np.arccos(np.sqrt(ab[steps[i + 1]]))
    expected = sr_sampler.sample(sr.with_low_res(low, level, add_noise=False), (2, 1, 8, 8), seed=1)
    np.testing.assert_allclose(high, expected, atol=1e-6)


def test_cascade_refuses_stages_that_are_not_super_resolution_models():
    sch = fd.Schedule.cosine(100)
    base, sampler = unet(image_size=4), fd.DDIM(sch, steps=2)
    with pytest.raises(ValueError, match="stage 1 must be a super-resolution U-Net"):
        fd.Cascade([(base, sampler), (unet(), sampler)])
    with pytest.raises(ValueError, match="needs a base stage and at least one"):
        fd.Cascade([(base, sampler)])
    with pytest.raises(ValueError, match=r"aug_level must lie in \[0, 1\]"):
        fd.Cascade([(base, sampler), fd.CascadeStage(sr_unet(aug_embed=True), sampler, aug_level=2.0)])
    with pytest.raises(ValueError, match="needs a model built with aug_embed=True"):
        fd.Cascade([(base, sampler), fd.CascadeStage(sr_unet(), sampler, aug_level=0.2)])


def test_truncated_cascade_refuses_a_base_sampler_that_is_not_ddpm_or_ddim():
    sampler = fd.DDIM(fd.Schedule.cosine(100), steps=2)
    with pytest.raises(ValueError, match="truncate=True needs a DDPM or DDIM sampler"):
        fd.Cascade(
            [
                (unet(image_size=4), fd.ConsistencySampler(steps=2)),
                fd.CascadeStage(sr_unet(aug_embed=True), sampler, aug_level=0.3, truncate=True),
            ]
        )


def test_efficient_unet_options_survive_pickle_and_train_a_super_resolution_stage():
    kw = dict(
        in_channels=1,
        image_size=8,
        base_channels=8,
        channel_mult=(1, 2),
        attention_resolutions=(),
        groups=4,
        cond_channels=1,
        aug_embed=True,
    )
    efficient = randomized(fd.nn.UNet(num_res_blocks=(1, 2), downsample_first=True, **kw))
    assert efficient.config["num_res_blocks"] == [1, 2] and efficient.config["downsample_first"]
    assert fd.nn.UNet(**kw).config["num_res_blocks"] == 1
    copy = pickle.loads(pickle.dumps(efficient))
    x = digits(4)
    low = fd.datasets.resize(fd.datasets.resize(x, 4, method="area"), 8, method="bilinear")
    t = np.array([10, 200, 500, 900])
    a = efficient.with_low_res(low[:, :, ::2, ::2], 0.1)(x, t)
    np.testing.assert_array_equal(a, copy.with_low_res(low[:, :, ::2, ::2], 0.1)(x, t))
    trainer = fd.Trainer(
        efficient,
        fd.Schedule.cosine(1000),
        digits(12),
        batch_size=4,
        objective="super_resolution",
        objective_options={"factor": 2, "max_aug_level": 0.5},
    )
    trainer.train(3, progress=False)
    assert np.all(np.isfinite(trainer.losses))
    with pytest.raises(ValueError, match="divisible by 4"):
        fd.nn.UNet(num_res_blocks=(1, 2), downsample_first=True, **{**kw, "image_size": 6})
    with pytest.raises(ValueError, match="one positive count per level"):
        fd.nn.UNet(num_res_blocks=(1, 2, 3), **kw)
