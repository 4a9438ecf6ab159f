//! `ferrodiff.Schedule` and the module-level schedule helpers.

use numpy::{IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use super::arrays::{batch_of, f32_array, f64_vec, new_f32, timesteps_arg};
use crate::diffusion::{self, Prediction};
use crate::schedule::{self as sch, Schedule, Spacing};

/// A discrete noise schedule: β_t for t in [0, T) and every table derived from it (float64).
///
/// Build one with `Schedule.linear`, `.scaled_linear`, `.cosine`, `.sigmoid`,
/// `.sigmoid_alpha_bar`, `.from_betas`, `.from_alphas_cumprod` or `.from_diffusers_config`.
/// Timesteps are 0-based: `alphas_cumprod[t]` is the paper's ᾱ_{t+1} (diffusers' convention).
#[pyclass(name = "Schedule", module = "ferrodiff", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PySchedule {
    pub inner: Schedule,
}

fn table<'py>(py: Python<'py>, v: &[f64]) -> Bound<'py, PyArray1<f64>> {
    v.to_vec().into_pyarray(py)
}

/// Reads a JSON config given as a dict, a path (str / PathLike) or an object with `.config`.
pub fn config_json(config: &Bound<'_, PyAny>) -> PyResult<String> {
    let py = config.py();
    let json = py.import("json")?;
    if config.is_instance_of::<PyDict>() {
        return json.call_method1("dumps", (config,))?.extract();
    }
    if let Ok(cfg) = config.getattr("config") {
        let d = py.import("builtins")?.getattr("dict")?.call1((cfg,))?;
        return json.call_method1("dumps", (d,))?.extract();
    }
    let os = py.import("os")?;
    if config.is_instance_of::<PyString>() || config.is_instance(&os.getattr("PathLike")?)? {
        let path: String = os.call_method1("fspath", (config,))?.extract()?;
        let path = std::path::Path::new(&path);
        let path = if path.is_dir() {
            path.join("scheduler_config.json")
        } else {
            path.to_path_buf()
        };
        return std::fs::read_to_string(&path).map_err(|e| {
            pyo3::exceptions::PyFileNotFoundError::new_err(format!(
                "cannot read scheduler config {}: {e}",
                path.display()
            ))
        });
    }
    Err(PyTypeError::new_err(format!(
        "config must be a dict, a path to scheduler_config.json, or a diffusers scheduler, got {}",
        super::arrays::type_name(config)
    )))
}

impl PySchedule {
    fn unary<'py>(
        &self,
        py: Python<'py>,
        shape_src: (&Bound<'py, PyAny>, &str),
        other: (&Bound<'py, PyAny>, &str),
        t: &Bound<'py, PyAny>,
        f: impl FnOnce(&Schedule, &[usize], &[f32], &[i64], &[f32], &mut [f32]) -> crate::Result<()>
            + Send,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let a = f32_array(shape_src.0, shape_src.1)?;
        let b = f32_array(other.0, other.1)?;
        let shape = a.shape().to_vec();
        if b.shape() != shape.as_slice() {
            return Err(PyValueError::new_err(format!(
                "{} has shape {:?} but {} has shape {:?}",
                other.1,
                b.shape(),
                shape_src.1,
                shape
            )));
        }
        let batch = batch_of(&shape, shape_src.1)?;
        let ts = timesteps_arg(t, batch)?;
        let out = new_f32(py, &shape);
        {
            let (ar, br) = (a.readonly(), b.readonly());
            let mut ow = out.readwrite();
            let (av, bv, ov) = (ar.as_slice()?, br.as_slice()?, ow.as_slice_mut()?);
            let s = &self.inner;
            py.detach(|| f(s, &shape, av, &ts, bv, ov))?;
        }
        Ok(out)
    }
}

#[pymethods]
impl PySchedule {
    /// The schedule a model was trained with, from its training checkpoint (a run folder or
    /// its .safetensors file).
    #[staticmethod]
    fn from_checkpoint(path: std::path::PathBuf) -> PyResult<Self> {
        let (_, schedule, _) = crate::train::read_checkpoint_info(&path)?;
        Ok(PySchedule { inner: schedule })
    }

