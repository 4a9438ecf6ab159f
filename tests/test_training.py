"""Networks, the trainer and checkpoints from Python: shapes, determinism, exact resume, atomic
saves, models as denoisers, and bad input."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import ferrodiff as fd
import numpy as np
import pytest


def ring(n, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 2 * np.pi, n)
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


def small_mlp(**kw):
    return fd.nn.MLP(data_shape=(2,), hidden=32, blocks=2, time_embed_dim=16, **kw)


def small_trainer(model=None, data=None, labels=None, **kw):
    args = dict(batch_size=32, lr=2e-3, seed=3)
    args.update(kw)
    return fd.Trainer(
        model or small_mlp(), fd.Schedule.linear(100), ring(64) if data is None else data, labels, **args
    )


def test_models_map_numpy_to_numpy_with_the_right_shapes():
    x = np.zeros((3, 2), np.float32)
    assert small_mlp()(x, 5).shape == (3, 2)
    assert small_mlp(learn_sigma=True)(x, np.array([1, 2, 3])).shape == (3, 4)
    u = fd.nn.UNet(base_channels=8, groups=4, learn_sigma=True, num_classes=3)
    out = u(np.zeros((2, 1, 8, 8), np.float32), [0, 999], y=[0, -1])
    assert out.shape == (2, 2, 8, 8) and out.dtype == np.float32


def test_the_same_seed_builds_the_same_weights_on_any_call():
    a, b = small_mlp().state_dict(), small_mlp().state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    c = fd.nn.MLP(data_shape=(2,), hidden=32, blocks=2, time_embed_dim=16, seed=1).state_dict()
    assert not np.array_equal(a["proj_in.weight"], c["proj_in.weight"])


def test_model_save_load_pickle_and_state_dict_round_trip(tmp_path):
    m = small_mlp(num_classes=2)
    x = ring(5)
    ref = m(x, 7, y=[0, 1, 0, 1, -1])
    m.save(tmp_path / "m.safetensors")
    for other in (fd.nn.Model.load(tmp_path / "m.safetensors"), pickle.loads(pickle.dumps(m))):
        np.testing.assert_array_equal(other(x, 7, y=[0, 1, 0, 1, -1]), ref)
    fresh = fd.nn.Model(m.config, seed=9)
    fresh.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(fresh(x, 7, y=[0, 1, 0, 1, 2]), ref)


def test_training_is_deterministic_and_lowers_the_loss():
    runs = []
    for _ in range(2):
        t = small_trainer()
        t.train(400, progress=False)
        runs.append((t.losses.copy(), t.model.state_dict()))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert all(np.array_equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    losses = runs[0][0]
    assert losses[-100:].mean() < 0.8 * losses[:100].mean(), (losses[:100].mean(), losses[-100:].mean())


def test_trainer_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    data, labels = ring(64), np.arange(64) % 3
    kw = dict(timestep_sampling="loss_second_moment", class_dropout=0.1, lr_schedule="cosine", total_steps=40)
    full = small_trainer(small_mlp(num_classes=3), data, labels, **kw)
    full.train(40, progress=False)
    part = small_trainer(small_mlp(num_classes=3), data, labels, **kw)
    part.train(17, progress=False, checkpoint=tmp_path / "run", checkpoint_every=5)
    resumed = fd.Trainer.resume(tmp_path / "run", data, labels)
    assert resumed.step == 17
    resumed.train(23, progress=False)
    np.testing.assert_array_equal(resumed.losses, full.losses)
    a, b = resumed.model.state_dict(), full.model.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    ea, eb = resumed.ema_model().state_dict(), full.ema_model().state_dict()
    assert all(np.array_equal(ea[k], eb[k]) for k in ea)


def test_callback_runs_periodically_and_its_exception_stops_training():
    t = small_trainer()
    seen = []
    t.train(10, progress=False, callback=lambda step, loss: seen.append((step, loss)), callback_every=4)
    assert [s for s, _ in seen] == [4, 8]
    assert all(np.isfinite(loss) for _, loss in seen)

    class Stop(Exception):
        pass

    def boom(step, loss):
        raise Stop(step)

    with pytest.raises(Stop):
        t.train(10, progress=False, callback=boom, callback_every=3)
    assert t.step == 12  # the first multiple of 3 after step 10


def test_samplers_run_models_and_trainers_in_rust_with_labels():
    t = small_trainer(small_mlp(num_classes=3), ring(64), np.arange(64) % 3)
    t.train(20, progress=False)
    s = fd.DDIM(t.schedule, steps=10)
    x_tr = s.sample(t, (6, 2), seed=1, labels=[0, 1, 2, 0, 1, 2])
    x_ema = s.sample(t.ema_model(), (6, 2), seed=1, labels=[0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(x_tr, x_ema)
    # The Rust loop equals the same loop driven by a Python callable.
    ema = t.ema_model()

    def python_denoiser(x, tt, y):  # a plain callable, not the model object
        return ema(x, tt, y)

    x_py = s.sample(python_denoiser, (6, 2), seed=1, labels=[0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(x_py, x_ema)
    assert not np.array_equal(s.sample(t.model, (6, 2), seed=1, labels=[0] * 6), x_ema)


def test_bad_inputs_raise_clear_errors(tmp_path):
    m = small_mlp()
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        m(np.zeros((2, 3), np.float32), 0)
    with pytest.raises(ValueError, match="unconditional"):
        m(np.zeros((2, 2), np.float32), 0, y=[0, 1])
    with pytest.raises(ValueError, match="label 5"):
        small_mlp(num_classes=3)(np.zeros((2, 2), np.float32), 0, y=[0, 5])
    with pytest.raises(ValueError, match="invalid model config"):
        fd.nn.Model({"type": "mlp", "hiden": 3})
    with pytest.raises(ValueError, match="groups"):
        fd.nn.UNet(base_channels=12, groups=8)
    with pytest.raises(ValueError, match="configured for samples of shape"):
        small_trainer(data=np.zeros((10, 3), np.float32))
    with pytest.raises(ValueError, match="no labels"):
        small_trainer(small_mlp(num_classes=3))
    with pytest.raises(ValueError, match="non-finite"):
        small_trainer(data=np.full((10, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="lr_schedule"):
        small_trainer(lr_schedule="exp")
    with pytest.raises(TypeError):
        small_trainer(data=np.zeros((10, 2), np.int64))
    with pytest.raises(FileNotFoundError):
        fd.nn.Model.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        fd.nn.Model.load(bad)
    # A checkpoint of another configuration.
    small_trainer().save(tmp_path / "run")
    other = fd.nn.MLP(data_shape=(2,), hidden=16, blocks=2, time_embed_dim=16)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(fd.nn.Model.load(tmp_path / "run").state_dict())
    with pytest.raises(ValueError, match="same data"):
        fd.Trainer.resume(tmp_path / "run", ring(10))


def test_a_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    # A child process checkpoints every step; it is killed at an arbitrary moment, possibly in
    # the middle of writing. The last complete checkpoint must load.
    run = tmp_path / "run"
    code = textwrap.dedent(
        f"""
        import numpy as np, ferrodiff as fd
        m = fd.nn.MLP(data_shape=(2,), hidden=256, blocks=3)
        t = fd.Trainer(m, fd.Schedule.linear(100), np.ones((64, 2), np.float32), batch_size=8)
        t.train(1, progress=False, checkpoint={str(run)!r}, checkpoint_every=1)
        print("ready", flush=True)
        t.train(100000, progress=False, checkpoint={str(run)!r}, checkpoint_every=1)
        """
    )
    pids = []
    for delay in (0.05, 0.13, 0.31):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        model = fd.nn.Model.load(run)
        assert model.num_parameters > 0
        trainer = fd.Trainer.resume(run, np.ones((64, 2), np.float32))
        assert trainer.step >= 1
        pids.append(p.pid)
    # Each process's first complete save of a file removes the temporaries of that file that
    # killed processes left, so only the last process's temporaries (of the checkpoint or of the
    # config it rewrites with it) can remain.
    leftovers = [f for f in os.listdir(run) if ".tmp" in f]
    allowed = {f".{name}.tmp-{pids[-1]}" for name in ("checkpoint.safetensors", "config.json")}
    assert set(leftovers) <= allowed, (leftovers, pids)


def test_classifier_free_guidance_combines_conditional_and_unconditional_predictions():
    calls = []

    def denoiser(x, t, y):  # ε_c = 0.1 x + y, ε_u (label 9) = 0.1 x - 1
        calls.append(len(x))
        y = y.reshape(-1, 1).astype(np.float32)
        return np.where(y == 9, 0.1 * x - 1, 0.1 * x + y).astype(np.float32)

    schedule = fd.Schedule.linear(100)
    sampler = fd.DDIM(schedule, steps=5)
    labels = np.array([0, 1, 2, 3])
    s = np.float32(3.0)

    def guided(x, t):
        c = 0.1 * x + labels.reshape(-1, 1).astype(np.float32)
        u = 0.1 * x - np.float32(1)
        return (u + s * (c - u)).astype(np.float32)

    x = sampler.sample(denoiser, (4, 2), seed=2, labels=labels, guidance_scale=3.0, null_label=9)
    assert calls == [8] * 5  # one batched call per step
    np.testing.assert_allclose(x, sampler.sample(guided, (4, 2), seed=2), rtol=1e-5, atol=1e-5)
    calls.clear()
    plain = sampler.sample(denoiser, (4, 2), seed=2, labels=labels)
    assert calls == [4] * 5
    np.testing.assert_array_equal(
        sampler.sample(denoiser, (4, 2), seed=2, labels=labels, guidance_scale=1.0, null_label=9), plain
    )


def test_guidance_on_models_and_its_errors():
    t = small_trainer(small_mlp(num_classes=3), ring(64), np.arange(64) % 3, class_dropout=0.2)
    t.train(10, progress=False)
    s = fd.DDIM(t.schedule, steps=5)
    y = [0, 1, 2, 0]
    plain = s.sample(t, (4, 2), seed=0, labels=y)
    np.testing.assert_array_equal(s.sample(t, (4, 2), seed=0, labels=y, guidance_scale=1.0), plain)
    guided = s.sample(t, (4, 2), seed=0, labels=y, guidance_scale=4.0, guidance_rescale=0.7)
    assert np.isfinite(guided).all() and not np.array_equal(guided, plain)
    with pytest.raises(ValueError, match="needs labels"):
        s.sample(t, (4, 2), guidance_scale=2.0)
    with pytest.raises(ValueError, match="null_label"):
        s.sample(lambda x, tt, yy: x, (4, 2), labels=y, guidance_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        s.sample(small_mlp(), (4, 2), labels=y, guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_rescale"):
        s.sample(t, (4, 2), labels=y, guidance_scale=2.0, guidance_rescale=2.0)
