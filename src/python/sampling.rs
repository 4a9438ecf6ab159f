//! The sampling plumbing every sampler class shares: `StepOutput`, `randn`, the Python-callable
//! denoiser and the model / guidance / classifier composition of a `sample` call, the hooks
//! (progress, callback, Ctrl-C, GIL release) around the one Rust loop, and `sample_impl`.

use std::hash::{BuildHasher, Hasher};

use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::arrays::{batch_of, f32_array, shape_arg, timesteps_arg, type_name, vec_to_array};
use super::callback_error;
use crate::error::Result;
use crate::sample::{
    self, Conditioned, Denoiser, Guidance, LabeledDenoiser, LoopHooks, ModelOutput,
};

/// The result of one sampler step: `prev_sample` (x at the next timestep) and `pred_x0` (the
/// predicted, clipped/thresholded x0; alias `pred_original_sample`). Unpacks as a tuple.
#[pyclass(name = "StepOutput", module = "ferrodiff", frozen)]
pub struct StepOutput {
    #[pyo3(get)]
    pub(crate) prev_sample: Py<PyAny>,
    #[pyo3(get)]
    pub(crate) pred_x0: Py<PyAny>,
}

#[pymethods]
impl StepOutput {
    #[new]
    pub(crate) fn new(prev_sample: Py<PyAny>, pred_x0: Py<PyAny>) -> Self {
        StepOutput {
            prev_sample,
            pred_x0,
        }
    }
    #[getter]
    fn pred_original_sample(&self, py: Python<'_>) -> Py<PyAny> {
        self.pred_x0.clone_ref(py)
    }
    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        PyTuple::new(
            py,
            [self.prev_sample.clone_ref(py), self.pred_x0.clone_ref(py)],
        )?
        .try_iter()
        .map(|i| i.into_any())
    }
    fn __len__(&self) -> usize {
        2
    }
    fn __getitem__(&self, py: Python<'_>, i: isize) -> PyResult<Py<PyAny>> {
        match i {
            0 | -2 => Ok(self.prev_sample.clone_ref(py)),
            1 | -1 => Ok(self.pred_x0.clone_ref(py)),
            _ => Err(pyo3::exceptions::PyIndexError::new_err(
                "StepOutput has two items (prev_sample, pred_x0)",
            )),
        }
    }
    fn __repr__(&self, py: Python<'_>) -> String {
        let shape = self
            .prev_sample
            .bind(py)
            .getattr("shape")
            .and_then(|s| s.repr().map(|r| r.to_string()))
            .unwrap_or_default();
        format!("StepOutput(prev_sample=<array {shape}>, pred_x0=<array {shape}>)")
    }
}

pub(crate) fn fresh_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Standard normal float32 noise of `shape`: the stream of the initial x_T, a pure function of
/// the seed (identical for any thread count). `seed=None` draws a fresh OS-seeded array.
/// `out=` fills a preallocated C-contiguous float32 array of that shape instead.
#[pyfunction]
#[pyo3(signature = (shape, seed=None, *, out=None))]
fn randn<'py>(
    py: Python<'py>,
    shape: Vec<i64>,
    seed: Option<u64>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let shape = shape_arg(shape, "shape")?;
    let n: usize = shape.iter().product();
    let seed = seed.unwrap_or_else(fresh_seed);
    match out {
        None => {
            let v = py.detach(|| sample::randn(n, seed, sample::INITIAL_NOISE_STREAM));
            vec_to_array(py, v, &shape)
        }
        Some(o) => {
            let a = o.cast::<PyArrayDyn<f32>>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "out must be a float32 numpy array, got {}",
                    type_name(o)
                ))
            })?;
            if !a.is_c_contiguous() || a.shape() != shape.as_slice() {
                return Err(PyValueError::new_err(format!(
                    "out must be a C-contiguous float32 array of shape {shape:?}, got shape {:?}",
                    a.shape()
                )));
            }
            {
                let mut w = a.readwrite();
                let buf = w.as_slice_mut()?;
                py.detach(|| sample::randn_into(buf, seed, sample::INITIAL_NOISE_STREAM));
            }
            Ok(a.clone())
        }
    }
}

/// A Python callable `denoiser(x, t)`, or `denoiser(x, t, y)` with class labels, as a Rust
/// denoiser.
pub(crate) struct PyDenoiser<'py> {
    pub(crate) f: Bound<'py, PyAny>,
}

