//! `ferrodiff.losses` and `ferrodiff.likelihood`: training targets and weights, the simple loss
//! with its gradient, the variational bound in bits/dim.

use numpy::{IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::arrays::{batch_of, f32_array, f64_vec, new_f32, timesteps_arg};
use super::sampling::{denoiser_for, GuidanceArgs, PyHooks};
use super::schedule::PySchedule;
use crate::diffusion::Prediction;
use crate::error::Result;
use crate::loss::{self, likelihood, simple, weights, BpdConfig};
use crate::sample::{model_output_layout, VarianceType};

/// The regression target for x_t = q_sample(x0, t, noise) of a model predicting
/// `prediction`: "epsilon" → noise, "x0" → x0, "v" → sqrt(ᾱ_t) noise - sqrt(1-ᾱ_t) x0.
#[pyfunction]
#[pyo3(signature = (schedule, x0, noise, t, prediction="epsilon"))]
fn training_target<'py>(
    py: Python<'py>,
    schedule: &PySchedule,
    x0: &Bound<'py, PyAny>,
    noise: &Bound<'py, PyAny>,
    t: &Bound<'py, PyAny>,
    prediction: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let p = Prediction::parse(prediction)?;
    let (a, z) = (f32_array(x0, "x0")?, f32_array(noise, "noise")?);
    let shape = a.shape().to_vec();
    crate::diffusion::check_shapes("noise", z.shape(), "x0", &shape)?;
    let ts = timesteps_arg(t, batch_of(&shape, "x0")?)?;
    let out = new_f32(py, &shape);
    {
        let (ar, zr) = (a.readonly(), z.readonly());
        let mut ow = out.readwrite();
        let (av, zv, ov) = (ar.as_slice()?, zr.as_slice()?, ow.as_slice_mut()?);
        let s = &schedule.inner;
        py.detach(|| loss::training_target(s, &shape, av, zv, &ts, p, ov))?;
    }
    Ok(out)
}

fn weighting(kind: &str, gamma: f64) -> PyResult<weights::Weighting> {
    Ok(weights::Weighting::parse(kind, gamma)?)
}

fn target_of(p: Prediction) -> weights::Target {
    match p {
        Prediction::Epsilon => weights::Target::Epsilon,
        Prediction::X0 => weights::Target::X0,
        Prediction::V => weights::Target::V,
    }
}

/// Per-sample weights (float64 [B]) that multiply the MSE of a `prediction` target so the loss
/// is the weighting `kind` of the x0 error: "uniform", "snr", "min_snr" (γ = `gamma`),
/// "truncated_snr" (max(SNR, 1)), "vlb" (the bound's per-t weight).
#[pyfunction]
#[pyo3(signature = (schedule, t, kind="uniform", prediction="epsilon", gamma=5.0))]
fn loss_weight<'py>(
    py: Python<'py>,
    schedule: &PySchedule,
    t: &Bound<'py, PyAny>,
    kind: &str,
    prediction: &str,
    gamma: f64,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let w = weighting(kind, gamma)?;
    let target = target_of(Prediction::parse(prediction)?);
    let ts: Vec<i64> = if let Ok(v) = t.extract::<i64>() {
        vec![v]
    } else {
        timesteps_arg(t, t.len()?)?
    };
    let s = &schedule.inner;
    let out: Vec<f64> = ts
        .iter()
        .map(|&ti| {
            let i = s.check_timestep(ti)?;
            let vlb = weights::VlbCoefs {
                beta: s.betas[i],
                alpha: s.alphas[i],
                alpha_bar: s.alphas_cumprod[i],
                posterior_variance_clipped: s.posterior_log_variance_clipped[i].exp(),
            };
            weights::loss_weight(s.alphas_cumprod[i], &w, target, Some(vlb))
                .map_err(crate::Error::Value)
        })
        .collect::<Result<_>>()?;
    Ok(out.into_pyarray(py))
}

