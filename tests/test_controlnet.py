"""ControlNet for the U-Net: exact identity with the base at initialisation (network and
sampler), the frozen base after training (bit for bit), the control branch learning, the
conditioning scale, checkpoints with exact resume, the control images' embedding resolution, and
clear errors. Tiny models on 8x8 digits: the file runs in seconds."""

import numpy as np
import pytest

import ferrodiff as fd

SCHEDULE = fd.Schedule.linear(1000)


def randomized(model, seed=0, scale=0.2):
    """Every weight from N(0, scale²): an untrained U-Net's zero-initialised output layer would
    make comparisons of outputs vacuous."""
    rng = np.random.default_rng(seed)
    model.load_state_dict(
        {
            k: (scale * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in sorted(model.state_dict().items())
        }
    )
    return model


def base_unet(**kw):
    return randomized(fd.nn.UNet(base_channels=8, groups=4, num_classes=10, **kw))


def data(n=32):
    d = fd.datasets.digits(split="train", seed=0)
    x = d.data[:n]
    control = np.where(x > 0, 1.0, -1.0).astype(np.float32)
    return x, d.labels[:n], control


def inputs(n=3, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
    return x, np.array([5, 300, 900][:n]), np.array([1, 2, 3][:n])


def test_a_new_controlnet_computes_exactly_what_its_base_computes():
    base = base_unet()
    controlnet = fd.nn.ControlNet.from_unet(base)
    assert controlnet.config["type"] == "control_net" and controlnet.config["base"] == base.config
    x, t, y = inputs()
    control = np.random.default_rng(2).standard_normal((3, 1, 8, 8)).astype(np.float32)
    expected = base(x, t, y)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_array_equal(controlnet.with_control(control)(x, t, y), expected)
    # The whole sampling loop too, guided: row i takes control i mod N.
    ddim = fd.DDIM(SCHEDULE, steps=8)
    kw = dict(labels=[1, 2, 3, 4], guidance_scale=3.0, seed=4)
    np.testing.assert_array_equal(
        ddim.sample(controlnet, (4, 1, 8, 8), control_image=control[:2], **kw),
        ddim.sample(base, (4, 1, 8, 8), **kw),
    )


def test_parameter_names_follow_diffusers_controlnet_and_the_base_sits_under_base():
    base = base_unet()
    names = set(fd.nn.ControlNet.from_unet(base, conditioning_embedding_channels=(4, 8)).state_dict())
    base_names = set(base.state_dict())
    assert {f"base.{k}" for k in base_names} <= names
    branch = {k for k in names if not k.startswith("base.")}
    # The control branch copies the encoder: no up path, no output layers.
    assert not any(k.startswith(("up_blocks.", "conv_out.", "conv_norm_out.")) for k in branch)
    assert {"conv_in.weight", "time_embedding.linear_1.weight", "class_embedding.weight"} <= branch
    assert {
        "controlnet_cond_embedding.conv_in.weight",
        "controlnet_cond_embedding.blocks.0.weight",
        "controlnet_cond_embedding.blocks.1.weight",
        "controlnet_cond_embedding.conv_out.weight",
        "controlnet_mid_block.weight",
    } <= branch
    # One zero 1x1 convolution per skip: conv_in, 1 block + 1 downsampler at level 0, 1 block at 1.
    zero = sorted(k for k in branch if k.startswith("controlnet_down_blocks.") and k.endswith("weight"))
    assert len(zero) == 4
    copy = fd.nn.ControlNet.from_unet(base).state_dict()
    for k, v in base.state_dict().items():
        if k in copy:  # the encoder copy starts as the base's encoder
            np.testing.assert_array_equal(copy[k], v, err_msg=k)


def test_training_moves_only_the_control_branch_and_the_base_stays_bit_for_bit(tmp_path):
    base = base_unet()
    x, y, control = data()
    controlnet = fd.nn.ControlNet.from_unet(base)
    before = controlnet.state_dict()
    trainer = fd.Trainer(controlnet, SCHEDULE, x, y, control=control, batch_size=8, lr=1e-2, seed=3)
    trainer.train(6, progress=False)
    after = trainer.model.state_dict()
    for k, v in base.state_dict().items():
        np.testing.assert_array_equal(after[f"base.{k}"], v, err_msg=k)
    moved = [k for k in after if not k.startswith("base.") and not np.array_equal(after[k], before[k])]
    assert "controlnet_mid_block.weight" in moved and "controlnet_cond_embedding.conv_out.weight" in moved
    # Trained, the control changes the output; scale 0 switches it off exactly.
    xs, t, ys = inputs()
    ctrl = control[:3]
    trained = trainer.model
    assert not np.array_equal(trained.with_control(ctrl)(xs, t, ys), base(xs, t, ys))
    np.testing.assert_array_equal(
        trained.with_control(ctrl, conditioning_scale=0.0)(xs, t, ys), base(xs, t, ys)
    )
    ddim = fd.DDIM(SCHEDULE, steps=5)
    np.testing.assert_array_equal(
        ddim.sample(trained, (3, 1, 8, 8), labels=ys, control_image=ctrl, conditioning_scale=0.0, seed=1),
        ddim.sample(base, (3, 1, 8, 8), labels=ys, seed=1),
    )
    # The EMA model holds the frozen base as well.
    ema = trainer.ema_model().state_dict()
    for k, v in base.state_dict().items():
        np.testing.assert_array_equal(ema[f"base.{k}"], v, err_msg=k)
    trainer.save(tmp_path / "run")
    loaded = fd.nn.Model.load(tmp_path / "run")
    np.testing.assert_array_equal(
        loaded.with_control(ctrl)(xs, t, ys), trainer.ema_model().with_control(ctrl)(xs, t, ys)
    )
    np.testing.assert_array_equal(fd.nn.ControlNet.base_of(loaded)(xs, t, ys), base(xs, t, ys))


def test_controlnet_training_resumed_from_a_checkpoint_is_exact(tmp_path):
    x, y, control = data(16)
    kw = dict(control=control, batch_size=4, seed=5, class_dropout=0.2)
    straight = fd.Trainer(fd.nn.ControlNet.from_unet(base_unet()), SCHEDULE, x, y, **kw)
    straight.train(4, progress=False)
    first = fd.Trainer(fd.nn.ControlNet.from_unet(base_unet()), SCHEDULE, x, y, **kw)
    first.train(2, progress=False)
    first.save(tmp_path / "run")
    resumed = fd.Trainer.resume(tmp_path / "run", x, y, control=control)
    resumed.train(2, progress=False)
    np.testing.assert_array_equal(straight.losses, resumed.losses)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_an_embedding_of_two_widths_takes_control_images_at_twice_the_side():
    base = base_unet()
    controlnet = fd.nn.ControlNet.from_unet(base, conditioning_embedding_channels=(4, 8))
    x, t, y = inputs()
    big = np.random.default_rng(3).standard_normal((3, 1, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(controlnet.with_control(big)(x, t, y), base(x, t, y))
    with pytest.raises(ValueError, match=r"takes \[N, 1, 16, 16\]"):
        controlnet.with_control(big[:, :, :8, :8])


def test_bad_controlnet_inputs_are_clear_errors():
    base = base_unet()
    controlnet = fd.nn.ControlNet.from_unet(base)
    x, y, control = data(8)
    ddim = fd.DDIM(SCHEDULE, steps=2)
    with pytest.raises(ValueError, match="needs control images"):
        ddim.sample(controlnet, (2, 1, 8, 8))
    with pytest.raises(ValueError, match="trains on pairs of data and control images"):
        fd.Trainer(controlnet, SCHEDULE, x, y)
    with pytest.raises(ValueError, match="not a ControlNet"):
        fd.Trainer(base, SCHEDULE, x, y, control=control)
    with pytest.raises(ValueError, match="control images for 8 samples"):
        fd.Trainer(controlnet, SCHEDULE, x, y, control=control[:4])
    with pytest.raises(ValueError, match=r"takes \[N, 1, 8, 8\]"):
        fd.Trainer(controlnet, SCHEDULE, x, y, control=np.zeros((8, 2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="condition a ControlNet"):
        base.with_control(control)
    with pytest.raises(ValueError, match="non-finite"):
        controlnet.with_control(np.full((1, 1, 8, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="conditioning_scale= goes with control_image="):
        ddim.sample(base, (2, 1, 8, 8), labels=[1, 2], conditioning_scale=0.5)
    with pytest.raises(ValueError, match="multiple of 3"):
        ddim.sample(controlnet, (4, 1, 8, 8), control_image=control[:3])
    with pytest.raises(ValueError, match="takes a U-Net"):
        fd.nn.ControlNet.from_unet(fd.nn.MLP())
    with pytest.raises(TypeError, match="Python denoiser"):
        ddim.sample(lambda x, t: x * 0, (2, 1, 8, 8), control_image=control[:2])


def test_control_images_follow_their_definitions():
    x = np.full((1, 1, 6, 6), -1.0, np.float32)
    x[0, 0, :, 3:] = 1.0  # a vertical step between columns 2 and 3
    m = fd.controls.mask(x)
    np.testing.assert_array_equal(m[0, 0], np.where(np.arange(6) >= 3, 1.0, -1.0)[None].repeat(6, 0))
    e = fd.controls.edges(x)
    # Central differences are 2 at columns 2 and 3 (away from the one-pixel border), 0 elsewhere.
    want = np.full((6, 6), -1.0)
    want[1:-1, 2:4] = 1.0
    want[[0, -1], 2:4] = 1.0
    np.testing.assert_array_equal(e[0, 0], want)
    r = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    low = fd.controls.lowres(r)
    np.testing.assert_array_equal(low[0, 0, :2, :2], np.full((2, 2), (0 + 1 + 4 + 5) / 4))
    np.testing.assert_array_equal(low[0, 0, 2:, 2:], np.full((2, 2), (10 + 11 + 14 + 15) / 4))
    with pytest.raises(ValueError, match="unknown control"):
        fd.controls.make("depth", x)
    with pytest.raises(ValueError, match="must divide"):
        fd.controls.lowres(x, 4)


def test_cli_trains_a_controlnet_on_a_run_and_samples_it(tmp_path, capsys):
    from ferrodiff.cli import main

    base = tmp_path / "base"
    common = ["--no-progress", "--seed", "1"]
    assert main(["train", "--data", "digits", "--conditional", "--model", "unet", "--channels", "8",
                 "--steps", "4", "--batch-size", "8", "--out", str(base), *common]) == 0  # fmt: skip
    out = tmp_path / "cn"
    assert main(["train-controlnet", "--checkpoint", str(base), "--control", "edges", "--steps", "3",
                 "--batch-size", "8", "--eval", "4", "--out", str(out), *common]) == 0  # fmt: skip
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["control"] == "edges" and metrics["held_out"] == 4
    assert 0.0 <= metrics["iou_controlnet"] <= 1.0 and 0.0 <= metrics["iou_base"] <= 1.0
    trained = fd.nn.Model.load(out)
    frozen, original = fd.nn.ControlNet.base_of(trained), fd.nn.Model.load(base)
    for k, v in original.state_dict().items():
        np.testing.assert_array_equal(frozen.state_dict()[k], v, err_msg=k)
    np.save(tmp_path / "c.npy", fd.controls.edges(fd.datasets.digits(split="test").data[:2]))
    assert main(["sample", "--checkpoint", str(out), "--n", "4", "--steps", "3", "--out",
                 str(tmp_path / "s.npy"), "--control", str(tmp_path / "c.npy"), "--no-progress"]) == 0  # fmt: skip
    assert np.load(tmp_path / "s.npy").shape == (4, 1, 8, 8)
    capsys.readouterr()
    assert main(["train-controlnet", "--checkpoint", str(out), "--control", "mask", "--out",
                 str(tmp_path / "x")]) == 2  # fmt: skip
    assert "expected a run folder of ferrodiff train" in capsys.readouterr().err
