"""The Diffusion Transformer from Python: the factory and its variants, configs, weights and
pickles, training on the bundled digits, sampling with DDIM and classifier-free guidance,
learned variances, cross-attention contexts, and clear errors."""

import pickle

import ferrodiff as fd
import numpy as np
import pytest

# A DiT small enough to train in a second or two: 16 tokens of width 32, two blocks.
TINY = dict(hidden_size=32, depth=2, num_heads=4)


def tiny_dit(**kw):
    args = dict(TINY)
    args.update(kw)
    return fd.nn.DiT(**args)


def perturbed(model, seed=0, std=0.05):
    """The model with every weight moved by small noise (a fresh DiT outputs exact zeros)."""
    rng = np.random.default_rng(seed)
    state = {
        k: v + std * rng.standard_normal(v.shape).astype(np.float32)
        for k, v in sorted(model.state_dict().items())
    }
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def digits():
    return fd.datasets.digits()


@pytest.fixture(scope="module")
def trained(digits):
    """A class-conditional tiny DiT after 300 steps on the digits (label dropout 0.1)."""
    trainer = fd.Trainer(
        tiny_dit(num_classes=10),
        fd.Schedule.cosine(1000),
        digits.data,
        digits.labels,
        batch_size=64,
        lr=2e-3,
        class_dropout=0.1,
        seed=0,
    )
    trainer.train(300, progress=False)
    return trainer


def test_the_defaults_are_dit_xs_2_and_variants_set_the_papers_sizes():
    m = fd.nn.DiT()
    c = m.config
    assert c["type"] == "dit"
    assert (c["patch_size"], c["hidden_size"], c["depth"], c["num_heads"]) == (2, 128, 4, 4)
    assert fd.nn.DiT(variant="DiT-XS/2").config == c
    assert repr(m).startswith("ferrodiff.nn.Model(DiT, data_shape=[1, 8, 8]")
    for name, size in [
        ("DiT-S/2", (2, 384, 12, 6)),
        ("DiT-B/4", (4, 768, 12, 12)),
        ("DiT-L/8", (8, 1024, 24, 16)),
        ("DiT-XL/2", (2, 1152, 28, 16)),
    ]:
        v = fd._core._dit_variant(name)
        assert (v["patch_size"], v["hidden_size"], v["depth"], v["num_heads"]) == size, name
    # DiT-S/2 on 4x32x32 latents with learned variances: the paper's 33M parameters (Table 1;
    # the class table adds 1001 x 384).
    s = fd.nn.DiT(variant="DiT-S/2", in_channels=4, image_size=32, learn_sigma=True)
    assert 32.0e6 < s.num_parameters < 33.5e6, s.num_parameters


def test_a_fresh_dit_outputs_zeros_with_the_learned_variance_channels():
    m = tiny_dit(learn_sigma=True, num_classes=3)
    x = fd.randn((3, 1, 8, 8), 0)
    out = m(x, [0, 500, 999], y=[0, 2, -1])
    assert out.shape == (3, 2, 8, 8) and out.dtype == np.float32
    assert not np.any(out)
    assert m.learn_sigma and m.num_classes == 3 and m.data_shape == [1, 8, 8]


def test_config_save_load_pickle_and_state_dict_round_trip(tmp_path):
    m = perturbed(tiny_dit(num_classes=4, mlp_ratio=2.0, learn_sigma=True))
    x = fd.randn((4, 1, 8, 8), 1)
    y = [0, 1, 3, -1]
    ref = m(x, [3, 30, 300, 900], y=y)
    assert np.abs(ref).max() > 0
    m.save(tmp_path / "dit.safetensors")
    for other in (fd.nn.Model.load(tmp_path / "dit.safetensors"), pickle.loads(pickle.dumps(m))):
        assert other.config == m.config
        np.testing.assert_array_equal(other(x, [3, 30, 300, 900], y=y), ref)
    fresh = fd.nn.Model(m.config, seed=7)
    fresh.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(fresh(x, [3, 30, 300, 900], y=y), ref)
    names = m.state_dict().keys()
    assert "transformer_blocks.1.attn1.to_q.weight" in names and "proj_out_2.weight" in names