/// Classifier-free guidance settings of a `sample` call.
#[derive(Clone, Copy)]
pub(crate) struct GuidanceArgs {
    pub(crate) scale: Option<f64>,
    pub(crate) rescale: f64,
    pub(crate) null_label: Option<i64>,
}

impl GuidanceArgs {
    pub(crate) const NONE: GuidanceArgs = GuidanceArgs {
        scale: None,
        rescale: 0.0,
        null_label: None,
    };
}

/// The denoiser for a sampler's `denoiser` argument: a ferrodiff model or trainer (run in
/// Rust; a trainer with its EMA weights) or any callable; `labels` [B] for conditional ones,
/// with classifier-free guidance when `guidance.scale` is set.
pub(crate) fn denoiser_for<'py>(
    obj: &Bound<'py, PyAny>,
    labels: Option<&Bound<'py, PyAny>>,
    context: Option<&Bound<'py, PyAny>>,
    mut guidance: GuidanceArgs,
    batch: usize,
) -> PyResult<Box<dyn Denoiser + 'py>> {
    let py = obj.py();
    let mut model = super::nn::model_of(obj)?;
    // A network that takes the guidance scale as an input (guidance distilled in) gets it
    // there, in one pass, instead of a conditional / unconditional pair.
    if let Some(m) = model.as_mut() {
        if m.config().guidance_embed() {
            if let Some(w) = guidance.scale.take() {
                if guidance.rescale != 0.0 {
                    return Err(PyValueError::new_err(
                        "guidance_rescale needs two passes; this model takes guidance_scale as an input",
                    ));
                }
                *m = m.with_guidance_input(w as f32);
            }
        }
    }
    if model.is_none() && !obj.is_callable() {
        return Err(PyTypeError::new_err(format!(
            "denoiser must be a ferrodiff model or callable as denoiser(x, t), got {}",
            type_name(obj)
        )));
    }
    let context = match (context, &model) {
        (None, _) => None,
        (Some(c), Some(m)) => Some(super::nn::context_arg(c, m, Some(batch))?),
        (Some(_), None) => {
            return Err(PyTypeError::new_err(
                "context= conditions ferrodiff models with cross-attention; a Python denoiser \
                 can close over its own context",
            ))
        }
    };
    let Some(labels) = labels else {
        if let Some(scale) = guidance.scale {
            // Guidance on the context alone: conditional rows are marked 0, null rows -1.
            if let (Some(model), Some(context)) = (model, context) {
                if model.config().num_classes() > 0 {
                    return Err(PyValueError::new_err(
                        "the model is class-conditional too: pass labels= with context= to guide",
                    ));
                }
                return Ok(Box::new(Conditioned {
                    inner: Box::new(super::nn::PyModelDenoiser::new(py, model, Some(context))),
                    labels: vec![0; batch],
                    guidance: Some(Guidance::new(scale, guidance.rescale, -1)?),
                }));
            }
            return Err(PyValueError::new_err(
                "guidance_scale needs labels= (the classes to guide towards), or context= for a \
                 model with cross-attention",
            ));
        }
        return Ok(match model {
            Some(model) => Box::new(super::nn::PyModelDenoiser::new(py, model, context)),
            None => Box::new(PyDenoiser { f: obj.clone() }),
        });
    };
    let (inner, labels, null): (Box<dyn LabeledDenoiser + 'py>, Vec<i64>, Option<i64>) = match model
    {
        Some(model) => {
            let classes = model.config().num_classes();
            let y = super::nn::labels_arg(labels, batch, classes)?;
            if let Some(n) = guidance.null_label {
                if n != -1 && n != classes as i64 {
                    return Err(PyValueError::new_err(format!(
                        "null_label = {n}, but this model's null class is {classes} (or -1); leave it unset"
                    )));
                }
            }
            let y = y.into_iter().map(i64::from).collect();
            (
                Box::new(super::nn::PyModelDenoiser::new(py, model, context)),
                y,
                Some(classes as i64),
            )
        }
        None => (
            Box::new(PyDenoiser { f: obj.clone() }),
            timesteps_arg(labels, batch)
                .map_err(|e| PyValueError::new_err(format!("labels: {}", e.value(py))))?,
            guidance.null_label,
        ),
    };
    let guidance = match guidance.scale {
        None => None,
        Some(scale) => {
            let null = null.ok_or_else(|| {
                PyValueError::new_err(
                    "classifier-free guidance of a Python callable needs null_label= (the label of the unconditional rows)",
                )
            })?;
            Some(Guidance::new(scale, guidance.rescale, null)?)
        }
    };
    Ok(Box::new(Conditioned {
        inner,
        labels,
        guidance,
    }))
}

