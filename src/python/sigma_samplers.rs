//! The σ-space samplers: one base class, `ferrodiff.SigmaSampler`, with `step`, `sample`,
//! `scale_model_input`, `to_dict` and pickling written once; `Euler`, `EulerAncestral`, `Heun`
//! and `DPMSolver` add their constructors only.

use numpy::{IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};
use pyo3::PyClassInitializer;
use serde_json::Value;

use super::arrays::{batch_of, f32_array, new_f32, type_name};
use super::sampling::{
    fresh_seed, guided_denoiser, initial_noise, sample_impl, EditArgs, GuidanceArgs, PyHooks,
    StepOutput,
};
use super::schedule::{config_json, PySchedule};
use crate::diffusion::Prediction;
use crate::kernels::Noise;
use crate::sample::ode::{
    sample_adaptive, AdaptiveConfig, Churn, DpmAlgorithm, DpmSolverConfig, Method, SigmaSampler,
    SolverState, SolverType,
};
use crate::sample::sigma::{
    FinalSigma, GridConfig, Parameterization, SigmaGrid, SigmaSpacing, TimestepMode, TimestepRule,
    EDM_SIGMA_DATA, KARRAS_RHO,
};
use crate::schedule::{DiffusersConfig, Spacing};

/// What a multistep or two-stage sampler carries from one `step` call to the next (Heun's
/// first stage, DPM-Solver's previous predictions). Make one per run with
/// `sampler.new_state()` and pass it to every `step(..., state=state)`.
#[pyclass(name = "SolverState", module = "ferrodiff")]
pub struct PySolverState {
    inner: SolverState,
}

#[pymethods]
impl PySolverState {
    /// The index of the step this state expects next.
    #[getter]
    fn next(&self) -> usize {
        self.inner.next
    }
    fn __repr__(&self) -> String {
        format!("SolverState(next={})", self.inner.next)
    }
}

/// Base class of the σ-space samplers (Karras et al. 2022): x_σ = x0 + σ z is carried down
/// the levels `.sigmas` (N + 1 values, the last 0 or σ_min). A model of a discrete schedule is
/// called on `scale_model_input(x, i)` = x/√(σ² + 1) at `.timesteps[i]`; x starts at
/// `init_noise_sigma · randn`. Not constructed directly: use `Euler`, `EulerAncestral`, `Heun`
/// or `DPMSolver`.
#[pyclass(name = "SigmaSampler", module = "ferrodiff", subclass, frozen)]
pub struct PySigmaSampler {
    inner: SigmaSampler,
    schedule: Option<PySchedule>,
    /// The constructor's normalised keyword arguments (without the schedule).
    kwargs: Py<PyDict>,
}

/// The constructor arguments every σ sampler shares.
struct GridArgs<'a, 'py> {
    schedule: Option<&'a PySchedule>,
    steps: Option<usize>,
    prediction: &'a str,
    sigmas: &'a Bound<'py, PyAny>,
    rho: f64,
    sigma_min: Option<f64>,
    sigma_max: Option<&'a Bound<'py, PyAny>>,
    spacing: &'a str,
    steps_offset: i64,
    final_sigmas_type: &'a str,
    timestep_mode: &'a str,
    sigma_data: f64,
    clip_sample: Option<f64>,
}

/// The default number of steps.
const DEFAULT_STEPS: usize = 25;

fn parameterization(prediction: &str, sigma_data: f64) -> PyResult<Parameterization> {
    Ok(match prediction {
        "edm" => {
            if !(sigma_data.is_finite() && sigma_data > 0.0) {
                return Err(PyValueError::new_err(format!(
                    "sigma_data must be positive and finite, got {sigma_data}"
                )));
            }
            Parameterization::Edm { sigma_data }
        }
        "denoised" => Parameterization::Denoised,
        other => Parameterization::Discrete(Prediction::parse(other).map_err(|e| {
            PyValueError::new_err(format!(
                "{e}; σ samplers also take 'edm' (EDM-preconditioned network) and 'denoised' (the model returns D(x, σ))"
            ))
        })?),
    })
}

impl GridArgs<'_, '_> {
    /// `sigma_max`: a level, "schedule" (the whole trained range, diffusers' choice) or None
    /// (EDM's 80 or the schedule's σ_max, whichever is lower: the cosine schedule's
    /// σ_999 ≈ 2e4 makes the first step of a few-step run useless).
    fn sigma_max_arg(&self) -> PyResult<(Option<f64>, Option<f64>)> {
        match self.sigma_max {
            None => Ok((None, Some(crate::sample::sigma::EDM_SIGMA_MAX))),
            Some(v) => {
                if let Ok(s) = v.extract::<String>() {
                    if s == "schedule" {
                        return Ok((None, None));
                    }
                    return Err(PyValueError::new_err(format!(
                        "sigma_max must be a number, 'schedule' or None, got {s:?}"
                    )));
                }
                Ok((Some(v.extract::<f64>()?), None))
            }
        }
    }

