//! `ferrodiff.DDPM`, `ferrodiff.DDIM` and `DynamicThreshold`; the sampling plumbing they share
//! with the σ samplers is in `sampling`.

use numpy::{IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use pyo3::PyClassInitializer;

use super::arrays::{batch_of, f32_array, new_f32, timesteps_arg, type_name, vec_to_array};
use super::sampling::{
    denoiser_for, fresh_seed, sample_impl, EditArgs, GuidanceArgs, PyHooks, StepOutput,
};
use super::schedule::{config_json, spacing_arg, PySchedule};
use crate::diffusion::Prediction;
use crate::kernels::Noise;
use crate::sample::{
    self, invert_loop, Ddim, DdimConfig, Ddpm, DdpmConfig, DynamicThreshold, Sampler, StepArgs,
    VarianceType, X0Processing,
};
use crate::schedule::{DiffusersConfig, Spacing};

/// Imagen's dynamic thresholding (Saharia et al. 2022): per sample, s = the `ratio` quantile
/// of |x0|, s = max(s, 1), x0 = clamp(x0, -s, s) / s. `max_value` additionally caps s
/// (diffusers' `sample_max_value`; with its default 1.0 this equals static clipping).
#[pyclass(name = "DynamicThreshold", module = "ferrodiff", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyDynamicThreshold {
    inner: DynamicThreshold,
}

#[pymethods]
impl PyDynamicThreshold {
    #[new]
    #[pyo3(signature = (ratio=sample::DYNAMIC_THRESHOLD_RATIO, max_value=None))]
    fn new(ratio: f64, max_value: Option<f64>) -> PyResult<Self> {
        Ok(PyDynamicThreshold {
            inner: DynamicThreshold::new(ratio, max_value)?,
        })
    }
    #[getter]
    fn ratio(&self) -> f64 {
        self.inner.ratio
    }
    #[getter]
    fn max_value(&self) -> Option<f64> {
        self.inner.max_value
    }
    fn __repr__(&self) -> String {
        match self.inner.max_value {
            Some(m) => format!(
                "DynamicThreshold(ratio={}, max_value={m})",
                self.inner.ratio
            ),
            None => format!("DynamicThreshold(ratio={})", self.inner.ratio),
        }
    }
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Reduced<'py>> {
        Ok((
            slf.get_type().into_any(),
            (slf.get().inner.ratio, slf.get().inner.max_value),
        ))
    }
}

type Reduced<'py> = (Bound<'py, PyAny>, (f64, Option<f64>));