def test_the_trainer_lowers_the_loss_of_a_dit_on_digits(trained):
    losses = np.asarray(trained.losses)
    assert np.all(np.isfinite(losses))
    first, last = losses[:30].mean(), losses[-30:].mean()
    assert last < 0.6 * first, (first, last)


def test_ddim_samples_with_and_without_guidance(trained):
    model = trained.ema_model()
    ddim = fd.DDIM(trained.schedule, steps=10)
    labels = np.arange(6) % 3
    plain = ddim.sample(trained, (6, 1, 8, 8), seed=1, labels=labels)
    guided = ddim.sample(trained, (6, 1, 8, 8), seed=1, labels=labels, guidance_scale=4.0)
    for x in (plain, guided):
        assert x.shape == (6, 1, 8, 8) and np.all(np.isfinite(x))
    assert not np.allclose(plain, guided)
    np.testing.assert_array_equal(
        ddim.sample(model, (6, 1, 8, 8), seed=1, labels=labels, guidance_scale=1.0),
        ddim.sample(model, (6, 1, 8, 8), seed=1, labels=labels),
    )


def test_guided_prediction_is_the_cfg_combination_of_conditional_and_null_class_calls(trained):
    model = trained.ema_model()
    ddim = fd.DDIM(trained.schedule, steps=1)
    t = int(ddim.timesteps[0])
    x = fd.randn((4, 1, 8, 8), 3)
    y = np.array([1, 4, 7, 9])
    eps_c, eps_u = model(x, t, y=y), model(x, t, y=-np.ones(4, np.int64))
    want = ddim.step(eps_u + 3.0 * (eps_c - eps_u), t, x).prev_sample
    got = ddim.sample(model, x_T=x, labels=y, guidance_scale=3.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_learned_variances_train_with_the_hybrid_loss_and_drive_the_samplers_that_use_them(digits):
    schedule = fd.Schedule.linear(1000)
    trainer = fd.Trainer(
        tiny_dit(learn_sigma=True, num_classes=10),
        schedule,
        digits.data[:256],
        digits.labels[:256],
        batch_size=32,
        loss="hybrid",
        class_dropout=0.1,
        seed=1,
    )
    trainer.train(20, progress=False)
    assert np.all(np.isfinite(trainer.losses))
    model = trainer.model
    out = model(digits.data[:2], [10, 900], y=[1, 2])
    assert out.shape == (2, 2, 8, 8) and np.abs(out[:, 1]).max() > 0
    labels = np.arange(4)
    ddpm = fd.DDPM(schedule, steps=20, variance="learned_range")
    for sampler in (ddpm, fd.DDIM(schedule, steps=10)):
        x = sampler.sample(model, (4, 1, 8, 8), seed=0, labels=labels, guidance_scale=2.0)
        assert x.shape == (4, 1, 8, 8) and np.all(np.isfinite(x))
    bpd = fd.likelihood.bits_per_dim(
        model, schedule, digits.data[:4], variance="learned_range", labels=labels
    )
    assert np.isfinite(bpd.total).all() and (bpd.total > 0).all()


def test_a_context_dit_trains_and_samples_with_the_null_context(digits):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((10, 2, 6)).astype(np.float32)  # one 2-token context per digit
    data, labels = digits.data[:128], digits.labels[:128]
    trainer = fd.Trainer(
        tiny_dit(context_dim=6),
        fd.Schedule.linear(1000),
        data,
        context=table[labels],
        batch_size=32,
        class_dropout=0.2,
        seed=0,
    )
    trainer.train(10, progress=False)
    model = perturbed(trainer.model, seed=2)
    x = fd.randn((3, 1, 8, 8), 0)
    with_ctx = model(x, 100, context=table[:3])
    assert not np.allclose(with_ctx, model(x, 100))
    ddim = fd.DDIM(trainer.schedule, steps=5)
    s = ddim.sample(model, (3, 1, 8, 8), seed=0, context=table[:3], guidance_scale=2.0)
    assert s.shape == (3, 1, 8, 8) and np.all(np.isfinite(s))


def test_bad_configs_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="image_size 9 is not divisible by patch_size 2"):
        fd.nn.DiT(image_size=9)
    with pytest.raises(ValueError, match="num_heads = 3 must divide hidden_size = 32"):
        fd.nn.DiT(hidden_size=32, num_heads=3)
    with pytest.raises(ValueError, match="multiple of 4"):
        fd.nn.DiT(hidden_size=6, num_heads=2)
    with pytest.raises(ValueError, match="sets patch_size, hidden_size, depth and num_heads"):
        fd.nn.DiT(variant="DiT-S/2", depth=3)
    with pytest.raises(ValueError, match='unknown DiT variant "DiT-M/2"'):
        fd.nn.DiT(variant="DiT-M/2")
    with pytest.raises(ValueError, match="invalid model config"):
        fd.nn.Model({"type": "dit", "patch": 2})
    m = tiny_dit(num_classes=3)
    with pytest.raises(ValueError, match=r"\[2, 3, 8, 8\].*\[B, 1, 8, 8\]"):
        m(np.zeros((2, 3, 8, 8), np.float32), 0)
    with pytest.raises(ValueError, match="image_size = 8"):
        m(np.zeros((2, 1, 4, 4), np.float32), 0)
    with pytest.raises(ValueError, match="label 5 is out of range"):
        m(np.zeros((2, 1, 8, 8), np.float32), 0, y=[0, 5])
    with pytest.raises(ValueError, match="no cross-attention"):
        m(np.zeros((2, 1, 8, 8), np.float32), 0, context=np.zeros((2, 1, 4), np.float32))


