//! `ferrodiff.oracles`: analytic denoisers for checking samplers.

use numpy::{IntoPyArray, PyArray2, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::arrays::{batch_of, f32_array, f64_vec, timesteps_arg, vec_to_array};
use super::schedule::PySchedule;
use crate::diffusion::Prediction;
use crate::oracles::{self, GaussianMixture, MixtureDenoiser};
use crate::sample::Denoiser;

/// A mixture of isotropic Gaussians, Σ_k w_k N(μ_k, s_k² I), whose exact denoiser is known in
/// closed form for any schedule: the optimal ε-prediction E[ε | x_t] and the class posterior
/// p(k | x_t). `means` is [K, D]; `weights` and `stds` are [K].
#[pyclass(name = "GaussianMixture", module = "ferrodiff.oracles", frozen)]
pub struct PyGaussianMixture {
    pub(crate) inner: GaussianMixture,
}

fn rows_2d(x: &Bound<'_, PyAny>, name: &str, dim: usize) -> PyResult<(Vec<f32>, Vec<usize>)> {
    let a = f32_array(x, name)?;
    let sh = a.shape().to_vec();
    batch_of(&sh, name)?;
    let row: usize = sh[1..].iter().product();
    if row != dim {
        return Err(PyValueError::new_err(format!(
            "{name} rows have {row} elements (shape {sh:?}) but the mixture has dimension {dim}"
        )));
    }
    Ok((a.readonly().as_slice()?.to_vec(), sh))
}

#[pymethods]
impl PyGaussianMixture {
    #[new]
    #[pyo3(signature = (weights, means, stds))]
    fn new(
        weights: &Bound<'_, PyAny>,
        means: &Bound<'_, PyAny>,
        stds: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let w = f64_vec(weights, "weights")?;
        let np = means.py().import("numpy")?;
        let m = np.call_method1("asarray", (means, "float64"))?;
        let shape: Vec<usize> = m.getattr("shape")?.extract()?;
        if shape.len() != 2 {
            return Err(PyValueError::new_err(format!(
                "means must be [K, D], got shape {shape:?}"
            )));
        }
        let flat = f64_vec(&m.call_method1("reshape", (-1,))?, "means")?;
        let s = f64_vec(stds, "stds")?;
        Ok(PyGaussianMixture {
            inner: GaussianMixture::new(w, flat, s, shape[1])?,
        })
    }

    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim
    }
    #[getter]
    fn weights<'py>(&self, py: Python<'py>) -> Bound<'py, numpy::PyArray1<f64>> {
        self.inner.weights.clone().into_pyarray(py)
    }
    #[getter]
    fn means<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self
            .inner
            .means
            .clone()
            .into_pyarray(py)
            .reshape([self.inner.components(), self.inner.dim])?
            .into_any())
    }
    #[getter]
    fn stds<'py>(&self, py: Python<'py>) -> Bound<'py, numpy::PyArray1<f64>> {
        self.inner.stds.clone().into_pyarray(py)
    }

    /// The exact E[ε | x_t] for x ([B, D] or [B, ...] with D elements per row) at timesteps t.
    fn eps<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
        schedule: &PySchedule,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        self.predict(py, x, t, schedule, Prediction::Epsilon)
    }

    /// The component posterior p(k | x_t), [B, K] float64.
    fn class_posterior<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
        schedule: &PySchedule,
    ) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let (v, sh) = rows_2d(x, "x", self.inner.dim)?;
        let ts = timesteps_arg(t, sh[0])?;
        let ab: Vec<f64> = ts
            .iter()
            .map(|&ti| Ok(schedule.inner.alphas_cumprod[schedule.inner.check_timestep(ti)?]))
            .collect::<crate::Result<_>>()?;
        let r = self.inner.class_posterior(&v, &ab);
        r.into_pyarray(py).reshape([sh[0], self.inner.components()])
    }

    /// A callable `denoiser(x, t)` returning the exact prediction of type `prediction`.
    #[pyo3(signature = (schedule, prediction="epsilon"))]
    fn denoiser(
        slf: Py<Self>,
        schedule: PyRef<'_, PySchedule>,
        prediction: &str,
    ) -> PyResult<MixtureCallable> {
        Ok(MixtureCallable {
            mixture: slf,
            schedule: PySchedule {
                inner: schedule.inner.clone(),
            },
            prediction: Prediction::parse(prediction)?,
        })
    }

    /// `n` exact samples [n, D] (float32), a pure function of the seed.
    #[pyo3(signature = (n, seed=0))]
    fn sample<'py>(
        &self,
        py: Python<'py>,
        n: usize,
        seed: u64,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let v = py.detach(|| self.inner.sample(n, seed));
        vec_to_array(py, v, &[n, self.inner.dim])
    }

    fn __repr__(&self) -> String {
        format!(
            "GaussianMixture(K={}, D={})",
            self.inner.components(),
            self.inner.dim
        )
    }
}

impl PyGaussianMixture {
    fn predict<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
        schedule: &PySchedule,
        prediction: Prediction,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let (v, sh) = rows_2d(x, "x", self.inner.dim)?;
        let ts = timesteps_arg(t, sh[0])?;
        let mut d = MixtureDenoiser {
            mixture: &self.inner,
            schedule: &schedule.inner,
            prediction,
        };
        let out = py.detach(|| d.predict(&v, &sh, &ts))?;
        vec_to_array(py, out.data, &sh)
    }
}

/// The exact denoiser of a `GaussianMixture` for one schedule, callable as `f(x, t)`.
#[pyclass(module = "ferrodiff.oracles", frozen)]
pub struct MixtureCallable {
    mixture: Py<PyGaussianMixture>,
    schedule: PySchedule,
    prediction: Prediction,
}

#[pymethods]
impl MixtureCallable {
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        self.mixture
            .get()
            .predict(py, x, t, &self.schedule, self.prediction)
    }
}

/// Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| between samples a [N, D] and b [M, D]
/// (U-statistics: ≈ 0 for two samples of one distribution).
#[pyfunction]
fn energy_distance(py: Python<'_>, a: &Bound<'_, PyAny>, b: &Bound<'_, PyAny>) -> PyResult<f64> {
    let (aa, ba) = (f32_array(a, "a")?, f32_array(b, "b")?);
    let (sa, sb) = (aa.shape().to_vec(), ba.shape().to_vec());
    let n = batch_of(&sa, "a")?;
    let m = batch_of(&sb, "b")?;
    let da: usize = sa[1..].iter().product();
    let db: usize = sb[1..].iter().product();
    if da != db {
        return Err(PyValueError::new_err(format!(
            "a has shape {sa:?} but b has shape {sb:?}: rows must have the same size"
        )));
    }
    let (ar, br) = (aa.readonly(), ba.readonly());
    let (av, bv) = (ar.as_slice()?, br.as_slice()?);
    Ok(py.detach(|| oracles::energy_distance(av, n, bv, m, da))?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyGaussianMixture>()?;
    m.add_class::<MixtureCallable>()?;
    m.add_function(wrap_pyfunction!(energy_distance, m)?)?;
    Ok(())
}
