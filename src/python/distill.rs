//! Bindings of few-step generation: the objectives' settings and teachers of `ferrodiff.Trainer`,
//! `ferrodiff.ConsistencySampler`, and the helpers of `ferrodiff.distill`.

use candle_core::{Device, Tensor};
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use super::arrays::{f32_array, type_name, vec_to_array};
use super::callback_error;
use super::nn::{json_dumps, model_of, PyTrainer};
use super::sampling::{sample_impl, EditArgs, GuidanceArgs};
use super::schedule::PySchedule;
use crate::error::Result;
use crate::nn::Ctx;
use crate::sample::consistency::{ConsistencyParams, ConsistencySampler};
use crate::sample::ModelOutput;
use crate::schedule::Schedule;
use crate::train::consistency::{
    consistency_forward, ct_ema_decay, ct_num_scales, ict_num_scales, CT_S0, CT_S1, ICT_S0, ICT_S1,
};
use crate::train::{ExternalTeacher, ObjectiveConfig, TeacherNet};

const OBJECTIVES: &str =
    "'diffusion', 'progressive_distillation', 'consistency_distillation', 'consistency_training', 'autoencoder' or 'super_resolution'";

/// The objective of `Trainer(objective=..., objective_options=...)`.
pub(crate) fn objective_arg(
    kind: &str,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<ObjectiveConfig> {
    let kind = kind.replace('-', "_");
    if !matches!(
        kind.as_str(),
        "diffusion"
            | "progressive_distillation"
            | "consistency_distillation"
            | "consistency_training"
            | "autoencoder"
            | "super_resolution"
    ) {
        return Err(PyValueError::new_err(format!(
            "objective must be {OBJECTIVES}, got {kind:?}"
        )));
    }
    let mut value = match options {
        Some(o) => serde_json::from_str::<serde_json::Value>(&json_dumps(o.as_any())?)
            .map_err(|e| PyValueError::new_err(format!("objective_options: {e}")))?,
        None => serde_json::json!({}),
    };
    let map = value
        .as_object_mut()
        .ok_or_else(|| PyTypeError::new_err("objective_options must be a dict"))?;
    if kind == "diffusion" && !map.is_empty() {
        return Err(PyValueError::new_err(
            "the diffusion objective takes its settings as Trainer arguments (prediction=, loss=, \
             weighting=, ...), not objective_options",
        ));
    }
    map.insert("kind".into(), serde_json::Value::String(kind.clone()));
    serde_json::from_value(value)
        .map_err(|e| PyValueError::new_err(format!("objective_options of {kind}: {e}")))
}

/// The trainer's schedule: required except for consistency training and autoencoders, which
/// use none (a placeholder is stored).
pub(crate) fn schedule_for(
    objective: &ObjectiveConfig,
    schedule: Option<&Bound<'_, PySchedule>>,
) -> PyResult<Schedule> {
    match (schedule, objective) {
        (Some(s), _) => Ok(s.get().inner.clone()),
        (None, ObjectiveConfig::ConsistencyTraining(_) | ObjectiveConfig::Autoencoder(_)) => {
            Ok(Schedule::linear(1000, 1e-4, 0.02, false)?)
        }
        (None, o) => Err(PyValueError::new_err(format!(
            "the {} objective needs the schedule (the teacher's, for distillation)",
            o.name()
        ))),
    }
}

/// A Python callable as a teacher: `teacher(x, t)` or `teacher(x, t, y)`, x float32 at the
/// variance-preserving scale, t float64 real-valued timesteps, y int64 labels.
struct PyCallableTeacher {
    f: Py<PyAny>,
}

impl ExternalTeacher for PyCallableTeacher {
    fn predict(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[f64],
        labels: Option<&[u32]>,
    ) -> Result<ModelOutput> {
        Python::attach(|py| -> PyResult<ModelOutput> {
            let f = self.f.bind(py);
            let xa = vec_to_array(py, x.to_vec(), shape)?;
            let ta = t.to_vec().into_pyarray(py);
            let r = match labels {
                Some(y) => {
                    let y: Vec<i64> = y.iter().map(|&v| v as i64).collect();
                    f.call1((xa, ta, y.into_pyarray(py)))?
                }
                None => f.call1((xa, ta))?,
            };
            let arr = f32_array(&r, "the teacher's output").map_err(|e| {
                PyTypeError::new_err(format!(
                    "the teacher must return a float array of x's shape, got {} ({})",
                    type_name(&r),
                    e.value(py)
                ))
            })?;
            let shape = arr.shape().to_vec();
            let data = arr.readonly().as_slice()?.to_vec();
            Ok(ModelOutput { data, shape })
        })
        .map_err(callback_error)
    }
}

/// A teacher: a ferrodiff model or trainer (its EMA weights), a saved model or run folder, or a
/// Python callable. A trainer or a checkpoint knows its schedule, which must be the student's.
pub(crate) fn teacher_arg(obj: &Bound<'_, PyAny>, schedule: &Schedule) -> PyResult<TeacherNet> {
    let same = |theirs: &Schedule, what: &str| -> PyResult<()> {
        let close = theirs.len() == schedule.len()
            && theirs
                .alphas_cumprod
                .iter()
                .zip(&schedule.alphas_cumprod)
                .all(|(a, b)| (a - b).abs() <= 1e-9 * a.abs().max(1e-12));
        if close {
            Ok(())
        } else {
            Err(PyValueError::new_err(format!(
                "the teacher ({what}) was trained on another noise schedule ({}, T = {}) than the \
                 one given ({}, T = {}): distil with the teacher's schedule",
                theirs.name,
                theirs.len(),
                schedule.name,
                schedule.len()
            )))
        }
    };
    if let Ok(t) = obj.cast::<PyTrainer>() {
        same(t.borrow().inner.schedule(), "a Trainer")?;
    }
    if let Some(m) = model_of(obj)? {
        return Ok(TeacherNet::Model(m));
    }
    if let Ok(path) = obj.extract::<std::path::PathBuf>() {
        let (model, theirs) = crate::train::load_model_and_schedule(&path, &Device::Cpu, true)?;
        if let Some(theirs) = theirs {
            same(&theirs, &path.display().to_string())?;
        }
        return Ok(TeacherNet::Model(model));
    }
    if obj.is_callable() {
        return Ok(TeacherNet::External(Box::new(PyCallableTeacher {
            f: obj.clone().unbind(),
        })));
    }
    Err(PyTypeError::new_err(format!(
        "teacher must be a ferrodiff model or trainer, a checkpoint path, or a callable \
         teacher(x, t[, y]), got {}",
        type_name(obj)
    )))
}

/// The consistency parameterisation of `model` when it is a consistency trainer.
fn params_of(model: &Bound<'_, PyAny>) -> PyResult<Option<ConsistencyParams>> {
    if let Ok(t) = model.cast::<PyTrainer>() {
        let t = t.borrow();
        return match t.inner.config.objective.consistency_params() {
            Some(p) => Ok(Some(p)),
            None => Err(PyValueError::new_err(format!(
                "the trainer's objective is {:?}, not a consistency objective",
                t.inner.config.objective.name()
            ))),
        };
    }
    Ok(None)
}

/// One- and multistep consistency sampling (Song et al. 2023, Algorithm 1).
///
/// `ConsistencySampler(model, steps=2)` samples `model` (a consistency trainer, whose σ range
/// and σ_data are read from its objective, or a `Model`); `sigmas=` gives the levels
/// explicitly (decreasing, in [sigma_min, sigma_max]); otherwise `steps` levels are placed on the
/// Karras ramp of `num_scales` points as diffusers' `CMStochasticIterativeScheduler` does.
/// The last step ends at σ_min; `clip_denoised` clamps each f to [-1, 1].
#[pyclass(name = "ConsistencySampler", module = "ferrodiff", frozen)]
pub struct PyConsistencySampler {
    inner: ConsistencySampler,
    model: Option<Py<PyAny>>,
}

#[pymethods]
impl PyConsistencySampler {
    #[new]
    #[pyo3(signature = (model=None, sigmas=None, *, steps=1, num_scales=40, sigma_min=None, sigma_max=None, sigma_data=None, rho=None, clip_denoised=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: Option<&Bound<'_, PyAny>>,
        sigmas: Option<Vec<f64>>,
        steps: usize,
        num_scales: usize,
        sigma_min: Option<f64>,
        sigma_max: Option<f64>,
        sigma_data: Option<f64>,
        rho: Option<f64>,
        clip_denoised: bool,
    ) -> PyResult<Self> {
        let mut p = match model {
            Some(m) => params_of(m)?.unwrap_or_default(),
            None => ConsistencyParams::default(),
        };
        if let Some(m) = model {
            if model_of(m)?.is_none() && !m.is_callable() {
                return Err(PyTypeError::new_err(format!(
                    "model must be a ferrodiff model or trainer or a callable, got {}",
                    type_name(m)
                )));
            }
        }
        p.sigma_min = sigma_min.unwrap_or(p.sigma_min);
        p.sigma_max = sigma_max.unwrap_or(p.sigma_max);
        p.sigma_data = sigma_data.unwrap_or(p.sigma_data);
        p.rho = rho.unwrap_or(p.rho);
        p.validate()?;
        let sigmas = match sigmas {
            Some(s) => s,
            None => p.sampling_sigmas(steps, num_scales)?,
        };
        Ok(PyConsistencySampler {
            inner: ConsistencySampler::new(p, sigmas, clip_denoised.then_some(1.0))?,
            model: model.map(|m| m.clone().unbind()),
        })
    }

    /// The σ levels evaluated, σ_max first.
    #[getter]
    fn sigmas(&self) -> Vec<f64> {
        self.inner.sigmas.clone()
    }

    /// The time inputs c_noise(σ) = 250 ln σ the network sees at each level.
    #[getter]
    fn timesteps(&self) -> Vec<f64> {
        self.inner
            .sigmas
            .iter()
            .map(|&s| ConsistencyParams::c_noise(s))
            .collect()
    }

    /// Model evaluations of a run.
    #[getter]
    fn steps(&self) -> usize {
        self.inner.sigmas.len()
    }

    #[getter]
    fn sigma_min(&self) -> f64 {
        self.inner.params.sigma_min
    }

    #[getter]
    fn sigma_max(&self) -> f64 {
        self.inner.params.sigma_max
    }

    #[getter]
    fn sigma_data(&self) -> f64 {
        self.inner.params.sigma_data
    }

    /// Samples: `sample(model, shape, ...)`, or `sample(shape, ...)` with the model given to the
    /// constructor. The keyword arguments are every sampler's: `labels`, classifier-free
    /// `guidance_scale` (models trained with label dropout), `context`, `image` + `strength`
    /// (SDEdit: start at level ⌊(1 − strength) · steps⌋ from the noised image), `mask`
    /// (inpainting: the known region is re-noised to each level, Algorithm 4), `x_T`, `seed`,
    /// `progress`, `callback(i, sigma, x, pred_x0)`, `check_finite`.
    #[pyo3(signature = (denoiser=None, shape=None, *, x_T=None, seed=None, progress=false, callback=None, check_finite=true, labels=None, guidance_scale=None, guidance_rescale=0.0, null_label=None, image=None, strength=1.0, mask=None, context=None, control_image=None, conditioning_scale=None))]
    #[allow(clippy::too_many_arguments, non_snake_case)]
    fn sample<'py>(
        slf: &Bound<'py, Self>,
        denoiser: Option<&Bound<'py, PyAny>>,
        shape: Option<Vec<i64>>,
        x_T: Option<&Bound<'py, PyAny>>,
        seed: Option<u64>,
        progress: bool,
        callback: Option<Bound<'py, PyAny>>,
        check_finite: bool,
        labels: Option<&Bound<'py, PyAny>>,
        guidance_scale: Option<f64>,
        guidance_rescale: f64,
        null_label: Option<i64>,
        image: Option<&Bound<'py, PyAny>>,
        strength: f64,
        mask: Option<&Bound<'py, PyAny>>,
        context: Option<&Bound<'py, PyAny>>,
        control_image: Option<&Bound<'py, PyAny>>,
        conditioning_scale: Option<f64>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let py = slf.py();
        let this = slf.get();
        let stored = this.model.as_ref().map(|m| m.bind(py).clone());
        let is_shape =
            |o: &Bound<'py, PyAny>| o.is_instance_of::<PyTuple>() || o.is_instance_of::<PyList>();
        let (model, shape) = match (denoiser, shape) {
            (Some(d), None) if is_shape(d) => (stored, Some(d.extract::<Vec<i64>>()?)),
            (Some(d), s) => (Some(d.clone()), s),
            (None, s) => (stored, s),
        };
        let Some(model) = model else {
            return Err(PyValueError::new_err(
                "sample() needs the consistency model: ConsistencySampler(model) or sample(model, shape)",
            ));
        };
        if let Some(p) = params_of(&model)? {
            let q = &this.inner.params;
            if (p.sigma_min, p.sigma_data) != (q.sigma_min, q.sigma_data) {
                return Err(PyValueError::new_err(format!(
                    "the model was trained with sigma_min = {}, sigma_data = {} but the sampler \
                     uses {}, {}: build the sampler from the model",
                    p.sigma_min, p.sigma_data, q.sigma_min, q.sigma_data
                )));
            }
        }
        let guidance = GuidanceArgs {
            scale: guidance_scale,
            rescale: guidance_rescale,
            null_label,
        };
        let edit = EditArgs {
            context,
            control_image,
            conditioning_scale,
            image,
            strength,
            mask,
            classifier: None,
            classifier_scale: 0.0,
        };
        sample_impl(
            &this.inner,
            py,
            &model,
            shape,
            x_T,
            seed,
            progress,
            callback,
            check_finite,
            labels,
            guidance,
            edit,
            "ConsistencySampler",
        )
    }

    fn __repr__(&self) -> String {
        let p = &self.inner.params;
        format!(
            "ferrodiff.ConsistencySampler(sigmas={:?}, sigma_min={}, sigma_max={}, sigma_data={})",
            self.inner.sigmas, p.sigma_min, p.sigma_max, p.sigma_data
        )
    }
}