    /// The grid and the normalised kwargs.
    fn build<'py>(
        &self,
        py: Python<'py>,
        rule: TimestepRule,
    ) -> PyResult<(SigmaGrid, Bound<'py, PyDict>)> {
        let param = parameterization(self.prediction, self.sigma_data)?;
        let mode = TimestepMode::parse(self.timestep_mode)?;
        let final_sigma = FinalSigma::parse(self.final_sigmas_type)?;
        let kw = PyDict::new(py);
        let schedule = self.schedule.map(|s| &s.inner);
        match (param, schedule) {
            (Parameterization::Discrete(_), None) => {
                return Err(PyValueError::new_err(format!(
                    "prediction={:?} needs the model's schedule (or prediction='edm' / 'denoised' for continuous-σ models)",
                    self.prediction
                )))
            }
            (Parameterization::Edm { .. } | Parameterization::Denoised, Some(_)) => {
                return Err(PyValueError::new_err(format!(
                    "prediction={:?} is a continuous-σ model: pass schedule=None",
                    self.prediction
                )))
            }
            _ => {}
        }
        let grid = if let Ok(name) = self.sigmas.extract::<String>() {
            let spacing = match name.as_str() {
                "karras" => SigmaSpacing::Karras { rho: self.rho },
                "exponential" => SigmaSpacing::Exponential,
                "timesteps" => SigmaSpacing::Timesteps,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "sigmas must be 'karras', 'exponential', 'timesteps' or a sequence of N + 1 levels, got {other:?}"
                    )))
                }
            };
            kw.set_item("sigmas", &name)?;
            let (sigma_max, sigma_max_cap) = self.sigma_max_arg()?;
            let config = GridConfig {
                steps: self.steps.unwrap_or(DEFAULT_STEPS),
                spacing: Spacing::parse(self.spacing)?,
                steps_offset: self.steps_offset,
                sigmas: spacing,
                sigma_min: self.sigma_min,
                sigma_max,
                sigma_max_cap,
                final_sigma,
                timestep_mode: mode,
            };
            match schedule {
                Some(s) => SigmaGrid::for_schedule(
                    s,
                    rule,
                    &config,
                    match param {
                        Parameterization::Discrete(p) => p,
                        _ => unreachable!("checked above"),
                    },
                )?,
                None => SigmaGrid::continuous(&config, param)?,
            }
        } else {
            let levels: Vec<f64> = self.sigmas.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "sigmas must be a name or a sequence of floats, got {}",
                    type_name(self.sigmas)
                ))
            })?;
            if let Some(n) = self.steps {
                if n + 1 != levels.len() {
                    return Err(PyValueError::new_err(format!(
                        "steps={n} but sigmas has {} levels (N + 1 for N steps): leave steps unset",
                        levels.len()
                    )));
                }
            }
            kw.set_item("sigmas", levels.clone())?;
            SigmaGrid::explicit(levels, schedule, mode, param)?
        };
        kw.set_item("steps", grid.steps())?;
        kw.set_item("prediction", self.prediction)?;
        kw.set_item("rho", self.rho)?;
        kw.set_item("sigma_min", self.sigma_min)?;
        kw.set_item("sigma_max", self.sigma_max)?;
        kw.set_item("spacing", self.spacing)?;
        kw.set_item("steps_offset", self.steps_offset)?;
        kw.set_item("final_sigmas_type", final_sigma.name())?;
        kw.set_item("timestep_mode", mode.name())?;
        kw.set_item("sigma_data", self.sigma_data)?;
        kw.set_item("clip_sample", self.clip_sample)?;
        Ok((grid, kw))
    }

    fn sampler(
        self,
        py: Python<'_>,
        rule: TimestepRule,
        method: Method,
        extra: &[(&str, Py<PyAny>)],
    ) -> PyResult<PySigmaSampler> {
        let (grid, kw) = self.build(py, rule)?;
        for (k, v) in extra {
            kw.set_item(*k, v)?;
        }
        Ok(PySigmaSampler {
            inner: SigmaSampler::new(grid, method, self.clip_sample)?,
            schedule: self.schedule.cloned(),
            kwargs: kw.unbind(),
        })
    }
}

fn churn_extra(py: Python<'_>, c: &Churn) -> PyResult<Vec<(&'static str, Py<PyAny>)>> {
    Ok(vec![
        ("s_churn", c.s_churn.into_pyobject(py)?.into_any().unbind()),
        ("s_tmin", c.s_tmin.into_pyobject(py)?.into_any().unbind()),
        ("s_tmax", c.s_tmax.into_pyobject(py)?.into_any().unbind()),
        ("s_noise", c.s_noise.into_pyobject(py)?.into_any().unbind()),
    ])
}

fn noise_arg<'py>(
    noise: Option<&Bound<'py, PyAny>>,
    seed: Option<u64>,
    shape: &[usize],
) -> PyResult<(Option<Bound<'py, PyArrayDyn<f32>>>, u64)> {
    match noise {
        Some(n) => {
            if seed.is_some() {
                return Err(PyValueError::new_err(
                    "pass either noise= or seed=, not both",
                ));
            }
            let z = f32_array(n, "noise")?;
            if z.shape() != shape {
                return Err(PyValueError::new_err(format!(
                    "noise has shape {:?} but x has shape {shape:?}",
                    z.shape()
                )));
            }
            Ok((Some(z), 0))
        }
        None => Ok((None, seed.unwrap_or_else(fresh_seed))),
    }
}

