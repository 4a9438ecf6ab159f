"""Few-step generation: the consistency sampler against diffusers' CMStochasticIterativeScheduler,
the objectives of `Trainer(objective=...)` from Python (options, teachers, resume, bad inputs),
`fd.distill` and the CLI's `distill`."""

import json
import subprocess
import sys

import ferrodiff as fd
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def dummy_sample(shape=(4, 3, 8, 8)):
    """diffusers' deterministic test sample: arange / numel, permuted as its tests do."""
    n = int(np.prod(shape))
    b, c, h, w = shape
    return (np.arange(n, dtype=np.float32) / n).reshape(c, h, w, b).transpose(3, 0, 1, 2).copy()


def dummy_model(x, t, *_):
    t = np.asarray(t, dtype=np.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return (x * t / (t + 1)).astype(np.float32)


def diffusers_loop(steps, x0, noises=None, num_train_timesteps=201):
    from diffusers import CMStochasticIterativeScheduler
    from diffusers.schedulers import scheduling_consistency_models as mod

    sch = CMStochasticIterativeScheduler(
        num_train_timesteps=num_train_timesteps, sigma_min=0.002, sigma_max=80.0
    )
    sch.set_timesteps(steps)
    it = iter(noises or [])
    original = mod.randn_tensor
    mod.randn_tensor = lambda shape, **kw: torch.from_numpy(next(it)).reshape(shape)
    try:
        x = torch.from_numpy(x0 * float(sch.init_noise_sigma))
        for t in sch.timesteps:
            scaled = sch.scale_model_input(x, t)
            out = torch.from_numpy(dummy_model(scaled.numpy(), np.full(len(x), float(t))))
            x = sch.step(out, t, x).prev_sample
    finally:
        mod.randn_tensor = original
    return x.numpy(), [float(s) for s in sch.sigmas[:-1]]


def test_one_step_matches_diffusers_golden_values():
    x0 = dummy_sample()
    ours = fd.ConsistencySampler(steps=1, num_scales=201).sample(dummy_model, x_T=x0 * 80.0)
    # REFERENCE.md: consistency one step (T=201, σ 0.002..80, sample*80): 192.7614 / 0.2510.
    assert abs(np.abs(ours).sum() - 192.7614) < 1e-3
    assert abs(np.abs(ours).mean() - 0.2510) < 1e-4
    theirs, _ = diffusers_loop(1, x0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [2, 5])
def test_multistep_matches_diffusers_with_the_same_noise(steps):
    x0 = dummy_sample()
    sampler = fd.ConsistencySampler(steps=steps, num_scales=201)
    seen = []
    ours = sampler.sample(
        dummy_model, x_T=x0 * 80.0, seed=3, callback=lambda i, s, x, p: seen.append((x.copy(), p.copy()))
    )
    # Recover the noise each step injected: x_{k+1} = f_k + √(σ_{k+1}² − σ_min²) z_k.
    sig = sampler.sigmas + [0.002]
    noises = []
    for k, (x, f) in enumerate(seen[:-1]):
        s = np.sqrt(sig[k + 1] ** 2 - 0.002**2)
        noises.append(((x - f) / s).astype(np.float32))
    noises.append(np.zeros_like(x0))  # the last step adds noise of std 0
    theirs, their_sigmas = diffusers_loop(steps, x0, noises)
    np.testing.assert_allclose(sampler.sigmas, their_sigmas, rtol=1e-6)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    # The injected noise is standard normal and the last step ends at σ_min with no noise.
    z = np.concatenate([n.ravel() for n in noises[:-1]])
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    np.testing.assert_array_equal(ours, seen[-1][1])


def test_sampler_arguments_and_errors():
    s = fd.ConsistencySampler(sigmas=[80.0, 0.8])
    assert s.steps == 2 and s.sigmas == [80.0, 0.8]
    np.testing.assert_allclose(s.timesteps, [250 * np.log(80.0), 250 * np.log(0.8)])
    with pytest.raises(ValueError, match="decrease"):
        fd.ConsistencySampler(sigmas=[0.8, 80.0])
    with pytest.raises(ValueError, match="sigma_min, sigma_max"):
        fd.ConsistencySampler(sigmas=[100.0])
    with pytest.raises(ValueError, match="needs the consistency model"):
        s.sample((2, 4))
    with pytest.raises(ValueError, match="strength needs image"):
        fd.ConsistencySampler(steps=2).sample(dummy_model, (2, 4), strength=0.5)

    # A failing callable propagates its exception.
    def bad(x, t):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fd.ConsistencySampler(steps=1).sample(bad, (2, 4))


def digits_small():
    d = fd.datasets.digits(split="train", seed=0)
    return d.data[:256], d.labels[:256]


def small_unet(classes=10, seed=0):
    return fd.nn.UNet(
        in_channels=1,
        image_size=8,
        base_channels=8,
        channel_mult=(1, 2),
        attention_resolutions=(),
        num_classes=classes,
        seed=seed,
    )


def test_consistency_training_from_python_resumes_and_samples(tmp_path):
    x, y = digits_small()
    kw = dict(
        batch_size=16,
        total_steps=8,
        objective="consistency_training",
        objective_options={"recipe": "ict"},
        class_dropout=0.1,
    )
    a = fd.Trainer(small_unet(), None, x, y, **kw)
    a.train(6, progress=False)
    b = fd.Trainer(small_unet(), None, x, y, **kw)
    b.train(3, progress=False, checkpoint=tmp_path / "run")
    b = fd.Trainer.resume(tmp_path / "run", x, y)
    b.train(3, progress=False)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert b.objective == "consistency_training"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["objective"]["recipe"] == "ict"
    out = fd.ConsistencySampler(b, steps=2).sample(
        (10, 1, 8, 8), labels=np.arange(10), seed=0, guidance_scale=2.0
    )
    assert out.shape == (10, 1, 8, 8) and np.isfinite(out).all() and np.abs(out).max() <= 1.0
    # The boundary condition holds through the Python API: f(x, σ_min) = x exactly.
    z = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(fd.distill.consistency_function(b, z, 0.002, labels=[0, 1, 2]), z)
    # Editing works zero-shot: SDEdit and inpainting keep shapes and the known region's trend.
    img = x[:4]
    mask = np.zeros_like(img)
    mask[..., :4] = 1.0
    ed = fd.ConsistencySampler(b, steps=3).sample(image=img, strength=0.7, mask=mask, labels=y[:4], seed=1)
    assert ed.shape == img.shape and np.isfinite(ed).all()


def test_objective_options_and_teachers_are_checked(tmp_path):
    x, y = digits_small()
    sch = fd.Schedule.cosine(1000)
    with pytest.raises(ValueError, match="objective must be"):
        fd.Trainer(small_unet(), sch, x, y, objective="distillation")
    with pytest.raises(ValueError, match="unknown field"):
        fd.Trainer(
            small_unet(),
            None,
            x,
            y,
            objective="consistency_training",
            objective_options={"recipee": "ct"},
            total_steps=5,
        )
    with pytest.raises(ValueError, match="total_steps"):
        fd.Trainer(small_unet(), None, x, y, objective="consistency_training")
    with pytest.raises(ValueError, match="needs a teacher"):
        fd.Trainer(small_unet(), sch, x, y, objective="progressive_distillation")
    with pytest.raises(ValueError, match="needs the schedule"):
        fd.Trainer(small_unet(), None, x, y, objective="consistency_distillation", teacher=small_unet())
    with pytest.raises(ValueError, match="shape"):
        other = fd.nn.UNet(
            in_channels=1,
            image_size=16,
            base_channels=8,
            channel_mult=(1, 2),
            attention_resolutions=(),
            num_classes=10,
        )
        fd.Trainer(small_unet(), sch, x, y, objective="consistency_distillation", teacher=other)
    with pytest.raises(ValueError, match="classes"):
        fd.Trainer(
            small_unet(), sch, x, y, objective="consistency_distillation", teacher=small_unet(classes=0)
        )
    with pytest.raises(ValueError, match="at least 2"):
        fd.Trainer(
            small_unet(),
            sch,
            x,
            y,
            objective="consistency_distillation",
            objective_options={"num_scales": 1},
            teacher=small_unet(),
        )
    with pytest.raises(TypeError, match="teacher must be"):
        fd.Trainer(small_unet(), sch, x, y, objective="consistency_distillation", teacher=3)
    linear_teacher = fd.Trainer(small_unet(), fd.Schedule.linear(1000), x, y)
    with pytest.raises(ValueError, match="another noise schedule"):
        fd.Trainer(small_unet(), sch, x, y, objective="consistency_distillation", teacher=linear_teacher)
    linear_teacher.save(tmp_path / "linear")
    with pytest.raises(ValueError, match="another noise schedule"):
        fd.distill.progressive(tmp_path / "linear", sch, x, y, from_steps=8, to_steps=4, progress=False)
    with pytest.raises(ValueError, match="not a consistency objective"):
        fd.ConsistencySampler(fd.Trainer(small_unet(), sch, x, y))


def test_a_torch_teacher_distils_like_the_same_ferrodiff_teacher():
    """The teacher side accepts any callable teacher(x, t, y): a ferrodiff model wrapped as a
    Python function gives the very same losses as the model itself."""
    x, y = digits_small()
    sch = fd.Schedule.cosine(1000)
    teacher = small_unet(seed=5)

    def as_callable(xv, t, labels):
        return teacher(xv, t.astype(np.float32), labels)

    runs = []
    for t in (teacher, as_callable):
        tr = fd.Trainer(
            small_unet(),
            sch,
            x,
            y,
            batch_size=8,
            objective="progressive_distillation",
            objective_options={"student_steps": 8},
            prediction="v",
            teacher=t,
            class_dropout=0.2,
        )
        tr.train(3, progress=False)
        runs.append(tr.losses)
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)

    def broken(xv, t, labels):
        raise RuntimeError("teacher failed")

    tr = fd.Trainer(
        small_unet(),
        sch,
        x,
        y,
        batch_size=8,
        objective="consistency_distillation",
        teacher=broken,
        objective_options={"teacher_prediction": "epsilon"},
    )
    with pytest.raises(RuntimeError, match="teacher failed"):
        tr.train(1, progress=False)
    assert tr.step == 0