/// The N + 1 σ levels of an N-step progressively distilled student on `schedule` (σ at the
/// real timesteps i (t_top + 1)/N − 1, i = N..1, then 0; t_top is where σ reaches `sigma_max`,
/// None: the last timestep): `Euler(schedule, sigmas=...)` samples the student with exactly the
/// DDIM steps it was distilled for.
#[pyfunction]
#[pyo3(signature = (schedule, steps, sigma_max=Some(80.0)))]
fn student_sigmas(
    schedule: &Bound<'_, PySchedule>,
    steps: usize,
    sigma_max: Option<f64>,
) -> PyResult<Vec<f64>> {
    Ok(crate::train::distill::student_sigmas(
        &schedule.get().inner,
        steps,
        sigma_max,
    )?)
}

/// (N(k), μ(k)) of consistency training at step k of K: for `recipe="ct"` Song et al.'s
/// N(k) = ⌈√(k/K ((s1+1)² − s0²) + s0²) − 1⌉ + 1 and μ(k) = exp(s0 ln μ0 / (N(k) − 1)); for
/// "ict" the doubling schedule min(s0 2^⌊k/K'⌋, s1) + 1 and μ = 0 (no target EMA).
#[pyfunction]
#[pyo3(signature = (k, total_steps, *, recipe="ct", s0=None, s1=None, mu0=0.9))]
fn consistency_training_schedule(
    k: u64,
    total_steps: u64,
    recipe: &str,
    s0: Option<usize>,
    s1: Option<usize>,
    mu0: f64,
) -> PyResult<(usize, f64)> {
    if total_steps == 0 {
        return Err(PyValueError::new_err("total_steps must be positive"));
    }
    match recipe {
        "ct" => {
            let (s0, s1) = (s0.unwrap_or(CT_S0), s1.unwrap_or(CT_S1));
            let n = ct_num_scales(k, total_steps, s0, s1);
            Ok((n, ct_ema_decay(n, s0, mu0)))
        }
        "ict" => {
            let (s0, s1) = (s0.unwrap_or(ICT_S0), s1.unwrap_or(ICT_S1));
            Ok((ict_num_scales(k, total_steps, s0, s1), 0.0))
        }
        other => Err(PyValueError::new_err(format!(
            "recipe must be 'ct' or 'ict', got {other:?}"
        ))),
    }
}