/// `{type, schedule, **kwargs}`: the dict of a sampler built from a schedule (or none) and
/// its normalised constructor arguments.
fn config_dict<'py>(
    py: Python<'py>,
    type_name: &str,
    schedule: Option<&PySchedule>,
    kwargs: &Py<PyDict>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("type", type_name)?;
    match schedule {
        Some(s) => d.set_item("schedule", s.to_dict(py)?)?,
        None => d.set_item("schedule", py.None())?,
    }
    d.update(kwargs.bind(py).as_mapping())?;
    Ok(d)
}

/// The constructor kwargs of `config_dict`'s output: `type` dropped, the schedule rebuilt.
fn constructor_kwargs<'py>(d: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
    let kw = d.copy()?;
    let _ = kw.del_item("type");
    if let Some(sd) = kw.get_item("schedule")? {
        if let Ok(sd) = sd.cast::<PyDict>() {
            kw.set_item("schedule", PySchedule::from_dict(sd)?)?;
        }
    }
    Ok(kw)
}

#[pymethods]
impl PySigmaSampler {
    /// The N + 1 noise levels (float64), decreasing; the last is 0 or σ_min.
    #[getter]
    fn sigmas<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.grid.sigmas.clone().into_pyarray(py)
    }
    /// The timestep of every model call of a run, in order (float64; fractional with
    /// timestep_mode='interpolate'). Heun calls the model twice per step but at the last.
    #[getter]
    fn timesteps<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        let t: Vec<f64> = self
            .inner
            .evaluations()
            .iter()
            .map(|e| e.timestep)
            .collect();
        t.into_pyarray(py)
    }
    /// The level of every model call of a run, in order.
    #[getter]
    fn evaluation_sigmas<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        let s: Vec<f64> = self.inner.evaluations().iter().map(|e| e.sigma).collect();
        s.into_pyarray(py)
    }
    /// Steps N (levels minus one).
    #[getter]
    fn steps(&self) -> usize {
        self.inner.steps()
    }
    /// Model evaluations per run (Heun: 2N − 1 with a final σ of 0).
    #[getter]
    fn num_evaluations(&self) -> usize {
        self.inner.evaluations().len()
    }
    /// The std of a fresh x: σ_0.
    #[getter]
    fn init_noise_sigma(&self) -> f64 {
        self.inner.init_noise_sigma()
    }
    #[getter]
    fn prediction(&self) -> &'static str {
        match self.inner.grid.parameterization {
            Parameterization::Discrete(p) => p.name(),
            Parameterization::Edm { .. } => "edm",
            Parameterization::Denoised => "denoised",
        }
    }
    /// The schedule of a discrete model, or None.
    #[getter]
    fn schedule(&self) -> Option<PySchedule> {
        self.schedule.clone()
    }

    /// A fresh state for a hand-written loop of `step` calls starting at model call `start`
    /// (0, or the first call of an SDEdit run).
    #[pyo3(signature = (start=0))]
    fn new_state(&self, start: usize) -> PySolverState {
        PySolverState {
            inner: self.inner.new_state(start),
        }
    }

    /// x scaled for the model at call i: c_in(σ_i) x (x/√(σ²+1) for a discrete model).
    fn scale_model_input<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        i: usize,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let e = self.inner.evaluations().get(i).ok_or_else(|| {
            PyValueError::new_err(format!(
                "i = {i} is past the sampler's {} model calls",
                self.inner.evaluations().len()
            ))
        })?;
        let xa = f32_array(x, "x")?;
        let c = self.inner.model_input_scale(e.sigma) as f32;
        let v: Vec<f32> = xa.readonly().as_slice()?.iter().map(|&a| a * c).collect();
        super::arrays::vec_to_array(py, v, xa.shape())
    }

    /// The update of model call i (see `.timesteps`) from the model's output on
    /// `scale_model_input(x, i)`; returns `StepOutput(prev_sample, pred_x0)`, pred_x0 being
    /// D(x, σ). Multistep and two-stage samplers need `state=` (from `new_state()`), passed to
    /// every call in order. Noise (churn, ancestral, SDE) comes from `noise` (used exactly) or
    /// from `seed`, stream 2^40 + i, so a hand loop reproduces `sample(seed=...)`.
    #[pyo3(signature = (model_output, i, x, *, state=None, noise=None, seed=None, check_finite=true))]
    #[allow(clippy::too_many_arguments)]
    fn step<'py>(
        &self,
        py: Python<'py>,
        model_output: &Bound<'py, PyAny>,
        i: usize,
        x: &Bound<'py, PyAny>,
        state: Option<&Bound<'py, PySolverState>>,
        noise: Option<&Bound<'py, PyAny>>,
        seed: Option<u64>,
        check_finite: bool,
    ) -> PyResult<StepOutput> {
        let m = f32_array(model_output, "model_output")?;
        let xa = f32_array(x, "x")?;
        let shape = xa.shape().to_vec();
        batch_of(&shape, "x")?;
        let (z, seed) = noise_arg(noise, seed, &shape)?;
        let mut st = match state {
            Some(s) => std::mem::take(&mut s.borrow_mut().inner),
            None => self.inner.new_state(i),
        };
        let out = new_f32(py, &shape);
        let pred = new_f32(py, &shape);
        let r = {
            let mr = m.readonly();
            let xr = xa.readonly();
            let zr = z.as_ref().map(|z| z.readonly());
            let mut ow = out.readwrite();
            let mut pw = pred.readwrite();
            let (mv, xv) = (mr.as_slice()?, xr.as_slice()?);
            let zv = match &zr {
                Some(z) => Some(z.as_slice()?),
                None => None,
            };
            let (ov, pv) = (ow.as_slice_mut()?, pw.as_slice_mut()?);
            let mshape = m.shape().to_vec();
            let noise = match zv {
                Some(z) => Noise::Given(z),
                None => Noise::Seeded(seed),
            };
            let inner = &self.inner;
            let st = &mut st;
            py.detach(move || {
                inner.step(
                    i,
                    xv,
                    &shape,
                    mv,
                    &mshape,
                    st,
                    noise,
                    check_finite,
                    ov,
                    Some(pv),
                )
            })
        };
        if let Some(s) = state {
            s.borrow_mut().inner = st;
        }
        r?;
        Ok(StepOutput::new(
            out.into_any().unbind(),
            pred.into_any().unbind(),
        ))
    }

    /// Runs the sampler with a denoiser: a ferrodiff model or trainer (the loop stays in Rust)
    /// or a callable `denoiser(x, t)` called on the scaled input (t int64 when whole, float64
    /// when fractional; σ itself for prediction='denoised', c_noise for 'edm'). Starts from
    /// `x_T` (at level σ_0) or `init_noise_sigma · fd.randn(shape, seed)`. Takes every
    /// argument of DDIM.sample; `callback(i, sigma, x, pred_x0)` runs after each step.
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

    /// The sampler as a plain dict (JSON-serialisable): `type`, `schedule` and the
    /// constructor's arguments; `SigmaSampler.from_dict` rebuilds it.
    fn to_dict<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyDict>> {
        let s = slf.get();
        let name = slf.get_type().name()?.to_string();
        config_dict(slf.py(), &name, s.schedule.as_ref(), &s.kwargs)
    }

    /// Rebuilds a sampler from `to_dict()`'s output (on the base class, the dict's `type`
    /// picks the subclass).
    #[classmethod]
    fn from_dict<'py>(
        cls: &Bound<'py, PyType>,
        d: &Bound<'py, PyDict>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = cls.py();
        let ty: Option<String> = d.get_item("type")?.map(|v| v.extract()).transpose()?;
        let kw = constructor_kwargs(d)?;
        let target = if cls.is(py.get_type::<PySigmaSampler>()) {
            let name = ty.ok_or_else(|| PyValueError::new_err("the dict has no 'type' key"))?;
            py.import("ferrodiff")?
                .getattr(name.as_str())
                .map_err(|_| PyValueError::new_err(format!("unknown sampler type {name:?}")))?
        } else {
            cls.clone().into_any()
        };
        target.call((), Some(&kw))
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyDict>,))> {
        Ok((slf.get_type().getattr("from_dict")?, (Self::to_dict(slf)?,)))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let s = slf.get();
        let g = &s.inner.grid;
        Ok(format!(
            "{}(steps={}, sigma_max={:.4}, sigma_end={:.4}, prediction={:?}, evaluations={})",
            slf.get_type().name()?,
            g.steps(),
            g.sigmas[0],
            g.sigmas[g.steps()],
            s.prediction(),
            s.inner.evaluations().len()
        ))
    }

    /// The sampler with every setting of the matching diffusers scheduler config (dict, path
    /// or scheduler): EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
    /// HeunDiscreteScheduler, DPMSolverMultistepScheduler. Options ferrodiff does not
    /// implement are a ValueError naming them; keyword arguments override.
    #[classmethod]
    #[pyo3(signature = (config, steps=DEFAULT_STEPS, **overrides))]
    fn from_diffusers_config<'py>(
        cls: &Bound<'py, PyType>,
        config: &Bound<'py, PyAny>,
        steps: usize,
        overrides: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = cls.py();
        let name = cls.name()?.to_string();
        // diffusers writes lambda_min_clipped = -inf as -Infinity, which is not JSON: read
        // non-finite numbers as absent (their defaults).
        let text = config_json(config)?
            .replace("-Infinity", "null")
            .replace("Infinity", "null")
            .replace("NaN", "null");
        let c = DiffusersConfig::from_json(&text)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            PyValueError::new_err(format!("scheduler config is not valid JSON: {e}"))
        })?;
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
        let text_of = |k: &str, default: &str| {
            get(k)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string()
        };
        let unsupported = |what: &str| {
            Err(PyValueError::new_err(format!(
                "the scheduler config sets {what}, which ferrodiff's {name} does not implement"
            )))
        };
        for key in [
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "thresholding",
            "use_dynamic_shifting",
        ] {
            if flag(key) {
                return unsupported(&format!("{key}=true"));
            }
        }
        if text_of("interpolation_type", "linear") != "linear" {
            return unsupported("interpolation_type other than 'linear'");
        }
        if text_of("timestep_type", "discrete") != "discrete" {
            return unsupported("timestep_type='continuous'");
        }
        if let Some(l) = get("lambda_min_clipped").and_then(Value::as_f64) {
            if l.is_finite() {
                return unsupported("lambda_min_clipped");
            }
        }
        let kw = PyDict::new(py);
        kw.set_item(
            "schedule",
            PySchedule {
                inner: c.schedule()?,
            },
        )?;
        kw.set_item("steps", steps)?;
        kw.set_item("prediction", Prediction::parse(&c.prediction_type)?.name())?;
        kw.set_item("spacing", text_of("timestep_spacing", "linspace"))?;
        kw.set_item("steps_offset", c.steps_offset)?;
        let sigmas = if flag("use_karras_sigmas") {
            "karras"
        } else if flag("use_exponential_sigmas") {
            "exponential"
        } else {
            "timesteps"
        };
        kw.set_item("sigmas", sigmas)?;
        // diffusers spans the schedule's whole range unless the config names a σ_max.
        kw.set_item("sigma_max", "schedule")?;
        for key in ["sigma_min", "sigma_max"] {
            if let Some(x) = get(key).and_then(Value::as_f64) {
                kw.set_item(key, x)?;
            }
        }
        kw.set_item("final_sigmas_type", text_of("final_sigmas_type", "zero"))?;
        if get("clip_sample").and_then(Value::as_bool) == Some(true) {
            kw.set_item("clip_sample", c.clip_sample_range)?;
        }
        if name == "DPMSolver" {
            kw.set_item("timestep_mode", "nearest")?;
            kw.set_item("algorithm", text_of("algorithm_type", "dpmsolver++"))?;
            kw.set_item(
                "order",
                get("solver_order").and_then(Value::as_u64).unwrap_or(2),
            )?;
            kw.set_item("solver_type", text_of("solver_type", "midpoint"))?;
            kw.set_item(
                "lower_order_final",
                get("lower_order_final")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            )?;
            kw.set_item("euler_at_final", flag("euler_at_final"))?;
        }
        if let Some(o) = overrides {
            kw.update(o.as_mapping())?;
        }
        cls.call((), Some(&kw))
    }
}

/// Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without its
/// second-order correction); `s_churn > 0` adds Karras' churn (noise that raises σ to
/// σ(1 + γ) before the step, for σ in [s_tmin, s_tmax]). diffusers: EulerDiscreteScheduler.
#[pyclass(name = "Euler", module = "ferrodiff", extends = PySigmaSampler, frozen)]
pub struct PyEuler;

#[pymethods]
impl PyEuler {
    #[new]
    #[pyo3(signature = (schedule=None, steps=None, *, prediction="epsilon", sigmas=None, rho=KARRAS_RHO, sigma_min=None, sigma_max=None, spacing="linspace", steps_offset=0, final_sigmas_type="zero", timestep_mode="interpolate", sigma_data=EDM_SIGMA_DATA, clip_sample=None, s_churn=0.0, s_tmin=0.0, s_tmax=f64::INFINITY, s_noise=1.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        schedule: Option<PyRef<'_, PySchedule>>,
        steps: Option<usize>,
        prediction: &str,
        sigmas: Option<&Bound<'_, PyAny>>,
        rho: f64,
        sigma_min: Option<f64>,
        sigma_max: Option<&Bound<'_, PyAny>>,
        spacing: &str,
        steps_offset: i64,
        final_sigmas_type: &str,
        timestep_mode: &str,
        sigma_data: f64,
        clip_sample: Option<f64>,
        s_churn: f64,
        s_tmin: f64,
        s_tmax: f64,
        s_noise: f64,
    ) -> PyResult<PyClassInitializer<Self>> {
        let karras = "karras".into_pyobject(py)?.into_any();
        let churn = Churn::new(s_churn, s_tmin, s_tmax, s_noise)?;
        let args = GridArgs {
            schedule: schedule.as_deref(),
            steps,
            prediction,
            sigmas: sigmas.unwrap_or(&karras),
            rho,
            sigma_min,
            sigma_max,
            spacing,
            steps_offset,
            final_sigmas_type,
            timestep_mode,
            sigma_data,
            clip_sample,
        };
        let extra = churn_extra(py, &churn)?;
        Ok(PyClassInitializer::from(args.sampler(
            py,
            TimestepRule::Euler,
            Method::Euler { churn },
            &extra,
        )?)
        .add_subclass(PyEuler))
    }
}

