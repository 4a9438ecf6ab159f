"""Editing from an image: SDEdit / img2img (`image=`, `strength=`) and inpainting (`mask=`),
checked against a hand-written loop and the exact denoiser of a Gaussian mixture."""

import ferrodiff as fd
import numpy as np
import pytest


@pytest.fixture
def mixture():
    # Two components whose coordinates are perfectly correlated: knowing x tells y.
    return fd.oracles.GaussianMixture([0.5, 0.5], [[2.0, 2.0], [-2.0, -2.0]], [0.1, 0.1])


def test_sdedit_runs_the_last_strength_fraction_of_the_steps_from_the_noised_image(mixture):
    schedule = fd.Schedule.linear(1000)
    sampler = fd.DDIM(schedule, steps=20)
    denoiser = mixture.denoiser(schedule)
    calls = []

    def counting(x, t):
        calls.append(int(t[0]))
        return denoiser(x, t)

    image = np.array([[2.0, 2.0], [-2.0, -2.0], [0.5, -0.3]], np.float32)
    out = sampler.sample(counting, image=image, strength=0.3, seed=4)
    assert calls == list(sampler.timesteps[14:])
    # The same by hand: noise the image to the first timestep with fd.randn(seed), then step.
    t0 = int(sampler.timesteps[14])
    a = schedule.alphas_cumprod[t0]
    x = (np.sqrt(a) * image + np.sqrt(1 - a) * fd.randn(image.shape, seed=4)).astype(np.float32)
    for t in sampler.timesteps[14:]:
        x = sampler.step(denoiser(x, np.full(3, t)), int(t), x, seed=4).prev_sample
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)


def test_low_strength_stays_near_the_image_and_full_strength_forgets_it(mixture):
    schedule = fd.Schedule.linear(1000)
    sampler = fd.DDIM(schedule, steps=50)
    denoiser = mixture.denoiser(schedule)
    image = np.tile(np.array([[2.0, 2.0]], np.float32), (400, 1))
    near = sampler.sample(denoiser, image=image, strength=0.1, seed=0)
    assert np.abs(near - 2.0).mean() < 0.2
    far = sampler.sample(denoiser, image=image, strength=1.0, seed=0)
    share_flipped = (far[:, 0] < 0).mean()
    assert 0.3 < share_flipped < 0.7  # from (almost) pure noise: either component


def test_inpainting_keeps_the_known_region_and_completes_the_rest_consistently(mixture):
    schedule = fd.Schedule.linear(1000)
    denoiser = mixture.denoiser(schedule)
    n = 400
    known = np.zeros((n, 2), np.float32)
    known[: n // 2, 0], known[n // 2 :, 0] = 2.0, -2.0  # x known, y to fill in
    mask = np.array([1.0, 0.0], np.float32)  # broadcast over the batch
    for sampler in (fd.DDPM(schedule, steps=100), fd.DDIM(schedule, steps=100)):
        out = sampler.sample(denoiser, image=known, mask=mask, seed=1)
        np.testing.assert_array_equal(out[:, 0], known[:, 0])
        # The exact posterior puts y next to x: the replacement method gets the sign right.
        assert (np.sign(out[:, 1]) == np.sign(known[:, 0])).mean() > 0.95
        assert np.abs(out[:, 1] - known[:, 0]).mean() < 0.5


def test_a_full_mask_returns_the_image_and_an_empty_mask_plain_editing(mixture):
    schedule = fd.Schedule.linear(1000)
    sampler = fd.DDIM(schedule, steps=10)
    denoiser = mixture.denoiser(schedule)
    image = np.array([[1.0, -1.0], [0.2, 0.3]], np.float32)
    np.testing.assert_array_equal(sampler.sample(denoiser, image=image, mask=np.ones(2), seed=0), image)
    np.testing.assert_array_equal(
        sampler.sample(denoiser, image=image, mask=np.zeros(2), strength=0.5, seed=0),
        sampler.sample(denoiser, image=image, strength=0.5, seed=0),
    )


def test_editing_arguments_are_checked(mixture):
    schedule = fd.Schedule.linear(1000)
    sampler = fd.DDIM(schedule, steps=10)
    d = mixture.denoiser(schedule)
    image = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="strength"):
        sampler.sample(d, image=image, strength=0.0)
    with pytest.raises(ValueError, match="no step"):
        sampler.sample(d, image=image, strength=0.05)
    with pytest.raises(ValueError, match="needs image"):
        sampler.sample(d, (2, 2), strength=0.5)
    with pytest.raises(ValueError, match="needs image"):
        sampler.sample(d, (2, 2), mask=np.ones(2))
    with pytest.raises(ValueError, match="not both"):
        sampler.sample(d, (2, 2), image=image)
    with pytest.raises(ValueError, match="broadcast"):
        sampler.sample(d, image=image, mask=np.ones(3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sampler.sample(d, image=image, mask=np.full(2, 2.0))