/// The simple loss: per-sample mean squared error between `model_output` and `target` (times
/// `weights[b]` if given), float64 [B], and its gradient with respect to `model_output`
/// (float32, same shape) for the sum of the per-sample losses.
#[pyfunction]
#[pyo3(signature = (model_output, target, weights=None))]
#[allow(clippy::type_complexity)]
fn simple_loss<'py>(
    py: Python<'py>,
    model_output: &Bound<'py, PyAny>,
    target: &Bound<'py, PyAny>,
    weights: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyArray1<f64>>, Bound<'py, PyArrayDyn<f32>>)> {
    let (o, y) = (
        f32_array(model_output, "model_output")?,
        f32_array(target, "target")?,
    );
    let shape = o.shape().to_vec();
    crate::diffusion::check_shapes("target", y.shape(), "model_output", &shape)?;
    let batch = batch_of(&shape, "model_output")?;
    let row_len = shape[1..].iter().product::<usize>();
    let w = match weights {
        Some(w) => {
            let v = f64_vec(w, "weights")?;
            if v.len() != batch {
                return Err(PyValueError::new_err(format!(
                    "weights has {} entries but the batch has {batch} rows",
                    v.len()
                )));
            }
            Some(v)
        }
        None => None,
    };
    let grad = new_f32(py, &shape);
    let losses = {
        let (or, yr) = (o.readonly(), y.readonly());
        let mut gw = grad.readwrite();
        let (ov, yv, gv) = (or.as_slice()?, yr.as_slice()?, gw.as_slice_mut()?);
        py.detach(|| simple::simple_loss(ov, yv, row_len, w.as_deref(), Some(gv)))
            .map_err(PyValueError::new_err)?
    };
    Ok((losses.into_pyarray(py), grad))
}

/// KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise on equal-shape float arrays.
#[pyfunction]
fn _normal_kl<'py>(
    py: Python<'py>,
    mean1: &Bound<'py, PyAny>,
    logvar1: &Bound<'py, PyAny>,
    mean2: &Bound<'py, PyAny>,
    logvar2: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let (a, b, c, d) = (
        f64_vec(mean1, "mean1")?,
        f64_vec(logvar1, "logvar1")?,
        f64_vec(mean2, "mean2")?,
        f64_vec(logvar2, "logvar2")?,
    );
    if b.len() != a.len() || c.len() != a.len() || d.len() != a.len() {
        return Err(PyValueError::new_err(
            "normal_kl arguments must broadcast to one shape",
        ));
    }
    Ok((0..a.len())
        .map(|i| likelihood::normal_kl(a[i], b[i], c[i], d[i]))
        .collect::<Vec<_>>()
        .into_pyarray(py))
}

/// The tanh approximation of the standard normal CDF, elementwise.
#[pyfunction]
fn _approx_standard_normal_cdf<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    Ok(f64_vec(x, "x")?
        .into_iter()
        .map(likelihood::approx_standard_normal_cdf)
        .collect::<Vec<_>>()
        .into_pyarray(py))
}

/// Log-likelihood of data on a grid of `bins` levels in [-1, 1] under a discretized Gaussian.
#[pyfunction]
#[pyo3(signature = (x, means, log_scales, bins=256))]
fn _discretized_gaussian_log_likelihood<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    means: &Bound<'py, PyAny>,
    log_scales: &Bound<'py, PyAny>,
    bins: u32,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let (xv, mv, sv) = (
        f64_vec(x, "x")?,
        f64_vec(means, "means")?,
        f64_vec(log_scales, "log_scales")?,
    );
    if mv.len() != xv.len() || sv.len() != xv.len() {
        return Err(PyValueError::new_err(
            "x, means and log_scales must broadcast to one shape",
        ));
    }
    if bins < 2 {
        return Err(PyValueError::new_err(format!(
            "bins must be at least 2, got {bins}"
        )));
    }
    if let Some(v) = xv.iter().find(|v| v.is_nan() || v.abs() > 1.0 + 1e-6) {
        return Err(PyValueError::new_err(format!(
            "x must lie in [-1, 1] for a discretized likelihood, got {v}"
        )));
    }
    Ok((0..xv.len())
        .map(|i| likelihood::discretized_gaussian_log_likelihood(xv[i], mv[i], sv[i], bins))
        .collect::<std::result::Result<Vec<_>, String>>()
        .map_err(PyValueError::new_err)?
        .into_pyarray(py))
}

fn bpd_config(
    prediction: &str,
    variance: &str,
    bins: u32,
    seed: u64,
    clip_denoised: bool,
) -> PyResult<BpdConfig> {
    if bins < 2 {
        return Err(PyValueError::new_err(format!(
            "bins must be at least 2, got {bins}"
        )));
    }
    Ok(BpdConfig {
        prediction: Prediction::parse(prediction)?,
        variance: VarianceType::parse(variance)?,
        bins,
        seed,
        clip_denoised,
    })
}