/// Euler ancestral sampling (k-diffusion's `sample_euler_ancestral`): an Euler step to σ_down
/// and fresh noise σ_up, with σ_up = min(σ', η √(σ'²(σ² − σ'²)/σ²)). η = 1 is diffusers'
/// EulerAncestralDiscreteScheduler; η = 0 is Euler.
#[pyclass(name = "EulerAncestral", module = "ferrodiff", extends = PySigmaSampler, frozen)]
pub struct PyEulerAncestral;

#[pymethods]
impl PyEulerAncestral {
    #[new]
    #[pyo3(signature = (schedule=None, steps=None, *, eta=1.0, s_noise=1.0, prediction="epsilon", sigmas=None, rho=KARRAS_RHO, sigma_min=None, sigma_max=None, spacing="linspace", steps_offset=0, final_sigmas_type="zero", timestep_mode="interpolate", sigma_data=EDM_SIGMA_DATA, clip_sample=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        schedule: Option<PyRef<'_, PySchedule>>,
        steps: Option<usize>,
        eta: f64,
        s_noise: f64,
        prediction: &str,
        sigmas: Option<&Bound<'_, PyAny>>,
        rho: f64,
        sigma_min: Option<f64>,
        sigma_max: Option<&Bound<'_, PyAny>>,
        spacing: &str,
        steps_offset: i64,
        final_sigmas_type: &str,
        timestep_mode: &str,
        sigma_data: f64,
        clip_sample: Option<f64>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let karras = "karras".into_pyobject(py)?.into_any();
        let args = GridArgs {
            schedule: schedule.as_deref(),
            steps,
            prediction,
            sigmas: sigmas.unwrap_or(&karras),
            rho,
            sigma_min,
            sigma_max,
            spacing,
            steps_offset,
            final_sigmas_type,
            timestep_mode,
            sigma_data,
            clip_sample,
        };
        let extra = vec![
            ("eta", eta.into_pyobject(py)?.into_any().unbind()),
            ("s_noise", s_noise.into_pyobject(py)?.into_any().unbind()),
        ];
        let method = Method::EulerAncestral { eta, s_noise };
        Ok(
            PyClassInitializer::from(args.sampler(py, TimestepRule::Euler, method, &extra)?)
                .add_subclass(PyEulerAncestral),
        )
    }
}