impl LabeledDenoiser for PyDenoiser<'_> {
    fn predict_labeled(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[i64],
        labels: &[i64],
    ) -> Result<ModelOutput> {
        let y = labels.to_vec().into_pyarray(self.f.py()).into_any();
        self.call(x, shape, t, Some(y))
    }
    fn predict_labeled_continuous(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[f64],
        labels: &[i64],
    ) -> Result<ModelOutput> {
        let y = labels.to_vec().into_pyarray(self.f.py()).into_any();
        match sample::integral_timesteps(t) {
            Ok(ti) => self.call(x, shape, &ti, Some(y)),
            Err(_) => self.call(x, shape, t, Some(y)),
        }
    }
}

impl Denoiser for PyDenoiser<'_> {
    fn predict(&mut self, x: &[f32], shape: &[usize], t: &[i64]) -> Result<ModelOutput> {
        self.call(x, shape, t, None)
    }
    /// Whole timesteps reach the callable as int64, fractional ones as float64.
    fn predict_continuous(&mut self, x: &[f32], shape: &[usize], t: &[f64]) -> Result<ModelOutput> {
        match sample::integral_timesteps(t) {
            Ok(ti) => self.call(x, shape, &ti, None),
            Err(_) => self.call(x, shape, t, None),
        }
    }
}

impl<'py> PyDenoiser<'py> {
    fn call<T: numpy::Element + Copy>(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[T],
        labels: Option<Bound<'py, PyAny>>,
    ) -> Result<ModelOutput> {
        let py = self.f.py();
        let run = || -> PyResult<ModelOutput> {
            let xa = vec_to_array(py, x.to_vec(), shape)?;
            let ta = t.to_vec().into_pyarray(py);
            let r = match &labels {
                Some(y) => self.f.call1((xa, ta, y))?,
                None => self.f.call1((xa, ta))?,
            };
            let arr = f32_array(&r, "the denoiser's output").map_err(|e| {
                PyTypeError::new_err(format!(
                    "the denoiser must return a float array of x's shape, got {} ({})",
                    type_name(&r),
                    e.value(py)
                ))
            })?;
            let shape = arr.shape().to_vec();
            let data = arr.readonly().as_slice()?.to_vec();
            Ok(ModelOutput { data, shape })
        };
        run().map_err(callback_error)
    }
}

/// Progress bar, user callback and Ctrl-C around a Rust loop; the GIL is released during passes.
pub(crate) struct PyHooks<'py> {
    py: Python<'py>,
    progress: Option<Bound<'py, PyAny>>,
    callback: Option<Bound<'py, PyAny>>,
    shape: Vec<usize>,
    /// Call the callback as `callback(i, x)` (iterative samplers such as Langevin dynamics)
    /// instead of the samplers' `callback(i, t, x, pred_x0)`.
    iterate_callback: bool,
}

impl<'py> PyHooks<'py> {
    /// The same hooks with the callback called as `callback(i, x)`.
    pub(crate) fn with_iterate_callback(mut self) -> Self {
        self.iterate_callback = true;
        self
    }

    pub(crate) fn new(
        py: Python<'py>,
        total: usize,
        progress: bool,
        callback: Option<Bound<'py, PyAny>>,
        shape: &[usize],
        desc: &str,
    ) -> PyResult<Self> {
        let progress = if progress {
            Some(
                py.import("ferrodiff._progress")?
                    .call_method1("progress_bar", (total, desc))?,
            )
        } else {
            None
        };
        Ok(PyHooks {
            py,
            progress,
            callback,
            shape: shape.to_vec(),
            iterate_callback: false,
        })
    }

    pub(crate) fn close(&self) {
        if let Some(p) = &self.progress {
            let _ = p.call_method0("close");
        }
    }
}

impl LoopHooks for PyHooks<'_> {
    fn run_pass(&mut self, pass: &mut (dyn FnMut() -> Result<()> + Send)) -> Result<()> {
        self.py.detach(pass)
    }
    fn wants_pred_x0(&self) -> bool {
        self.callback.is_some() && !self.iterate_callback
    }
    fn after_step(&mut self, i: usize, t: i64, x: &[f32], pred_x0: &[f32]) -> Result<()> {
        self.report(i, t, x, pred_x0)
    }
    fn after_sigma_step(&mut self, i: usize, sigma: f64, x: &[f32], pred_x0: &[f32]) -> Result<()> {
        self.report(i, sigma, x, pred_x0)
    }
}