/// The bound's term at each row's timestep, in bits/dim ([B] float64): KL(q(x_{t-1}|x_t, x0) ||
/// p(x_{t-1}|x_t)) for t > 0 and the decoder's negative log-likelihood at t = 0, with the model's
/// distribution formed from `model_output` (2C channels for "learned_range").
#[pyfunction]
#[pyo3(signature = (schedule, x0, x_t, t, model_output, *, prediction="epsilon", variance="fixed_small", bins=256, clip_denoised=true))]
#[allow(clippy::too_many_arguments)]
fn vb_terms_bpd<'py>(
    py: Python<'py>,
    schedule: &PySchedule,
    x0: &Bound<'py, PyAny>,
    x_t: &Bound<'py, PyAny>,
    t: &Bound<'py, PyAny>,
    model_output: &Bound<'py, PyAny>,
    prediction: &str,
    variance: &str,
    bins: u32,
    clip_denoised: bool,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let config = bpd_config(prediction, variance, bins, 0, clip_denoised)?;
    let (a, xt, m) = (
        f32_array(x0, "x0")?,
        f32_array(x_t, "x_t")?,
        f32_array(model_output, "model_output")?,
    );
    let shape = a.shape().to_vec();
    crate::diffusion::check_shapes("x_t", xt.shape(), "x0", &shape)?;
    let batch = batch_of(&shape, "x0")?;
    let ts = timesteps_arg(t, batch)?;
    let (row_len, stride) = model_output_layout(&shape, m.shape())?;
    let s = &schedule.inner;
    let (ar, xr, mr) = (a.readonly(), xt.readonly(), m.readonly());
    let (av, xv, mv) = (ar.as_slice()?, xr.as_slice()?, mr.as_slice()?);
    let out =
        py.detach(|| loss::vb_terms_from_output(s, av, xv, &ts, mv, row_len, stride, &config))?;
    Ok(out.into_pyarray(py))
}

/// The prior term KL(q(x_T | x0) || N(0, I)) in bits/dim per sample.
#[pyfunction]
fn prior_bpd<'py>(
    py: Python<'py>,
    schedule: &PySchedule,
    x0: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let a = f32_array(x0, "x0")?;
    let shape = a.shape().to_vec();
    let batch = batch_of(&shape, "x0")?;
    let row_len = if batch == 0 {
        0
    } else {
        shape[1..].iter().product()
    };
    let abar = *schedule.inner.alphas_cumprod.last().unwrap_or(&0.0);
    let r = a.readonly();
    let v = r.as_slice()?;
    Ok(likelihood::prior_bpd(v, row_len, abar)
        .map_err(PyValueError::new_err)?
        .into_pyarray(py))
}

/// Per-sample results of `bits_per_dim`: `total` [B], `prior` [B], `terms` [B, T] (t = 0 is the
/// decoder term), `mse` [B, T] (ε error at each t).
#[pyclass(name = "BitsPerDim", module = "ferrodiff.likelihood", frozen)]
pub struct PyBitsPerDim {
    #[pyo3(get)]
    total: Py<PyAny>,
    #[pyo3(get)]
    prior: Py<PyAny>,
    #[pyo3(get)]
    terms: Py<PyAny>,
    #[pyo3(get)]
    mse: Py<PyAny>,
}

#[pymethods]
impl PyBitsPerDim {
    fn __repr__(&self, py: Python<'_>) -> String {
        let mean = self
            .total
            .bind(py)
            .call_method0("mean")
            .map(|m| m.to_string())
            .unwrap_or_default();
        format!("BitsPerDim(mean total = {mean} bits/dim)")
    }
}

/// The variational bound of `denoiser(x, t)` on data `x0` ([B, ...] in [-1, 1]) in bits/dim,
/// over every timestep (OpenAI's `calc_bpd_loop`): the noise at timestep t is `randn` with
/// `seed` and stream t. `bins` is the number of data levels (256 for 8-bit images).
#[pyfunction]
#[pyo3(signature = (denoiser, schedule, x0, *, prediction="epsilon", variance="fixed_small", bins=256, seed=0, clip_denoised=true, progress=false, labels=None))]
#[allow(clippy::too_many_arguments)]
fn bits_per_dim<'py>(
    py: Python<'py>,
    denoiser: &Bound<'py, PyAny>,
    schedule: &PySchedule,
    x0: &Bound<'py, PyAny>,
    prediction: &str,
    variance: &str,
    bins: u32,
    seed: u64,
    clip_denoised: bool,
    progress: bool,
    labels: Option<&Bound<'py, PyAny>>,
) -> PyResult<PyBitsPerDim> {
    let config = bpd_config(prediction, variance, bins, seed, clip_denoised)?;
    let a = f32_array(x0, "x0")?;
    let shape = a.shape().to_vec();
    let batch = batch_of(&shape, "x0")?;
    let data = a.readonly().as_slice()?.to_vec();
    let t_total = schedule.inner.len();
    let mut hooks = PyHooks::new(py, t_total, progress, None, &shape, "bits/dim")?;
    let mut d = denoiser_for(
        denoiser,
        labels,
        None,
        GuidanceArgs::NONE,
        batch_of(&shape, "x0")?,
    )?;
    let r = loss::bits_per_dim(
        d.as_mut(),
        &schedule.inner,
        &data,
        &shape,
        config,
        &mut hooks,
    );
    hooks.close();
    let r = r?;
    let bt = [batch, t_total];
    Ok(PyBitsPerDim {
        total: r.total.into_pyarray(py).into_any().unbind(),
        prior: r.prior.into_pyarray(py).into_any().unbind(),
        terms: r.terms.into_pyarray(py).reshape(bt)?.into_any().unbind(),
        mse: r.mse.into_pyarray(py).reshape(bt)?.into_any().unbind(),
    })
}