/// Heun's second-order method (Karras et al. 2022, Algorithm 2, with its churn options): two
/// model calls per step, Euler for the last step when it ends at σ = 0. Calls interleave as
/// in diffusers' HeunDiscreteScheduler (`.timesteps` has 2N − 1 entries).
#[pyclass(name = "Heun", module = "ferrodiff", extends = PySigmaSampler, frozen)]
pub struct PyHeun;

#[pymethods]
impl PyHeun {
    #[new]
    #[pyo3(signature = (schedule=None, steps=None, *, prediction="epsilon", sigmas=None, rho=KARRAS_RHO, sigma_min=None, sigma_max=None, spacing="linspace", steps_offset=0, final_sigmas_type="zero", timestep_mode="interpolate", sigma_data=EDM_SIGMA_DATA, clip_sample=None, s_churn=0.0, s_tmin=0.0, s_tmax=f64::INFINITY, s_noise=1.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        schedule: Option<PyRef<'_, PySchedule>>,
        steps: Option<usize>,
        prediction: &str,
        sigmas: Option<&Bound<'_, PyAny>>,
        rho: f64,
        sigma_min: Option<f64>,
        sigma_max: Option<&Bound<'_, PyAny>>,
        spacing: &str,
        steps_offset: i64,
        final_sigmas_type: &str,
        timestep_mode: &str,
        sigma_data: f64,
        clip_sample: Option<f64>,
        s_churn: f64,
        s_tmin: f64,
        s_tmax: f64,
        s_noise: f64,
    ) -> PyResult<PyClassInitializer<Self>> {
        let karras = "karras".into_pyobject(py)?.into_any();
        let churn = Churn::new(s_churn, s_tmin, s_tmax, s_noise)?;
        let args = GridArgs {
            schedule: schedule.as_deref(),
            steps,
            prediction,
            sigmas: sigmas.unwrap_or(&karras),
            rho,
            sigma_min,
            sigma_max,
            spacing,
            steps_offset,
            final_sigmas_type,
            timestep_mode,
            sigma_data,
            clip_sample,
        };
        let extra = churn_extra(py, &churn)?;
        Ok(PyClassInitializer::from(args.sampler(
            py,
            TimestepRule::Euler,
            Method::Heun { churn },
            &extra,
        )?)
        .add_subclass(PyHeun))
    }
}

/// Multistep DPM-Solver++ (Lu et al. 2022): `algorithm` "dpmsolver++" (ODE) or
/// "sde-dpmsolver++", `order` 1-3 (2 is "2M"), `solver_type` "midpoint" | "heun",
/// `lower_order_final` (lower orders at the end of runs under 15 steps), `euler_at_final`.
/// Timesteps are placed as diffusers' DPMSolverMultistepScheduler places them.
#[pyclass(name = "DPMSolver", module = "ferrodiff", extends = PySigmaSampler, frozen)]
pub struct PyDpmSolver;