def test_progressive_checks_its_arguments():
    x, y = digits_small()
    sch = fd.Schedule.cosine(1000)
    t = fd.Trainer(small_unet(), sch, x, y)
    for frm, to in [(64, 3), (64, 64), (48, 4), (64, 0)]:
        with pytest.raises(ValueError, match="to_steps"):
            fd.distill.progressive(t, sch, x, y, from_steps=frm, to_steps=to)
    with pytest.raises(ValueError, match="teacher_prediction"):
        fd.distill.progressive(small_unet(), sch, x, y)


def test_progressive_rounds_checkpoint_and_resume(tmp_path):
    x, y = digits_small()
    sch = fd.Schedule.cosine(1000)
    teacher = fd.Trainer(small_unet(), sch, x, y, batch_size=16)
    teacher.train(2, progress=False)
    kw = dict(from_steps=8, to_steps=2, steps_per_round=4, batch_size=8, progress=False, checkpoint_every=2)
    full = fd.distill.progressive(teacher, sch, x, y, out=tmp_path / "a", **kw)
    assert [r["steps"] for r in full.rounds] == [4, 2] and full.steps == 2
    assert (tmp_path / "a" / "steps-4" / "checkpoint.safetensors").exists()
    # Stop mid-way through the second round (its checkpoint at step 2), then resume.
    calls = []

    def stop(step, loss):
        calls.append(step)
        if len(calls) == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fd.distill.progressive(teacher, sch, x, y, out=tmp_path / "b", callback=stop, callback_every=1, **kw)
    resumed = fd.distill.progressive(teacher, sch, x, y, out=tmp_path / "b", **kw)
    want, got = full.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=k)
    x2 = resumed.sampler().sample(resumed.model, (4, 1, 8, 8), labels=[0, 1, 2, 3], seed=0)
    assert x2.shape == (4, 1, 8, 8) and np.isfinite(x2).all()
    assert len(resumed.sampler().sigmas) == 3


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "ferrodiff", *map(str, args)], capture_output=True, text=True, check=False
    )