    /// diffusers' linear schedule `linspace(beta_start, beta_end, T)`; with `scale_with_T=True`,
    /// OpenAI's form that multiplies both ends by 1000/T.
    #[staticmethod]
    #[pyo3(signature = (num_train_timesteps=1000, beta_start=sch::LINEAR_BETA_START, beta_end=sch::LINEAR_BETA_END, *, scale_with_T=false))]
    #[allow(non_snake_case)]
    fn linear(
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
        scale_with_T: bool,
    ) -> PyResult<Self> {
        Ok(PySchedule {
            inner: Schedule::linear(num_train_timesteps, beta_start, beta_end, scale_with_T)?,
        })
    }

    /// Stable Diffusion's `linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`.
    #[staticmethod]
    #[pyo3(signature = (num_train_timesteps=1000, beta_start=sch::SCALED_LINEAR_BETA_START, beta_end=sch::SCALED_LINEAR_BETA_END))]
    fn scaled_linear(num_train_timesteps: usize, beta_start: f64, beta_end: f64) -> PyResult<Self> {
        Ok(PySchedule {
            inner: Schedule::scaled_linear(num_train_timesteps, beta_start, beta_end)?,
        })
    }

    /// Nichol & Dhariwal's cosine schedule (diffusers' `squaredcos_cap_v2`).
    #[staticmethod]
    #[pyo3(signature = (num_train_timesteps=1000, s=sch::COSINE_OFFSET, max_beta=sch::COSINE_MAX_BETA))]
    fn cosine(num_train_timesteps: usize, s: f64, max_beta: f64) -> PyResult<Self> {
        Ok(PySchedule {
            inner: Schedule::cosine(num_train_timesteps, s, max_beta)?,
        })
    }

    /// diffusers' sigmoid schedule `sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start`.
    #[staticmethod]
    #[pyo3(signature = (num_train_timesteps=1000, beta_start=sch::LINEAR_BETA_START, beta_end=sch::LINEAR_BETA_END))]
    fn sigmoid(num_train_timesteps: usize, beta_start: f64, beta_end: f64) -> PyResult<Self> {
        Ok(PySchedule {
            inner: Schedule::sigmoid(num_train_timesteps, beta_start, beta_end)?,
        })
    }

    /// The sigmoid ᾱ schedule of Jabri et al. 2022 (lucidrains' `sigmoid_beta_schedule`).
    #[staticmethod]
    #[pyo3(signature = (num_train_timesteps=1000, start=-3.0, end=3.0, tau=1.0))]
    fn sigmoid_alpha_bar(
        num_train_timesteps: usize,
        start: f64,
        end: f64,
        tau: f64,
    ) -> PyResult<Self> {
        Ok(PySchedule {
            inner: Schedule::sigmoid_alpha_bar(num_train_timesteps, start, end, tau)?,
        })
    }

    /// A schedule from explicit betas, each in (0, 1].
    #[staticmethod]
    fn from_betas(betas: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(PySchedule {
            inner: Schedule::from_betas(f64_vec(betas, "betas")?)?,
        })
    }

    /// A schedule from ᾱ_t (non-increasing, in [0, 1), only the last may be 0).
    #[staticmethod]
    fn from_alphas_cumprod(alphas_cumprod: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(PySchedule {
            inner: Schedule::from_alphas_cumprod(f64_vec(alphas_cumprod, "alphas_cumprod")?)?,
        })
    }

    /// The training schedule of a diffusers scheduler config (dict, path to
    /// `scheduler_config.json` or its folder, or a diffusers scheduler object).
    #[staticmethod]
    fn from_diffusers_config(config: &Bound<'_, PyAny>) -> PyResult<Self> {
        let c = sch::DiffusersConfig::from_json(&config_json(config)?)?;
        Ok(PySchedule {
            inner: c.schedule()?,
        })
    }

    /// Lin et al. 2023, Algorithm 1: the same schedule rescaled to zero terminal SNR (a new object).
    fn rescale_zero_terminal_snr(&self) -> PyResult<Self> {
        Ok(PySchedule {
            inner: self.inner.rescale_zero_terminal_snr()?,
        })
    }