/// `step` shared by DDPM and DDIM.
#[allow(clippy::too_many_arguments)]
pub(crate) fn step_impl<'py, S: Sampler>(
    sampler: &S,
    py: Python<'py>,
    model_output: &Bound<'py, PyAny>,
    t: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    noise: Option<&Bound<'py, PyAny>>,
    seed: Option<u64>,
    out: Option<&Bound<'py, PyAny>>,
    pred_x0_out: Option<&Bound<'py, PyAny>>,
    return_pred_x0: bool,
    check_finite: bool,
) -> PyResult<StepOutput> {
    let m = f32_array(model_output, "model_output")?;
    let xa = f32_array(x, "x")?;
    let shape = xa.shape().to_vec();
    let batch = batch_of(&shape, "x")?;
    let ts = timesteps_arg(t, batch)?;
    let z = match noise {
        Some(n) => {
            if seed.is_some() {
                return Err(PyValueError::new_err(
                    "pass either noise= or seed=, not both",
                ));
            }
            let z = f32_array(n, "noise")?;
            if z.shape() != shape.as_slice() {
                return Err(PyValueError::new_err(format!(
                    "noise has shape {:?} but x has shape {:?}",
                    z.shape(),
                    shape
                )));
            }
            Some(z)
        }
        None => None,
    };
    let seed = seed.unwrap_or_else(fresh_seed);
    // `out` must be a C-contiguous float32 array of x's shape; it may be x itself (in place).
    let out_arr = match out {
        Some(o) => {
            let a = o.cast::<PyArrayDyn<f32>>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "out must be a float32 numpy array, got {}",
                    type_name(o)
                ))
            })?;
            if !a.is_c_contiguous() {
                return Err(PyValueError::new_err("out must be C-contiguous"));
            }
            if a.shape() != shape.as_slice() {
                return Err(PyValueError::new_err(format!(
                    "out has shape {:?} but x has shape {:?}",
                    a.shape(),
                    shape
                )));
            }
            if std::ptr::eq(a.data(), m.data()) {
                return Err(PyValueError::new_err("out must not be model_output"));
            }
            a.clone()
        }
        None => new_f32(py, &shape),
    };
    let in_place = std::ptr::eq(out_arr.data(), xa.data()) && !shape.contains(&0);
    if !in_place && out.is_some() {
        // A partial overlap of out with x or model_output would read values already overwritten.
        for (arr, name) in [(&xa, "x"), (&m, "model_output")] {
            if overlaps(&out_arr, arr) {
                return Err(PyValueError::new_err(format!("out overlaps {name} without being the same array: pass x itself for an in-place step, or a separate buffer")));
            }
        }
    }
    let pred = match (pred_x0_out, return_pred_x0) {
        (Some(_), false) => {
            return Err(PyValueError::new_err(
                "pred_x0_out was given with return_pred_x0=False",
            ));
        }
        (None, false) => None,
        (None, true) => Some(new_f32(py, &shape)),
        (Some(p), true) => Some(pred_x0_out_arg(p, &shape, &[&out_arr, &xa, &m])?),
    };
    {
        let mr = m.readonly();
        let zr = z.as_ref().map(|z| z.readonly());
        let xr = if in_place { None } else { Some(xa.readonly()) };
        let mut ow = out_arr
            .try_readwrite()
            .map_err(|e| PyValueError::new_err(format!("out cannot be written: {e}")))?;
        let mut pw = pred.as_ref().map(|p| p.readwrite());
        let mv = mr.as_slice()?;
        let zv = match &zr {
            Some(z) => Some(z.as_slice()?),
            None => None,
        };
        let xv = match &xr {
            Some(x) => Some(x.as_slice()?),
            None => None,
        };
        let ov = ow.as_slice_mut()?;
        let pv = match pw.as_mut() {
            Some(p) => Some(p.as_slice_mut()?),
            None => None,
        };
        let mshape = m.shape().to_vec();
        let args = StepArgs {
            model_output: mv,
            model_shape: &mshape,
            t: &ts,
            x: xv,
            x_shape: &shape,
            noise: match zv {
                Some(z) => Noise::Given(z),
                None => Noise::Seeded(seed),
            },
            check_finite,
        };
        py.detach(|| sample::step_into(sampler, &args, ov, pv))?;
    }
    Ok(StepOutput {
        prev_sample: out_arr.into_any().unbind(),
        pred_x0: match pred {
            Some(p) => p.into_any().unbind(),
            None => py.None(),
        },
    })
}

/// Whether the memory of two non-empty C-contiguous float32 arrays intersects.
pub(crate) fn overlaps(a: &Bound<'_, PyArrayDyn<f32>>, b: &Bound<'_, PyArrayDyn<f32>>) -> bool {
    let span = |arr: &Bound<'_, PyArrayDyn<f32>>| {
        let start = arr.data() as usize;
        (start, start + std::mem::size_of::<f32>() * arr.len())
    };
    let ((a0, a1), (b0, b1)) = (span(a), span(b));
    a1 > a0 && b1 > b0 && a0 < b1 && b0 < a1
}