/// f(x, σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, 250 ln σ) of a consistency model on `model`'s
/// network, at one σ for the whole batch (inference: no dropout).
#[pyfunction]
#[pyo3(signature = (model, x, sigma, labels=None, *, sigma_min=0.002, sigma_data=0.5))]
fn consistency_function<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    sigma: f64,
    labels: Option<&Bound<'py, PyAny>>,
    sigma_min: f64,
    sigma_data: f64,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let params = match params_of(model)? {
        Some(p) => p,
        None => ConsistencyParams {
            sigma_min,
            sigma_data,
            ..ConsistencyParams::default()
        },
    };
    let Some(m) = model_of(model)? else {
        return Err(PyTypeError::new_err(format!(
            "model must be a ferrodiff model or trainer, got {}",
            type_name(model)
        )));
    };
    let a = f32_array(x, "x")?;
    let shape = a.shape().to_vec();
    let data = a.readonly().as_slice()?.to_vec();
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(PyValueError::new_err(format!(
            "sigma must be positive, got {sigma}"
        )));
    }
    let y = match labels {
        Some(l) => Some(super::nn::labels_arg(
            l,
            shape[0],
            m.config().num_classes(),
        )?),
        None => None,
    };
    let out = py.detach(|| -> Result<Vec<f32>> {
        let xt = Tensor::from_vec(data, shape.as_slice(), m.device())?;
        let f = consistency_forward(
            &m,
            &params,
            &xt,
            &vec![sigma; shape[0]],
            &crate::nn::Cond {
                labels: y.as_deref(),
                ..Default::default()
            },
            &Ctx::eval(),
        )?;
        Ok(f.flatten_all()?.to_vec1::<f32>()?)
    })?;
    vec_to_array(py, out, &shape)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyConsistencySampler>()?;
    m.add_function(wrap_pyfunction!(student_sigmas, m)?)?;
    m.add_function(wrap_pyfunction!(consistency_training_schedule, m)?)?;
    m.add_function(wrap_pyfunction!(consistency_function, m)?)?;
    Ok(())
}