    /// The process restricted to an ascending subset of timesteps (strided sampling).
    fn respaced(&self, timesteps: &Bound<'_, PyAny>) -> PyResult<Self> {
        let ts = f64_vec(timesteps, "timesteps")?;
        let ts: Vec<i64> = ts.iter().map(|&t| t as i64).collect();
        Ok(PySchedule {
            inner: self.inner.respaced(&ts)?,
        })
    }

    #[getter]
    fn num_train_timesteps(&self) -> usize {
        self.inner.len()
    }
    fn __len__(&self) -> usize {
        self.inner.len()
    }
    #[getter]
    fn name(&self) -> String {
        self.inner.name.clone()
    }
    #[getter]
    fn betas<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        table(py, &self.inner.betas)
    }
    #[getter]
    fn alphas<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        table(py, &self.inner.alphas)
    }
    #[getter]
    fn alphas_cumprod<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        table(py, &self.inner.alphas_cumprod)
    }
    #[getter]
    fn alphas_cumprod_prev<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        table(py, &self.inner.alphas_cumprod_prev)
    }
    #[getter]
    fn posterior_variance<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        table(py, &self.inner.posterior_variance)
    }
    #[getter]
    fn posterior_log_variance_clipped<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        table(py, &self.inner.posterior_log_variance_clipped)
    }
    #[getter]
    fn posterior_mean_coef1<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        table(py, &self.inner.posterior_mean_coef1)
    }
    #[getter]
    fn posterior_mean_coef2<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        table(py, &self.inner.posterior_mean_coef2)
    }
    #[getter]
    fn snr<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        table(py, &self.inner.snr())
    }
    #[getter]
    fn sigmas<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        table(py, &self.inner.sigmas())
    }
    #[getter]
    fn sqrt_alphas_cumprod<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        table(
            py,
            &self
                .inner
                .alphas_cumprod
                .iter()
                .map(|a| a.sqrt())
                .collect::<Vec<_>>(),
        )
    }
    #[getter]
    fn sqrt_one_minus_alphas_cumprod<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        table(
            py,
            &self
                .inner
                .alphas_cumprod
                .iter()
                .map(|a| (1.0 - a).sqrt())
                .collect::<Vec<_>>(),
        )
    }

    /// Forward process: x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) noise, with one t per row.
    fn q_sample<'py>(
        &self,
        py: Python<'py>,
        x0: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
        noise: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        self.unary(py, (x0, "x0"), (noise, "noise"), t, |s, sh, a, ts, b, o| {
            diffusion::q_sample(s, sh, a, ts, b, o)
        })
    }

    /// The v target sqrt(ᾱ_t) noise - sqrt(1-ᾱ_t) x0.
    fn velocity<'py>(
        &self,
        py: Python<'py>,
        x0: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
        noise: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        self.unary(py, (x0, "x0"), (noise, "noise"), t, |s, sh, a, ts, b, o| {
            diffusion::velocity(s, sh, a, ts, b, o)
        })
    }

    /// x0 from a model output of type `prediction` ("epsilon" | "x0" | "v").
    #[pyo3(signature = (x_t, t, model_output, prediction="epsilon"))]
    fn predict_x0<'py>(
        &self,
        py: Python<'py>,
        x_t: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
        model_output: &Bound<'py, PyAny>,
        prediction: &str,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let p = Prediction::parse(prediction)?;
        self.unary(
            py,
            (x_t, "x_t"),
            (model_output, "model_output"),
            t,
            move |s, sh, a, ts, b, o| diffusion::predict_x0(s, sh, a, ts, b, p, o),
        )
    }

    /// ε from a model output of type `prediction`.
    #[pyo3(signature = (x_t, t, model_output, prediction="epsilon"))]
    fn predict_eps<'py>(
        &self,
        py: Python<'py>,
        x_t: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
        model_output: &Bound<'py, PyAny>,
        prediction: &str,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let p = Prediction::parse(prediction)?;
        self.unary(
            py,
            (x_t, "x_t"),
            (model_output, "model_output"),
            t,
            move |s, sh, a, ts, b, o| diffusion::predict_eps(s, sh, a, ts, b, p, o),
        )
    }

    /// The score ∇ log q(x_t) = -ε / sqrt(1-ᾱ_t) from a model output of type `prediction`.
    #[pyo3(signature = (x_t, t, model_output, prediction="epsilon"))]
    fn score<'py>(
        &self,
        py: Python<'py>,
        x_t: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
        model_output: &Bound<'py, PyAny>,
        prediction: &str,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let p = Prediction::parse(prediction)?;
        self.unary(
            py,
            (x_t, "x_t"),
            (model_output, "model_output"),
            t,
            move |s, sh, a, ts, b, o| diffusion::score(s, sh, a, ts, b, p, o),
        )
    }

    /// ε from a score ∇ log q(x_t): ε = -sqrt(1-ᾱ_t) · score (the inverse of `score`).
    fn eps_from_score<'py>(
        &self,
        py: Python<'py>,
        score: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        self.unary(
            py,
            (score, "score"),
            (score, "score"),
            t,
            |s, sh, a, ts, _, o| diffusion::eps_from_score(s, sh, a, ts, o),
        )
    }

    /// The posterior q(x_{t-1} | x_t, x0): `(mean, variance, log_variance)`, the last two of
    /// shape [B, 1, ...] (broadcastable), log variance clipped at t = 0 as OpenAI's code.
    #[allow(clippy::type_complexity)]
    fn q_posterior<'py>(
        &self,
        py: Python<'py>,
        x0: &Bound<'py, PyAny>,
        x_t: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
    ) -> PyResult<(
        Bound<'py, PyArrayDyn<f32>>,
        Bound<'py, PyArrayDyn<f32>>,
        Bound<'py, PyArrayDyn<f32>>,
    )> {
        let mut var = Vec::new();
        let mut logvar = Vec::new();
        let (vr, lr) = (&mut var, &mut logvar);
        let mean = self.unary(
            py,
            (x0, "x0"),
            (x_t, "x_t"),
            t,
            move |s, sh, a, ts, b, o| {
                let (v, l) = diffusion::q_posterior_mean(s, sh, a, b, ts, o)?;
                *vr = v;
                *lr = l;
                Ok(())
            },
        )?;
        let mut shape = vec![1usize; mean.ndim()];
        shape[0] = mean.shape()[0];
        let to = |v: Vec<f64>| -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
            super::arrays::vec_to_array(py, v.into_iter().map(|x| x as f32).collect(), &shape)
        };
        Ok((mean, to(var)?, to(logvar)?))
    }

    /// A plain dict that `Schedule.from_dict` turns back into this schedule exactly.
    pub fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("name", &self.inner.name)?;
        d.set_item("betas", PyList::new(py, &self.inner.betas)?)?;
        d.set_item(
            "alphas_cumprod",
            PyList::new(py, &self.inner.alphas_cumprod)?,
        )?;
        Ok(d)
    }

    #[staticmethod]
    pub fn from_dict(d: &Bound<'_, PyDict>) -> PyResult<Self> {
        let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
            d.get_item(k)?
                .ok_or_else(|| PyValueError::new_err(format!("schedule dict has no {k:?} key")))
        };
        let name: String = get("name")?.extract()?;
        let betas = f64_vec(&get("betas")?, "betas")?;
        let abar = f64_vec(&get("alphas_cumprod")?, "alphas_cumprod")?;
        Ok(PySchedule {
            inner: Schedule::from_parts(&name, betas, abar)?,
        })
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyDict>,))> {
        let f = slf.get_type().getattr("from_dict")?;
        Ok((f, (slf.get().to_dict(slf.py())?,)))
    }

    fn __repr__(&self) -> String {
        let s = &self.inner;
        format!(
            "Schedule({}, T={}, beta_0={:.6e}, beta_T={:.6e}, alphas_cumprod_T={:.6e})",
            s.name,
            s.len(),
            s.betas[0],
            s.betas[s.len() - 1],
            s.alphas_cumprod[s.len() - 1]
        )
    }
}