/// Checks a caller's `pred_x0_out`: C-contiguous float32 of x's shape, overlapping nothing else.
pub(crate) fn pred_x0_out_arg<'py>(
    p: &Bound<'py, PyAny>,
    shape: &[usize],
    others: &[&Bound<'py, PyArrayDyn<f32>>],
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let a = p.cast::<PyArrayDyn<f32>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "pred_x0_out must be a float32 numpy array, got {}",
            type_name(p)
        ))
    })?;
    if !a.is_c_contiguous() || a.shape() != shape {
        return Err(PyValueError::new_err(format!(
            "pred_x0_out must be a C-contiguous float32 array of x's shape {shape:?}, got shape {:?}",
            a.shape()
        )));
    }
    for o in others {
        if overlaps(a, o) {
            return Err(PyValueError::new_err(
                "pred_x0_out must not overlap out, x or model_output",
            ));
        }
    }
    Ok(a.clone())
}

pub(crate) fn x0_processing_arg(
    clip_sample: Option<f64>,
    threshold: Option<&Bound<'_, PyAny>>,
) -> PyResult<X0Processing> {
    let th = match threshold {
        None => None,
        Some(t) => Some(
            t.cast::<PyDynamicThreshold>()
                .map_err(|_| {
                    PyTypeError::new_err(format!(
                        "threshold must be a ferrodiff.DynamicThreshold, got {}",
                        type_name(t)
                    ))
                })?
                .get()
                .inner,
        ),
    };
    Ok(X0Processing::from_options(clip_sample, th)?)
}

fn spacing_to_py<'py>(py: Python<'py>, s: &Spacing) -> PyResult<Bound<'py, PyAny>> {
    Ok(match s {
        Spacing::Explicit(v) => PyList::new(py, v)?.into_any(),
        other => other.name().into_pyobject(py)?.into_any(),
    })
}

fn x0_processing_to_dict(d: &Bound<'_, PyDict>, p: X0Processing) -> PyResult<()> {
    let py = d.py();
    match p {
        X0Processing::None => {
            d.set_item("clip_sample", py.None())?;
            d.set_item("threshold", py.None())?;
        }
        X0Processing::Clip(r) => {
            d.set_item("clip_sample", r)?;
            d.set_item("threshold", py.None())?;
        }
        X0Processing::Threshold(t) => {
            d.set_item("clip_sample", py.None())?;
            d.set_item(
                "threshold",
                Bound::new(py, PyDynamicThreshold { inner: t })?,
            )?;
        }
    }
    Ok(())
}

/// Turns a stored dict back into constructor kwargs (threshold dicts -> DynamicThreshold).
pub(crate) fn from_dict_impl<'py>(
    cls: &Bound<'py, pyo3::types::PyType>,
    d: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyAny>> {
    let kw = d.copy()?;
    let _ = kw.del_item("type");
    let sched = kw
        .get_item("schedule")?
        .ok_or_else(|| PyValueError::new_err("sampler dict has no 'schedule' key"))?;
    if let Ok(sd) = sched.cast::<PyDict>() {
        kw.set_item("schedule", PySchedule::from_dict(sd)?)?;
    }
    if let Some(th) = kw.get_item("threshold")? {
        if let Ok(td) = th.cast::<PyDict>() {
            let ratio: f64 = td
                .get_item("ratio")?
                .map(|v| v.extract())
                .transpose()?
                .unwrap_or(sample::DYNAMIC_THRESHOLD_RATIO);
            let mv: Option<f64> = td
                .get_item("max_value")?
                .map(|v| v.extract())
                .transpose()?
                .flatten();
            kw.set_item("threshold", PyDynamicThreshold::new(ratio, mv)?)?;
        }
    }
    cls.call((), Some(&kw))
}

fn threshold_dict<'py>(d: &Bound<'py, PyDict>) -> PyResult<()> {
    if let Some(th) = d.get_item("threshold")? {
        if let Ok(t) = th.cast::<PyDynamicThreshold>() {
            let td = PyDict::new(d.py());
            td.set_item("ratio", t.get().inner.ratio)?;
            td.set_item("max_value", t.get().inner.max_value)?;
            d.set_item("threshold", td)?;
        }
    }
    Ok(())
}