def test_the_command_line_trains_and_samples_a_dit(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "ferrodiff", *map(str, args)], capture_output=True, text=True, check=False
        )

    r = run(
        "train", "--data", "digits", "--model", "dit", "--conditional", "--steps", "5", "--batch-size", "16",
        "--out", tmp_path / "run", "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    model = fd.nn.Model.load(tmp_path / "run")
    assert model.config["type"] == "dit" and model.num_classes == 10
    r = run("sample", "--checkpoint", tmp_path / "run", "--sampler", "ddim", "--steps", "4", "--n", "3",
            "--out", tmp_path / "x.npy")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "x.npy").shape == (3, 1, 8, 8)
    r = run("train", "--data", "moons", "--model", "dit", "--steps", "1", "--out", tmp_path / "moons")
    assert r.returncode != 0 and "--model dit needs square images" in r.stderr


def test_candles_reference_ops_compute_what_the_kernels_do(tmp_path, digits):
    """FERRODIFF_REFERENCE_KERNELS=1 (what other devices and dtypes run: candle's own ops) gives
    the same outputs and the same first training losses as the fused CPU kernels."""
    import subprocess
    import sys
    import textwrap

    model = perturbed(tiny_dit(num_classes=10, context_dim=3, learn_sigma=True), seed=4)
    model.save(tmp_path / "m.safetensors")
    np.save(tmp_path / "data.npy", digits.data[:64])
    np.save(tmp_path / "labels.npy", digits.labels[:64])
    script = textwrap.dedent(
        f"""
        import numpy as np, ferrodiff as fd
        m = fd.nn.Model.load({str(tmp_path / "m.safetensors")!r})
        x = fd.randn((3, 1, 8, 8), 5)
        ctx = np.linspace(-1, 1, 3 * 2 * 3, dtype=np.float32).reshape(3, 2, 3)
        out = m(x, [5, 50, 500], y=[1, -1, 7], context=ctx)
        t = fd.Trainer(m, fd.Schedule.linear(1000), np.load({str(tmp_path / "data.npy")!r}),
                       np.load({str(tmp_path / "labels.npy")!r}), context=np.tile(ctx[:1], (64, 1, 1)),
                       batch_size=16, loss="hybrid", class_dropout=0.2, seed=2)
        t.train(3, progress=False)
        np.save({str(tmp_path / "{}.npy")!r}.format(__import__("os").environ.get("TAG")),
                np.concatenate([out.ravel(), np.asarray(t.losses, np.float32)]))
        """
    )
    import os

    for tag, flag in (("kernels", "0"), ("reference", "1")):
        env = dict(os.environ, FERRODIFF_REFERENCE_KERNELS=flag, TAG=tag)
        r = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
        )
        assert r.returncode == 0, r.stderr
    ours, reference = np.load(tmp_path / "kernels.npy"), np.load(tmp_path / "reference.npy")
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)