/// Parses the `spacing` argument: a name, an OpenAI string or a descending integer array.
pub fn spacing_arg(spacing: &Bound<'_, PyAny>) -> PyResult<Spacing> {
    if let Ok(s) = spacing.extract::<String>() {
        return Ok(Spacing::parse(&s)?);
    }
    let v = f64_vec(spacing, "spacing").map_err(|_| {
        PyTypeError::new_err(format!(
            "spacing must be 'leading', 'trailing', 'linspace', an OpenAI string like 'ddim50', or a descending int array; got {}",
            super::arrays::type_name(spacing)
        ))
    })?;
    if v.iter().any(|x| x.fract() != 0.0) {
        return Err(PyTypeError::new_err("explicit timesteps must be integers"));
    }
    Ok(Spacing::Explicit(v.into_iter().map(|x| x as i64).collect()))
}

/// The descending timesteps a sampler with these settings visits.
#[pyfunction]
#[pyo3(signature = (num_train_timesteps, steps=None, spacing=None, steps_offset=0))]
fn timesteps<'py>(
    py: Python<'py>,
    num_train_timesteps: usize,
    steps: Option<usize>,
    spacing: Option<&Bound<'py, PyAny>>,
    steps_offset: i64,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let sp = match spacing {
        Some(s) => spacing_arg(s)?,
        None => Spacing::Leading,
    };
    Ok(sch::select_timesteps(num_train_timesteps, steps, &sp, steps_offset)?.into_pyarray(py))
}