/// Constructor kwargs shared by both samplers, read from a diffusers config.
fn diffusers_kwargs<'py>(py: Python<'py>, c: &DiffusersConfig) -> PyResult<Bound<'py, PyDict>> {
    let kw = PyDict::new(py);
    kw.set_item(
        "schedule",
        PySchedule {
            inner: c.schedule()?,
        },
    )?;
    kw.set_item("spacing", &c.timestep_spacing)?;
    kw.set_item("steps_offset", c.steps_offset)?;
    kw.set_item("prediction", Prediction::parse(&c.prediction_type)?.name())?;
    // diffusers applies thresholding instead of clipping when both are set.
    if c.thresholding {
        kw.set_item(
            "threshold",
            PyDynamicThreshold::new(c.dynamic_thresholding_ratio, Some(c.sample_max_value))?,
        )?;
    } else if c.clip_sample {
        kw.set_item("clip_sample", c.clip_sample_range)?;
    }
    Ok(kw)
}

/// The discrete samplers' Rust side: DDPM or DDIM.
#[derive(Clone, Debug)]
pub enum DiscreteKind {
    Ddpm(Ddpm),
    Ddim(Ddim),
}

/// The Sampler of the variant.
macro_rules! on_kind {
    ($k:expr, $s:ident => $e:expr) => {
        match $k {
            DiscreteKind::Ddpm($s) => $e,
            DiscreteKind::Ddim($s) => $e,
        }
    };
}

impl Sampler for DiscreteKind {
    fn schedule(&self) -> &crate::schedule::Schedule {
        on_kind!(self, s => s.schedule())
    }
    fn timesteps(&self) -> &[i64] {
        on_kind!(self, s => s.timesteps())
    }
    fn prediction(&self) -> Prediction {
        on_kind!(self, s => s.prediction())
    }
    fn x0_processing(&self) -> X0Processing {
        on_kind!(self, s => s.x0_processing())
    }
    fn row_steps(&self, t: &[i64]) -> crate::error::Result<Vec<crate::kernels::RowStep>> {
        on_kind!(self, s => s.row_steps(t))
    }
    fn uses_learned_variance(&self) -> bool {
        on_kind!(self, s => s.uses_learned_variance())
    }
    fn classifier_guidance_factor(&self, t: i64) -> crate::error::Result<f64> {
        on_kind!(self, s => s.classifier_guidance_factor(t))
    }
}

/// Base class of the discrete samplers (`DDPM`, `DDIM`): one model call per timestep of
/// `.timesteps`, x at the variance-preserving scale. `step`, `sample`, `to_dict` and pickling
/// are written once here; the subclasses add their constructors.
#[pyclass(name = "DiscreteSampler", module = "ferrodiff", subclass, frozen)]
pub struct PyDiscreteSampler {
    pub(crate) inner: DiscreteKind,
}

/// DDIM's default number of steps.
const DDIM_DEFAULT_STEPS: usize = 50;

fn schedule_dict<'py>(
    py: Python<'py>,
    s: &crate::schedule::Schedule,
) -> PyResult<Bound<'py, PyDict>> {
    PySchedule { inner: s.clone() }.to_dict(py)
}