#[pymethods]
impl PyDpmSolver {
    #[new]
    #[pyo3(signature = (schedule=None, steps=None, *, algorithm="dpmsolver++", order=2, solver_type="midpoint", lower_order_final=true, euler_at_final=false, prediction="epsilon", sigmas=None, rho=KARRAS_RHO, sigma_min=None, sigma_max=None, spacing="linspace", steps_offset=0, final_sigmas_type="zero", timestep_mode="interpolate", sigma_data=EDM_SIGMA_DATA, clip_sample=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        schedule: Option<PyRef<'_, PySchedule>>,
        steps: Option<usize>,
        algorithm: &str,
        order: u8,
        solver_type: &str,
        lower_order_final: bool,
        euler_at_final: bool,
        prediction: &str,
        sigmas: Option<&Bound<'_, PyAny>>,
        rho: f64,
        sigma_min: Option<f64>,
        sigma_max: Option<&Bound<'_, PyAny>>,
        spacing: &str,
        steps_offset: i64,
        final_sigmas_type: &str,
        timestep_mode: &str,
        sigma_data: f64,
        clip_sample: Option<f64>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let karras = "karras".into_pyobject(py)?.into_any();
        let config = DpmSolverConfig {
            algorithm: DpmAlgorithm::parse(algorithm)?,
            order,
            solver_type: SolverType::parse(solver_type)?,
            lower_order_final,
            euler_at_final,
        };
        let args = GridArgs {
            schedule: schedule.as_deref(),
            steps,
            prediction,
            sigmas: sigmas.unwrap_or(&karras),
            rho,
            sigma_min,
            sigma_max,
            spacing,
            steps_offset,
            final_sigmas_type,
            timestep_mode,
            sigma_data,
            clip_sample,
        };
        let extra = vec![
            (
                "algorithm",
                config
                    .algorithm
                    .name()
                    .into_pyobject(py)?
                    .into_any()
                    .unbind(),
            ),
            ("order", order.into_pyobject(py)?.into_any().unbind()),
            (
                "solver_type",
                config
                    .solver_type
                    .name()
                    .into_pyobject(py)?
                    .into_any()
                    .unbind(),
            ),
            (
                "lower_order_final",
                lower_order_final
                    .into_pyobject(py)?
                    .to_owned()
                    .into_any()
                    .unbind(),
            ),
            (
                "euler_at_final",
                euler_at_final
                    .into_pyobject(py)?
                    .to_owned()
                    .into_any()
                    .unbind(),
            ),
        ];
        let method = Method::DpmSolver(config);
        Ok(
            PyClassInitializer::from(args.sampler(py, TimestepRule::Multistep, method, &extra)?)
                .add_subclass(PyDpmSolver),
        )
    }
}

/// Error-controlled DPM-Solver (Lu et al. 2022; k-diffusion's `dpm_adaptive`): DPM-Solver-23
/// (`order=3`) or -12 (`order=2`) steps in λ = −ln σ from `sigma_max` to `sigma_min`, sized by a
/// PID controller so that the two solutions of each step agree within max(atol, rtol |x|);
/// `eta > 0` adds ancestral noise. The number of model evaluations follows from the
/// tolerances: `sample(..., return_info=True)` reports it. There is no fixed grid, so there is
/// no `step` and no image editing (use a fixed-step sampler for those).
#[pyclass(name = "DPMAdaptive", module = "ferrodiff", frozen)]
pub struct PyDpmAdaptive {
    config: AdaptiveConfig,
    grid: SigmaGrid,
    schedule: Option<PySchedule>,
    kwargs: Py<PyDict>,
}