def test_cli_distill_and_sample(demo_run, tmp_path):
    run = demo_run / "run"
    out = tmp_path / "pd"
    r = run_cli(
        "distill",
        "--checkpoint",
        run,
        "--from-steps",
        8,
        "--to-steps",
        2,
        "--steps-per-round",
        3,
        "--out",
        out,
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert (out / "steps-2" / "checkpoint.safetensors").exists()
    r = run_cli(
        "sample", "--checkpoint", out / "steps-2", "--n", 8, "--out", tmp_path / "s.npy", "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    assert "distilled student, 2 DDIM steps" in r.stdout
    r = run_cli(
        "distill",
        "--checkpoint",
        run,
        "--method",
        "consistency",
        "--steps",
        3,
        "--out",
        tmp_path / "cd",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "sample", "--checkpoint", tmp_path / "cd", "--n", 8, "--out", tmp_path / "c.npy", "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    assert "consistency sampling, 1 step" in r.stdout
    assert np.load(tmp_path / "c.npy").shape == (8, 1, 8, 8)
    r = run_cli(
        "distill",
        "--checkpoint",
        run,
        "--from-steps",
        64,
        "--to-steps",
        3,
        "--out",
        tmp_path / "bad",
        "--no-progress",
    )
    assert r.returncode == 2 and "power of two" in r.stderr


def test_cli_consistency_training(tmp_path):
    out = tmp_path / "ct"
    r = run_cli(
        "train",
        "--data",
        "digits",
        "--model",
        "unet",
        "--channels",
        8,
        "--conditional",
        "--objective",
        "consistency-training",
        "--steps",
        4,
        "--batch-size",
        16,
        "--out",
        out,
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "sample", "--checkpoint", out, "--steps", 2, "--n", 8, "--out", tmp_path / "x.npy", "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    assert "consistency sampling, 2 step" in r.stdout


def test_guidance_as_an_input_is_distilled_and_sampled_in_one_pass():
    x, y = digits_small()
    sch = fd.Schedule.cosine(1000)
    teacher = small_unet(seed=2)
    res = fd.distill.progressive(
        teacher,
        sch,
        x,
        y,
        teacher_prediction="epsilon",
        from_steps=8,
        to_steps=4,
        steps_per_round=3,
        batch_size=8,
        guidance_range=(1.0, 4.0),
        progress=False,
    )
    assert res.model.config["guidance_embed"] is True
    state = res.model.state_dict()
    assert any(k.startswith("guidance_embedding.") for k in state)
    sampler = res.sampler()
    outs = {}
    for w in (1.0, 3.0):
        outs[w] = sampler.sample(
            res.model,
            (6, 1, 8, 8),
            labels=np.arange(6),
            seed=0,
            guidance_scale=w,
        )
    assert np.isfinite(outs[3.0]).all()
    assert not np.array_equal(outs[1.0], outs[3.0])  # w reaches the network
    with pytest.raises(ValueError, match="not both"):
        fd.distill.progressive(
            teacher,
            sch,
            x,
            y,
            teacher_prediction="epsilon",
            from_steps=8,
            to_steps=4,
            guidance=2.0,
            guidance_range=(1.0, 2.0),
        )
    with pytest.raises(ValueError, match="guidance_embed"):
        fd.Trainer(
            small_unet(),
            sch,
            x,
            y,
            objective="progressive_distillation",
            teacher=teacher,
            objective_options={"student_steps": 4, "guidance_range": [1.0, 2.0]},
        )
    # The embedding starts at zero: a fresh guidance_embed copy of a model computes the same thing.
    m = fd.nn.UNet(
        in_channels=1,
        image_size=8,
        base_channels=8,
        channel_mult=(1, 2),
        attention_resolutions=(),
        num_classes=10,
        guidance_embed=True,
        seed=1,
    )
    missing, unexpected = m.load_state_dict(res.model.state_dict(), strict=False)
    assert missing == [] and unexpected == []