#[pymethods]
impl PyDiscreteSampler {
    /// The sampler with every setting of a diffusers `DDPMScheduler` / `DDIMScheduler` config
    /// (dict, path or scheduler); keyword arguments override. `steps=None`: all T timesteps
    /// for DDPM, 50 for DDIM.
    #[classmethod]
    #[pyo3(signature = (config, steps=None, **overrides))]
    fn from_diffusers_config<'py>(
        cls: &Bound<'py, pyo3::types::PyType>,
        config: &Bound<'py, PyAny>,
        steps: Option<usize>,
        overrides: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = DiffusersConfig::from_json(&config_json(config)?)?;
        let kw = diffusers_kwargs(cls.py(), &c)?;
        if cls.is_subclass_of::<PyDdim>()? {
            kw.set_item("steps", steps.unwrap_or(DDIM_DEFAULT_STEPS))?;
            kw.set_item("set_alpha_to_one", c.set_alpha_to_one)?;
        } else {
            kw.set_item("steps", steps)?;
            kw.set_item("variance", VarianceType::parse(&c.variance_type)?.name())?;
        }
        if let Some(o) = overrides {
            kw.update(o.as_mapping())?;
        }
        cls.call((), Some(&kw))
    }

    #[getter]
    fn timesteps<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.inner.timesteps().to_vec().into_pyarray(py)
    }
    #[getter]
    fn schedule(&self) -> PySchedule {
        PySchedule {
            inner: self.inner.schedule().clone(),
        }
    }
    #[getter]
    fn steps(&self) -> usize {
        self.inner.timesteps().len()
    }
    /// Model evaluations per run (one per step).
    #[getter]
    fn num_evaluations(&self) -> usize {
        self.inner.timesteps().len()
    }
    #[getter]
    fn prediction(&self) -> &'static str {
        self.inner.prediction().name()
    }

    /// One reverse step from x at timestep t: returns `StepOutput(prev_sample, pred_x0)`.
    /// Noise (when this step adds any) comes from `noise` (used exactly) or from `seed` with the
    /// row's timestep as stream, so a hand-written loop reproduces `sample(seed=...)`.
    #[pyo3(signature = (model_output, t, x, *, noise=None, seed=None, out=None, pred_x0_out=None, return_pred_x0=true, check_finite=true))]
    #[allow(clippy::too_many_arguments)]
    fn step<'py>(
        &self,
        py: Python<'py>,
        model_output: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
        x: &Bound<'py, PyAny>,
        noise: Option<&Bound<'py, PyAny>>,
        seed: Option<u64>,
        out: Option<&Bound<'py, PyAny>>,
        pred_x0_out: Option<&Bound<'py, PyAny>>,
        return_pred_x0: bool,
        check_finite: bool,
    ) -> PyResult<StepOutput> {
        step_impl(
            &self.inner,
            py,
            model_output,
            t,
            x,
            noise,
            seed,
            out,
            pred_x0_out,
            return_pred_x0,
            check_finite,
        )
    }

    /// Runs the whole reverse process with `denoiser(x, t)` (any callable taking a float32
    /// array and an int64 array [B], or a ferrodiff model / trainer, run in Rust); starts from
    /// `x_T` or `fd.randn(shape, seed)`. `labels` / `guidance_scale` / `context` condition and
    /// guide, `image` / `strength` / `mask` edit, `classifier` guides by a noisy classifier.
    #[pyo3(signature = (denoiser, shape=None, *, x_T=None, seed=Some(0), progress=false, callback=None, check_finite=true, labels=None, guidance_scale=None, guidance_rescale=0.0, null_label=None, image=None, strength=1.0, mask=None, classifier=None, classifier_scale=1.0, context=None, control_image=None, conditioning_scale=None))]
    #[allow(clippy::too_many_arguments, non_snake_case)]
    fn sample<'py>(
        slf: &Bound<'py, Self>,
        denoiser: &Bound<'py, PyAny>,
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
        classifier: Option<&Bound<'py, PyAny>>,
        classifier_scale: f64,
        context: Option<&Bound<'py, PyAny>>,
        control_image: Option<&Bound<'py, PyAny>>,
        conditioning_scale: Option<f64>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let name = slf.get_type().name()?.to_string();
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
            classifier,
            classifier_scale,
        };
        sample_impl(
            &slf.get().inner,
            slf.py(),
            denoiser,
            shape,
            x_T,
            seed,
            progress,
            callback,
            check_finite,
            labels,
            guidance,
            edit,
            &name,
        )
    }

    /// The sampler as a plain dict (`type`, `schedule` and the constructor's arguments).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let x0 = match &self.inner {
            DiscreteKind::Ddpm(s) => {
                let c = &s.config;
                d.set_item("type", "DDPM")?;
                d.set_item("schedule", schedule_dict(py, &s.schedule)?)?;
                d.set_item("steps", c.steps)?;
                d.set_item("spacing", spacing_to_py(py, &c.spacing)?)?;
                d.set_item("steps_offset", c.steps_offset)?;
                d.set_item("prediction", c.prediction.name())?;
                d.set_item("variance", c.variance.name())?;
                c.x0_processing
            }
            DiscreteKind::Ddim(s) => {
                let c = &s.config;
                d.set_item("type", "DDIM")?;
                d.set_item("schedule", schedule_dict(py, &s.schedule)?)?;
                d.set_item("steps", c.steps)?;
                d.set_item("spacing", spacing_to_py(py, &c.spacing)?)?;
                d.set_item("steps_offset", c.steps_offset)?;
                d.set_item("eta", c.eta)?;
                d.set_item("prediction", c.prediction.name())?;
                d.set_item("set_alpha_to_one", c.set_alpha_to_one)?;
                d.set_item("use_clipped_model_output", c.use_clipped_model_output)?;
                c.x0_processing
            }
        };
        x0_processing_to_dict(&d, x0)?;
        threshold_dict(&d)?;
        Ok(d)
    }

    #[classmethod]
    fn from_dict<'py>(
        cls: &Bound<'py, pyo3::types::PyType>,
        d: &Bound<'py, PyDict>,
    ) -> PyResult<Bound<'py, PyAny>> {
        from_dict_impl(cls, d)
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyDict>,))> {
        Ok((
            slf.get_type().getattr("from_dict")?,
            (slf.get().to_dict(slf.py())?,),
        ))
    }

    fn __repr__(&self) -> String {
        match &self.inner {
            DiscreteKind::Ddpm(s) => {
                let c = &s.config;
                format!(
                    "DDPM(steps={}, spacing={:?}, prediction={:?}, variance={:?}, x0={:?}, schedule={})",
                    s.timesteps().len(),
                    c.spacing.name(),
                    c.prediction.name(),
                    c.variance.name(),
                    c.x0_processing,
                    s.schedule.name
                )
            }
            DiscreteKind::Ddim(s) => {
                let c = &s.config;
                format!(
                    "DDIM(steps={}, spacing={:?}, eta={}, prediction={:?}, x0={:?}, schedule={})",
                    s.timesteps().len(),
                    c.spacing.name(),
                    c.eta,
                    c.prediction.name(),
                    c.x0_processing,
                    s.schedule.name
                )
            }
        }
    }
}

/// DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), over all T timesteps (`steps=None`)
/// or a strided subset, which uses the respaced betas 1 - ᾱ[τ_i]/ᾱ[τ_{i-1}] (Nichol & Dhariwal).
///
/// `variance`: "fixed_small" (β̃_t), "fixed_large" (β_t), "learned_range" (2C-channel model
/// output, Nichol & Dhariwal eq. 15). No noise is added at the last step.
#[pyclass(name = "DDPM", module = "ferrodiff", extends = PyDiscreteSampler, frozen)]
pub struct PyDdpm;

#[pymethods]
impl PyDdpm {
    #[new]
    #[pyo3(signature = (schedule, steps=None, spacing=None, prediction="epsilon", variance="fixed_small", clip_sample=None, threshold=None, *, steps_offset=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        schedule: &PySchedule,
        steps: Option<usize>,
        spacing: Option<&Bound<'_, PyAny>>,
        prediction: &str,
        variance: &str,
        clip_sample: Option<f64>,
        threshold: Option<&Bound<'_, PyAny>>,
        steps_offset: i64,
    ) -> PyResult<PyClassInitializer<Self>> {
        let config = DdpmConfig {
            steps,
            spacing: spacing
                .map(spacing_arg)
                .transpose()?
                .unwrap_or(Spacing::Leading),
            steps_offset,
            prediction: Prediction::parse(prediction)?,
            variance: VarianceType::parse(variance)?,
            x0_processing: x0_processing_arg(clip_sample, threshold)?,
        };
        let inner = DiscreteKind::Ddpm(Ddpm::new(schedule.inner.clone(), config)?);
        Ok(PyClassInitializer::from(PyDiscreteSampler { inner }).add_subclass(PyDdpm))
    }

    #[getter]
    fn variance(slf: &Bound<'_, Self>) -> &'static str {
        match &slf.as_super().get().inner {
            DiscreteKind::Ddpm(s) => s.config.variance.name(),
            DiscreteKind::Ddim(_) => unreachable!("a DDPM holds a DDPM"),
        }
    }
}

