"""ferrodiff.torch: tensors in, tensors out; an nn.Module as the denoiser."""

import ferrodiff as fd
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import ferrodiff.torch as fdt


def test_to_numpy_is_zero_copy_for_cpu_float32():
    t = torch.randn(4, 3)
    a = fdt.to_numpy(t)
    a[0, 0] = 123.0
    assert t[0, 0].item() == 123.0
    h = fdt.to_numpy(torch.randn(4, 3, dtype=torch.float64))
    assert h.dtype == np.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_step_keeps_dtype_and_matches_numpy(dtype):
    s = fd.Schedule.linear(1000)
    d = fd.DDIM(s, steps=10, clip_sample=1.0)
    x = torch.randn(2, 3, 4, 4).to(dtype)
    m = torch.randn(2, 3, 4, 4).to(dtype)
    res = fdt.step(d, m, torch.tensor(500), x)
    assert isinstance(res.prev_sample, torch.Tensor) and res.prev_sample.dtype == dtype
    assert res.pred_x0.dtype == dtype and res.prev_sample.device == x.device
    ref = d.step(m.float().numpy(), 500, x.float().numpy()).prev_sample
    np.testing.assert_allclose(
        res.prev_sample.float().numpy(),
        ref,
        rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
        atol=1e-2 if dtype == torch.bfloat16 else 1e-6,
    )


class MixtureModule(torch.nn.Module):
    """The exact ε of a mixture, written in torch, as a stand-in for a trained network."""

    def __init__(self, mixture, schedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.grad_enabled = []

    def forward(self, x, t):
        self.grad_enabled.append(torch.is_grad_enabled())
        eps = self.mixture.eps(x.detach().cpu().numpy(), t.cpu().numpy(), self.schedule)
        return torch.from_numpy(eps) * self.scale


def test_sample_with_an_nn_module_matches_the_numpy_path():
    s = fd.Schedule.linear(1000)
    mix = fd.oracles.eight_gaussians()
    module = MixtureModule(mix, s)
    d = fd.DDIM(s, steps=20)
    out = fdt.sample(d, module, (16, 2), seed=4)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (16, 2)
    np.testing.assert_allclose(out.numpy(), d.sample(mix.denoiser(s), (16, 2), seed=4), rtol=1e-5, atol=1e-6)
    assert module.grad_enabled and not any(module.grad_enabled)


def test_sample_from_a_float64_x_T_returns_float64():
    s = fd.Schedule.linear(1000)
    module = MixtureModule(fd.oracles.eight_gaussians(), s)
    x_T = torch.randn(8, 2, dtype=torch.float64)
    out = fdt.sample(fd.DDPM(s, steps=10), module, x_T=x_T, seed=1)
    assert out.dtype == torch.float64


def test_a_module_error_propagates_unchanged():
    class Broken(torch.nn.Module):
        def forward(self, x, t):
            raise KeyError("broken module")

    s = fd.Schedule.linear(1000)
    with pytest.raises(KeyError, match="broken module"):
        fdt.sample(fd.DDIM(s, steps=3), Broken(), (2, 2))


def test_float_timestep_tensor_is_a_type_error():
    d = fd.DDIM(fd.Schedule.linear(1000), steps=10)
    with pytest.raises(TypeError, match="integer timesteps"):
        fdt.step(d, torch.zeros(1, 2), torch.tensor(500.0), torch.zeros(1, 2))