/// The hybrid loss of Nichol & Dhariwal (2021) for a learned-range model output [B, 2C, ...]:
/// per sample `mse + (T/1000) · L_t` (L_t in bits/dim with the model's mean frozen, so it trains
/// only the variance channels). Returns `(loss [B] float64, grad)` with `grad` the gradient of
/// the summed loss with respect to `model_output`.
#[pyfunction]
#[pyo3(signature = (schedule, x0, x_t, noise, t, model_output, *, prediction="epsilon", bins=256))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn hybrid_loss<'py>(
    py: Python<'py>,
    schedule: &PySchedule,
    x0: &Bound<'py, PyAny>,
    x_t: &Bound<'py, PyAny>,
    noise: &Bound<'py, PyAny>,
    t: &Bound<'py, PyAny>,
    model_output: &Bound<'py, PyAny>,
    prediction: &str,
    bins: u32,
) -> PyResult<(Bound<'py, PyArray1<f64>>, Bound<'py, PyArrayDyn<f32>>)> {
    let p = Prediction::parse(prediction)?;
    let (a, xt, z, m) = (
        f32_array(x0, "x0")?,
        f32_array(x_t, "x_t")?,
        f32_array(noise, "noise")?,
        f32_array(model_output, "model_output")?,
    );
    let shape = a.shape().to_vec();
    crate::diffusion::check_shapes("x_t", xt.shape(), "x0", &shape)?;
    crate::diffusion::check_shapes("noise", z.shape(), "x0", &shape)?;
    let ts = timesteps_arg(t, batch_of(&shape, "x0")?)?;
    let mshape = m.shape().to_vec();
    let grad = new_f32(py, &mshape);
    let r = {
        let (ar, xr, zr, mr) = (a.readonly(), xt.readonly(), z.readonly(), m.readonly());
        let mut gw = grad.readwrite();
        let (av, xv, zv, mv, gv) = (
            ar.as_slice()?,
            xr.as_slice()?,
            zr.as_slice()?,
            mr.as_slice()?,
            gw.as_slice_mut()?,
        );
        let s = &schedule.inner;
        py.detach(|| loss::hybrid_loss(s, &shape, av, xv, zv, &ts, mv, &mshape, p, bins, Some(gv)))?
    };
    Ok((r.loss.into_pyarray(py), grad))
}

/// Draws training timesteps: "uniform", or "loss_second_moment" (Nichol & Dhariwal 2021,
/// sec. 3.3: p_t ∝ sqrt(E[L_t²]) over the last `history` losses at t, mixed with `uniform_prob`
/// of the uniform distribution, uniform until every t has a full history). `sample` returns the
/// timesteps and the weights 1/(T p_t) that keep the weighted loss unbiased; `update` records
/// observed losses. Picklable; `to_dict` / `from_dict` keep the history and the draw counter.
#[pyclass(name = "TimestepSampler", module = "ferrodiff.losses")]
pub struct PyTimestepSampler {
    inner: loss::TimestepSampler,
}

#[pymethods]
impl PyTimestepSampler {
    #[new]
    #[pyo3(signature = (num_timesteps, kind="uniform", history=loss::HISTORY_PER_TERM, uniform_prob=loss::UNIFORM_PROB))]
    fn new(num_timesteps: usize, kind: &str, history: usize, uniform_prob: f64) -> PyResult<Self> {
        let k = match kind {
            "uniform" => loss::TimestepSampling::Uniform,
            "loss_second_moment" => loss::TimestepSampling::LossSecondMoment,
            other => {
                return Err(PyValueError::new_err(format!(
                "unknown timestep sampler {other:?}: expected 'uniform' or 'loss_second_moment'"
            )))
            }
        };
        Ok(PyTimestepSampler {
            inner: loss::TimestepSampler::new(k, num_timesteps, history, uniform_prob)?,
        })
    }