/// DDIM (Song et al. 2020): `eta=0` is the deterministic implicit sampler, `eta=1` has DDPM's
/// posterior variance. The previous timestep is always the next entry of `.timesteps`.
#[pyclass(name = "DDIM", module = "ferrodiff", extends = PyDiscreteSampler, frozen)]
pub struct PyDdim;

impl PyDdim {
    fn ddim<'a>(slf: &'a Bound<'_, Self>) -> &'a Ddim {
        match &slf.as_super().get().inner {
            DiscreteKind::Ddim(s) => s,
            DiscreteKind::Ddpm(_) => unreachable!("a DDIM holds a DDIM"),
        }
    }
}

#[pymethods]
impl PyDdim {
    #[new]
    #[pyo3(signature = (schedule, steps=DDIM_DEFAULT_STEPS, spacing=None, eta=0.0, prediction="epsilon", clip_sample=None, threshold=None, set_alpha_to_one=true, use_clipped_model_output=false, *, steps_offset=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        schedule: &PySchedule,
        steps: usize,
        spacing: Option<&Bound<'_, PyAny>>,
        eta: f64,
        prediction: &str,
        clip_sample: Option<f64>,
        threshold: Option<&Bound<'_, PyAny>>,
        set_alpha_to_one: bool,
        use_clipped_model_output: bool,
        steps_offset: i64,
    ) -> PyResult<PyClassInitializer<Self>> {
        let config = DdimConfig {
            steps,
            spacing: spacing
                .map(spacing_arg)
                .transpose()?
                .unwrap_or(Spacing::Leading),
            steps_offset,
            eta,
            prediction: Prediction::parse(prediction)?,
            x0_processing: x0_processing_arg(clip_sample, threshold)?,
            set_alpha_to_one,
            use_clipped_model_output,
        };
        let inner = DiscreteKind::Ddim(Ddim::new(schedule.inner.clone(), config)?);
        Ok(PyClassInitializer::from(PyDiscreteSampler { inner }).add_subclass(PyDdim))
    }

    #[getter]
    fn eta(slf: &Bound<'_, Self>) -> f64 {
        Self::ddim(slf).config.eta
    }

    /// DDIM inversion (η = 0 run forwards): encodes clean `x0` into the x at the first of
    /// `.timesteps`, from which `sample(denoiser, x_T=...)` returns approximately x0. Useful for
    /// encoding and interpolating real data.
    #[pyo3(signature = (denoiser, x0, *, progress=false, callback=None, check_finite=true, labels=None, context=None))]
    #[allow(clippy::too_many_arguments)]
    fn invert<'py>(
        slf: &Bound<'py, Self>,
        denoiser: &Bound<'py, PyAny>,
        x0: &Bound<'py, PyAny>,
        progress: bool,
        callback: Option<Bound<'py, PyAny>>,
        check_finite: bool,
        labels: Option<&Bound<'py, PyAny>>,
        context: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let py = slf.py();
        let ddim = Self::ddim(slf);
        let a = f32_array(x0, "x0")?;
        let sh = a.shape().to_vec();
        let batch = batch_of(&sh, "x0")?;
        let mut d = denoiser_for(denoiser, labels, context, GuidanceArgs::NONE, batch)?;
        let v = a.readonly().as_slice()?.to_vec();
        let mut hooks = PyHooks::new(
            py,
            ddim.timesteps().len(),
            progress,
            callback,
            &sh,
            "DDIM inversion",
        )?;
        let r = invert_loop(ddim, d.as_mut(), v, &sh, check_finite, &mut hooks);
        hooks.close();
        vec_to_array(py, r?, &sh)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDynamicThreshold>()?;
    m.add_class::<PyDiscreteSampler>()?;
    m.add_class::<PyDdpm>()?;
    m.add_class::<PyDdim>()?;
    Ok(())
}