/// OpenAI's `space_timesteps`: the kept timesteps for `"ddimN"` or `"a,b,c"`, ascending.
#[pyfunction]
fn space_timesteps<'py>(
    py: Python<'py>,
    num_train_timesteps: usize,
    section_counts: &str,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    Ok(sch::space_timesteps(num_train_timesteps, section_counts)?.into_pyarray(py))
}

/// Karras et al. 2022 σ grid (eq. 5): n values from sigma_max to sigma_min, then 0.
#[pyfunction]
#[pyo3(signature = (n, sigma_min=0.002, sigma_max=80.0, rho=7.0))]
fn karras_sigmas<'py>(
    py: Python<'py>,
    n: usize,
    sigma_min: f64,
    sigma_max: f64,
    rho: f64,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    Ok(sch::karras_sigmas(n, sigma_min, sigma_max, rho)?.into_pyarray(py))
}

/// Continuous cosine log-SNR λ(u) = -2 ln tan(a u + b), u in [0, 1] (float or array).
#[pyfunction]
#[pyo3(signature = (u, log_snr_min=sch::LOG_SNR_MIN, log_snr_max=sch::LOG_SNR_MAX))]
fn cosine_log_snr<'py>(
    py: Python<'py>,
    u: &Bound<'py, PyAny>,
    log_snr_min: f64,
    log_snr_max: f64,
) -> PyResult<Bound<'py, PyAny>> {
    if log_snr_min.partial_cmp(&log_snr_max) != Some(std::cmp::Ordering::Less) {
        return Err(PyValueError::new_err(format!(
            "log_snr_min ({log_snr_min}) must be below log_snr_max ({log_snr_max})"
        )));
    }
    if let Ok(x) = u.extract::<f64>() {
        return Ok(sch::cosine_log_snr(x, log_snr_min, log_snr_max)
            .into_pyobject(py)?
            .into_any());
    }
    let v = f64_vec(u, "u")?;
    let out: Vec<f64> = v
        .iter()
        .map(|&x| sch::cosine_log_snr(x, log_snr_min, log_snr_max))
        .collect();
    Ok(out.into_pyarray(py).into_any())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySchedule>()?;
    m.add_function(wrap_pyfunction!(timesteps, m)?)?;
    m.add_function(wrap_pyfunction!(space_timesteps, m)?)?;
    m.add_function(wrap_pyfunction!(karras_sigmas, m)?)?;
    m.add_function(wrap_pyfunction!(cosine_log_snr, m)?)?;
    Ok(())
}