impl PyHooks<'_> {
    /// Ctrl-C, progress and `callback(i, level, x, pred_x0)` after step i.
    fn report<L: for<'a> IntoPyObject<'a>>(
        &mut self,
        i: usize,
        level: L,
        x: &[f32],
        pred_x0: &[f32],
    ) -> Result<()> {
        let py = self.py;
        py.check_signals().map_err(callback_error)?;
        if let Some(p) = &self.progress {
            p.call_method1("update", (1,)).map_err(callback_error)?;
        }
        if let Some(cb) = &self.callback {
            let xa = vec_to_array(py, x.to_vec(), &self.shape).map_err(callback_error)?;
            if self.iterate_callback {
                cb.call1((i, xa)).map_err(callback_error)?;
                return Ok(());
            }
            let pa: Py<PyAny> = if pred_x0.is_empty() {
                py.None()
            } else {
                vec_to_array(py, pred_x0.to_vec(), &self.shape)
                    .map_err(callback_error)?
                    .into_any()
                    .unbind()
            };
            cb.call1((i, level, xa, pa)).map_err(callback_error)?;
        }
        Ok(())
    }
}

/// The starting x_T and its shape from `shape` / `x_T`.
pub(crate) fn initial_noise(
    py: Python<'_>,
    shape: Option<Vec<usize>>,
    x_t: Option<&Bound<'_, PyAny>>,
    seed: u64,
    scale: f64,
) -> PyResult<(Vec<f32>, Vec<usize>)> {
    match (shape, x_t) {
        (shape, Some(x)) => {
            let a = f32_array(x, "x_T")?;
            let sh = a.shape().to_vec();
            if let Some(s) = shape {
                if s != sh {
                    return Err(PyValueError::new_err(format!(
                        "shape {s:?} disagrees with x_T's shape {sh:?} (pass one of them)"
                    )));
                }
            }
            batch_of(&sh, "x_T")?;
            let v = a.readonly().as_slice()?.to_vec();
            Ok((v, sh))
        }
        (Some(sh), None) => {
            batch_of(&sh, "shape")?;
            let n = sh.iter().product();
            let mut x = py.detach(|| sample::randn(n, seed, sample::INITIAL_NOISE_STREAM));
            if scale != 1.0 {
                let s = scale as f32;
                x.iter_mut().for_each(|v| *v *= s);
            }
            Ok((x, sh))
        }
        (None, None) => Err(PyValueError::new_err("sample() needs shape= or x_T=")),
    }
}