#[pymethods]
impl PyDpmAdaptive {
    #[new]
    #[pyo3(signature = (schedule=None, *, sigma_min=None, sigma_max=None, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0, denoise_to_zero=true, prediction="epsilon", timestep_mode="interpolate", sigma_data=EDM_SIGMA_DATA))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        schedule: Option<PyRef<'_, PySchedule>>,
        sigma_min: Option<f64>,
        sigma_max: Option<f64>,
        order: u8,
        rtol: f64,
        atol: f64,
        h_init: f64,
        pcoeff: f64,
        icoeff: f64,
        dcoeff: f64,
        accept_safety: f64,
        eta: f64,
        s_noise: f64,
        denoise_to_zero: bool,
        prediction: &str,
        timestep_mode: &str,
        sigma_data: f64,
    ) -> PyResult<Self> {
        let param = parameterization(prediction, sigma_data)?;
        let mode = TimestepMode::parse(timestep_mode)?;
        let sched = schedule.as_deref().map(|s| &s.inner);
        // The range: the schedule's trained σ (a discrete model) or EDM's.
        let (lo, hi) = match (param, sched) {
            (Parameterization::Discrete(_), Some(s)) => {
                let sig = crate::sample::sigma::schedule_sigmas(s);
                (sig[0], sig[sig.len() - 1])
            }
            (Parameterization::Discrete(_), None) => {
                return Err(PyValueError::new_err(format!(
                    "prediction={prediction:?} needs the model's schedule (or prediction='edm' / 'denoised')"
                )))
            }
            (_, Some(_)) => {
                return Err(PyValueError::new_err(format!(
                    "prediction={prediction:?} is a continuous-σ model: pass schedule=None"
                )))
            }
            (_, None) => (crate::sample::sigma::EDM_SIGMA_MIN, crate::sample::sigma::EDM_SIGMA_MAX),
        };
        let config = AdaptiveConfig {
            sigma_min: sigma_min.unwrap_or(lo),
            // EDM's 80 at most by default, as the fixed-step samplers (the cosine schedule's
            // σ_999 ≈ 2e4 only costs steps).
            sigma_max: sigma_max.unwrap_or(hi.min(crate::sample::sigma::EDM_SIGMA_MAX)),
            order,
            rtol,
            atol,
            h_init,
            pcoeff,
            icoeff,
            dcoeff,
            accept_safety,
            eta,
            s_noise,
            denoise_to_zero,
        };
        config.check()?;
        let grid =
            SigmaGrid::explicit(vec![config.sigma_max, config.sigma_min], sched, mode, param)?;
        let kw = PyDict::new(py);
        kw.set_item("sigma_min", config.sigma_min)?;
        kw.set_item("sigma_max", config.sigma_max)?;
        kw.set_item("order", order)?;
        kw.set_item("rtol", rtol)?;
        kw.set_item("atol", atol)?;
        kw.set_item("h_init", h_init)?;
        kw.set_item("pcoeff", pcoeff)?;
        kw.set_item("icoeff", icoeff)?;
        kw.set_item("dcoeff", dcoeff)?;
        kw.set_item("accept_safety", accept_safety)?;
        kw.set_item("eta", eta)?;
        kw.set_item("s_noise", s_noise)?;
        kw.set_item("denoise_to_zero", denoise_to_zero)?;
        kw.set_item("prediction", prediction)?;
        kw.set_item("timestep_mode", mode.name())?;
        kw.set_item("sigma_data", sigma_data)?;
        Ok(PyDpmAdaptive {
            config,
            grid,
            schedule: schedule.as_deref().cloned(),
            kwargs: kw.unbind(),
        })
    }

    #[getter]
    fn sigma_min(&self) -> f64 {
        self.config.sigma_min
    }
    #[getter]
    fn sigma_max(&self) -> f64 {
        self.config.sigma_max
    }
    /// The std of a fresh x: σ_max.
    #[getter]
    fn init_noise_sigma(&self) -> f64 {
        self.config.sigma_max
    }
    #[getter]
    fn schedule(&self) -> Option<PySchedule> {
        self.schedule.clone()
    }

    /// Runs the adaptive solver (arguments as `DDIM.sample`; image editing is not available).
    /// With `return_info=True` returns `(x, info)`, info holding `nfe` (model evaluations),
    /// `accepted` and `rejected` steps. `callback(i, sigma, x, None)` runs after each accepted
    /// step; the progress bar counts accepted steps.
    #[pyo3(signature = (denoiser, shape=None, *, x_T=None, seed=Some(0), progress=false, callback=None, check_finite=true, labels=None, guidance_scale=None, guidance_rescale=0.0, null_label=None, image=None, strength=1.0, mask=None, classifier=None, classifier_scale=1.0, context=None, return_info=false))]
    #[allow(clippy::too_many_arguments, non_snake_case)]
    fn sample<'py>(
        &self,
        py: Python<'py>,
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
        return_info: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        if image.is_some() || mask.is_some() || strength != 1.0 {
            return Err(PyValueError::new_err(
                "DPMAdaptive has no fixed grid to start part-way or to blend an inpainting into: use Euler, Heun or DPMSolver for image=, strength= and mask=",
            ));
        }
        if let Some(cb) = &callback {
            if !cb.is_callable() {
                return Err(PyTypeError::new_err(
                    "callback must be callable as callback(i, sigma, x, pred_x0)",
                ));
            }
        }
        let seed = seed.unwrap_or_else(fresh_seed);
        let shape = shape
            .map(|s| super::arrays::shape_arg(s, "shape"))
            .transpose()?;
        let (x, sh) = initial_noise(py, shape, x_T, seed, self.config.sigma_max)?;
        let guidance = GuidanceArgs {
            scale: guidance_scale,
            rescale: guidance_rescale,
            null_label,
        };
        let mut d = guided_denoiser(
            &self.grid,
            denoiser,
            labels,
            context,
            guidance,
            classifier,
            classifier_scale,
            sh[0],
        )?;
        // The number of accepted steps is not known in advance; the bar counts them.
        let mut hooks = PyHooks::new(py, 0, progress, callback, &sh, "DPMAdaptive")?;
        let r = sample_adaptive(
            &self.config,
            &self.grid,
            d.as_mut(),
            x,
            &sh,
            seed,
            check_finite,
            &mut hooks,
        );
        hooks.close();
        let (x, info) = r?;
        let x = super::arrays::vec_to_array(py, x, &sh)?.into_any();
        if !return_info {
            return Ok(x);
        }
        let i = PyDict::new(py);
        i.set_item("nfe", info.nfe)?;
        i.set_item("accepted", info.accepted)?;
        i.set_item("rejected", info.rejected)?;
        Ok((x, i).into_pyobject(py)?.into_any())
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        config_dict(py, "DPMAdaptive", self.schedule.as_ref(), &self.kwargs)
    }

    #[classmethod]
    fn from_dict<'py>(
        cls: &Bound<'py, PyType>,
        d: &Bound<'py, PyDict>,
    ) -> PyResult<Bound<'py, PyAny>> {
        cls.call((), Some(&constructor_kwargs(d)?))
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
        let c = &self.config;
        format!(
            "DPMAdaptive(order={}, rtol={}, atol={}, sigma_min={}, sigma_max={}, eta={})",
            c.order, c.rtol, c.atol, c.sigma_min, c.sigma_max, c.eta
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDpmAdaptive>()?;
    m.add_class::<PySolverState>()?;
    m.add_class::<PySigmaSampler>()?;
    m.add_class::<PyEuler>()?;
    m.add_class::<PyEulerAncestral>()?;
    m.add_class::<PyHeun>()?;
    m.add_class::<PyDpmSolver>()?;
    Ok(())
}