    #[getter]
    fn kind(&self) -> &'static str {
        match self.inner.kind {
            loss::TimestepSampling::Uniform => "uniform",
            loss::TimestepSampling::LossSecondMoment => "loss_second_moment",
        }
    }
    #[getter]
    fn num_timesteps(&self) -> usize {
        self.inner.num_timesteps
    }
    #[getter]
    fn warmed_up(&self) -> bool {
        self.inner.warmed_up()
    }

    /// The sampling distribution p_t, float64 [T].
    fn probabilities<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.probabilities().into_pyarray(py)
    }

    /// `(t int64 [batch], weights float64 [batch])`; the draws continue a counter, so successive
    /// calls with one seed give fresh timesteps.
    #[pyo3(signature = (batch, seed=0))]
    fn sample<'py>(
        &mut self,
        py: Python<'py>,
        batch: usize,
        seed: u64,
    ) -> (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<f64>>) {
        let (t, w) = self.inner.sample(batch, seed);
        (t.into_pyarray(py), w.into_pyarray(py))
    }

    /// Records per-sample losses observed at timesteps t.
    fn update(&mut self, t: &Bound<'_, PyAny>, losses: &Bound<'_, PyAny>) -> PyResult<()> {
        let l = f64_vec(losses, "losses")?;
        let ts = timesteps_arg(t, l.len())?;
        Ok(self.inner.update(&ts, &l)?)
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let d = pyo3::types::PyDict::new(py);
        d.set_item("num_timesteps", self.inner.num_timesteps)?;
        d.set_item("kind", self.kind())?;
        d.set_item("history", self.inner.history)?;
        d.set_item("uniform_prob", self.inner.uniform_prob)?;
        d.set_item("losses", self.inner.losses.clone())?;
        d.set_item("counts", self.inner.counts.clone())?;
        d.set_item("draws", self.inner.draws)?;
        Ok(d)
    }

    #[staticmethod]
    fn from_dict(d: &Bound<'_, pyo3::types::PyDict>) -> PyResult<Self> {
        let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
            d.get_item(k)?.ok_or_else(|| {
                PyValueError::new_err(format!("TimestepSampler dict has no {k:?} key"))
            })
        };
        let mut s = PyTimestepSampler::new(
            get("num_timesteps")?.extract()?,
            &get("kind")?.extract::<String>()?,
            get("history")?.extract()?,
            get("uniform_prob")?.extract()?,
        )?;
        let losses: Vec<f64> = get("losses")?.extract()?;
        let counts: Vec<usize> = get("counts")?.extract()?;
        if losses.len() != s.inner.losses.len()
            || counts.len() != s.inner.counts.len()
            || counts.iter().any(|&c| c > s.inner.history)
        {
            return Err(PyValueError::new_err(
                "TimestepSampler dict has a history of the wrong size",
            ));
        }
        s.inner.losses = losses;
        s.inner.counts = counts;
        s.inner.draws = get("draws")?.extract()?;
        Ok(s)
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, pyo3::types::PyDict>,))> {
        Ok((
            slf.get_type().getattr("from_dict")?,
            (slf.borrow().to_dict(slf.py())?,),
        ))
    }

    fn __repr__(&self) -> String {
        format!(
            "TimestepSampler(T={}, kind={:?}, warmed_up={})",
            self.inner.num_timesteps,
            self.kind(),
            self.inner.warmed_up()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(hybrid_loss, m)?)?;
    m.add_class::<PyTimestepSampler>()?;
    m.add_function(wrap_pyfunction!(training_target, m)?)?;
    m.add_function(wrap_pyfunction!(loss_weight, m)?)?;
    m.add_function(wrap_pyfunction!(simple_loss, m)?)?;
    m.add_function(wrap_pyfunction!(_normal_kl, m)?)?;
    m.add_function(wrap_pyfunction!(_approx_standard_normal_cdf, m)?)?;
    m.add_function(wrap_pyfunction!(_discretized_gaussian_log_likelihood, m)?)?;
    m.add_function(wrap_pyfunction!(vb_terms_bpd, m)?)?;
    m.add_function(wrap_pyfunction!(prior_bpd, m)?)?;
    m.add_function(wrap_pyfunction!(bits_per_dim, m)?)?;
    m.add_class::<PyBitsPerDim>()?;
    Ok(())
}