/// The denoiser of a `sample` call: the model or callable with its labels, context,
/// classifier-free guidance and, with `classifier`, classifier guidance for `sampler`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn guided_denoiser<'a, 'py: 'a, S: sample::ClassifierFactor + ?Sized>(
    sampler: &'a S,
    denoiser: &Bound<'py, PyAny>,
    labels: Option<&Bound<'py, PyAny>>,
    context: Option<&Bound<'py, PyAny>>,
    guidance: GuidanceArgs,
    classifier: Option<&Bound<'py, PyAny>>,
    classifier_scale: f64,
    batch: usize,
) -> PyResult<Box<dyn Denoiser + 'a>> {
    let py = denoiser.py();
    Ok(match classifier {
        None => denoiser_for(denoiser, labels, context, guidance, batch)?,
        Some(clf) => {
            let Some(l) = labels else {
                return Err(PyValueError::new_err(
                    "classifier= needs labels= (the classes to guide towards)",
                ));
            };
            let y = timesteps_arg(l, batch)
                .map_err(|e| PyValueError::new_err(format!("labels: {}", e.value(py))))?;
            // The denoiser sees the labels only when classifier-free guidance is also on.
            let model_labels = if guidance.scale.is_some() {
                Some(l)
            } else {
                None
            };
            let inner = denoiser_for(denoiser, model_labels, context, guidance, batch)?;
            let classifier = super::nn::grad_fn_for(clf, &y)?;
            Box::new(sample::ClassifierGuided {
                inner,
                classifier,
                sampler,
                labels: y,
                scale: classifier_scale,
            })
        }
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn sample_impl<'py, S: sample::engine::Solver + sample::ClassifierFactor>(
    sampler: &S,
    py: Python<'py>,
    denoiser: &Bound<'py, PyAny>,
    shape: Option<Vec<i64>>,
    x_t: Option<&Bound<'py, PyAny>>,
    seed: Option<u64>,
    progress: bool,
    callback: Option<Bound<'py, PyAny>>,
    check_finite: bool,
    labels: Option<&Bound<'py, PyAny>>,
    guidance: GuidanceArgs,
    edit: EditArgs<'_, 'py>,
    desc: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    if let Some(cb) = &callback {
        if !cb.is_callable() {
            return Err(PyTypeError::new_err(
                "callback must be callable as callback(i, t, x, pred_x0)",
            ));
        }
    }
    let seed = seed.unwrap_or_else(fresh_seed);
    let shape = shape.map(|s| shape_arg(s, "shape")).transpose()?;
    let steps = sampler.num_steps();
    let (image, start) = match edit.image {
        Some(img) => {
            if x_t.is_some() || shape.is_some() {
                return Err(PyValueError::new_err(
                    "pass image= or shape= / x_T=, not both: an edit starts from the noised image",
                ));
            }
            let a = f32_array(img, "image")?;
            let sh = a.shape().to_vec();
            batch_of(&sh, "image")?;
            let start = sample::edit_start(steps, edit.strength)?;
            (Some((a.readonly().as_slice()?.to_vec(), sh)), start)
        }
        None => {
            if edit.strength != 1.0 {
                return Err(PyValueError::new_err(
                    "strength needs image= (the image to edit)",
                ));
            }
            (None, 0)
        }
    };
    let (x, sh) = match &image {
        Some((img, sh)) => (
            py.detach(|| sample::engine::noised_start(sampler, img, start, seed))?,
            sh.clone(),
        ),
        None => initial_noise(py, shape, x_t, seed, sampler.init_noise_scale())?,
    };
    let mask = match edit.mask {
        None => None,
        Some(m) => {
            let Some((img, _)) = &image else {
                return Err(PyValueError::new_err(
                    "mask= needs image= (its known pixels are kept)",
                ));
            };
            let np = py.import("numpy")?;
            let m = f32_array(m, "mask")?;
            let full = np
                .call_method1("broadcast_to", (m.clone(), sh.clone()))
                .map_err(|_| {
                    PyValueError::new_err(format!(
                        "mask has shape {:?}, which does not broadcast to the image's {:?}",
                        m.shape(),
                        sh
                    ))
                })?;
            let full = f32_array(&np.call_method1("ascontiguousarray", (full,))?, "mask")?;
            let v = full.readonly().as_slice()?.to_vec();
            if v.iter().any(|&a| !(0.0..=1.0).contains(&a)) {
                return Err(PyValueError::new_err(
                    "mask values must be in [0, 1] (1 = keep the image)",
                ));
            }
            Some((img.clone(), v))
        }
    };
    let controlled;
    let denoiser = match edit.control_image {
        None if edit.conditioning_scale.is_some() => {
            return Err(PyValueError::new_err(
                "conditioning_scale= goes with control_image= (a ControlNet's control images)",
            ))
        }
        None => denoiser,
        Some(images) => {
            controlled = super::nn::with_control_obj(denoiser, images, edit.conditioning_scale)?;
            &controlled
        }
    };
    let mut d = guided_denoiser(
        sampler,
        denoiser,
        labels,
        edit.context,
        guidance,
        edit.classifier,
        edit.classifier_scale,
        sh[0],
    )?;
    let mut hooks = PyHooks::new(py, steps - start, progress, callback, &sh, desc)?;
    let edit = sample::Edit {
        start,
        inpaint: mask.as_ref().map(|(k, m)| (k.as_slice(), m.as_slice())),
    };
    let r = sample::engine::run(
        sampler,
        d.as_mut(),
        x,
        &sh,
        seed,
        check_finite,
        &mut hooks,
        edit,
    );
    hooks.close();
    vec_to_array(py, r?, &sh)
}

/// The image-editing arguments of `sample`.
/// Editing, classifier-guidance and context arguments of `sample`.
pub(crate) struct EditArgs<'a, 'py> {
    pub(crate) context: Option<&'a Bound<'py, PyAny>>,
    /// ControlNets: the control images and a conditioning scale overriding the model's.
    pub(crate) control_image: Option<&'a Bound<'py, PyAny>>,
    pub(crate) conditioning_scale: Option<f64>,
    pub(crate) image: Option<&'a Bound<'py, PyAny>>,
    pub(crate) strength: f64,
    pub(crate) mask: Option<&'a Bound<'py, PyAny>>,
    pub(crate) classifier: Option<&'a Bound<'py, PyAny>>,
    pub(crate) classifier_scale: f64,
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<StepOutput>()?;
    m.add_function(wrap_pyfunction!(randn, m)?)?;
    Ok(())
}
