//! `ferrodiff.nn` models and `ferrodiff.Trainer`: candle networks driven from numpy.

use std::path::PathBuf;

use candle_core::Device;
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::arrays::{batch_of, f32_array, timesteps_arg, type_name, vec_to_array};
use super::callback_error;
use super::schedule::PySchedule;
use crate::error::{Error, Result};
use crate::nn::{HostContext, Model, ModelConfig};
use crate::sample::{Denoiser, GradLogProb, LabeledDenoiser, ModelOutput};
use crate::train::{self, AdamWConfig, EmaConfig, LrDecay, TrainConfig, TrainHooks, Trainer};

/// `py.detach(f)` (other Python threads run meanwhile) with `f`'s parallel work where rayon's
/// workers exist, so a model also runs in a forked DataLoader worker ([`crate::kernels::in_pool`]).
fn detach<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    py.detach(|| crate::kernels::in_pool(f))
}

pub(crate) fn json_dumps(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    obj.py()
        .import("json")?
        .call_method1("dumps", (obj,))?
        .extract()
}

fn json_loads<'py>(py: Python<'py>, s: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (s,))
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Class labels as model rows: ints in [0, num_classes), or -1 / num_classes for the null class.
pub(crate) fn labels_arg(
    obj: &Bound<'_, PyAny>,
    batch: usize,
    num_classes: usize,
) -> PyResult<Vec<u32>> {
    if num_classes == 0 {
        return Err(PyValueError::new_err(
            "labels were given but the model is unconditional (num_classes = 0)",
        ));
    }
    let t = timesteps_arg(obj, batch).map_err(|e| {
        let py = obj.py();
        PyTypeError::new_err(
            format!("labels: {}", e.value(py))
                .replace("t must", "labels must")
                .replace("timesteps", "class labels"),
        )
    })?;
    t.iter()
        .map(|&y| {
            if y == -1 || y == num_classes as i64 {
                Ok(num_classes as u32)
            } else if (0..num_classes as i64).contains(&y) {
                Ok(y as u32)
            } else {
                Err(PyValueError::new_err(format!(
                    "label {y} is out of range: classes are 0..{} (-1 or {num_classes} is the null class)",
                    num_classes - 1
                )))
            }
        })
        .collect()
}

/// Data [N, ...] as (values, per-sample shape).
fn data_arg(obj: &Bound<'_, PyAny>) -> PyResult<(Vec<f32>, Vec<usize>)> {
    let a = f32_array(obj, "data")?;
    let shape = a.shape().to_vec();
    let n = batch_of(&shape, "data")?;
    if n == 0 || shape.len() < 2 {
        return Err(PyValueError::new_err(format!(
            "data must be [N, ...] with at least one sample and one feature, got shape {shape:?}"
        )));
    }
    Ok((a.readonly().as_slice()?.to_vec(), shape[1..].to_vec()))
}

/// A cross-attention context from numpy: ([B, M, d] values, B, M, d).
pub(crate) struct ContextArg {
    pub(crate) data: Vec<f32>,
    pub(crate) len: usize,
    pub(crate) dim: usize,
}

impl ContextArg {
    pub(crate) fn host(&self) -> HostContext<'_> {
        HostContext {
            data: &self.data,
            len: self.len,
            dim: self.dim,
        }
    }
}

/// Parses `context` ([B, M, d] float array; [B, d] counts as M = 1) for `model`, checking its
/// width and, when given, its number of rows.
pub(crate) fn context_arg(
    obj: &Bound<'_, PyAny>,
    model: &Model,
    rows: Option<usize>,
) -> PyResult<ContextArg> {
    let want = model.config().context_dim();
    if want == 0 {
        return Err(PyValueError::new_err(
            "context= was given but the model has no cross-attention (build it with context_dim > 0)",
        ));
    }
    let a = f32_array(obj, "context")?;
    let shape = a.shape().to_vec();
    let (b, len, dim) = match shape.as_slice() {
        [b, d] => (*b, 1, *d),
        [b, m, d] => (*b, *m, *d),
        _ => {
            return Err(PyValueError::new_err(format!(
                "context must be [B, M, {want}] (or [B, {want}]), got shape {shape:?}"
            )))
        }
    };
    if dim != want {
        return Err(PyValueError::new_err(format!(
            "context has width {dim} (shape {shape:?}) but the model was built with context_dim = {want}"
        )));
    }
    if b == 0 || len == 0 {
        return Err(PyValueError::new_err(format!(
            "context must have at least one row and one token, got shape {shape:?}"
        )));
    }
    if let Some(r) = rows {
        if r != b {
            return Err(PyValueError::new_err(format!(
                "context has {b} rows but the batch has {r}"
            )));
        }
    }
    let data = a.readonly().as_slice()?.to_vec();
    model.check_context(HostContext {
        data: &data,
        len,
        dim,
    })?;
    Ok(ContextArg { data, len, dim })
}

/// `f(data, shape)` on the float32 values of array `x` (named `name` in errors), with the GIL
/// released.
fn on_host<'py, R: Send>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    name: &str,
    f: impl FnOnce(&[f32], &[usize]) -> Result<R> + Send,
) -> PyResult<R> {
    let a = f32_array(x, name)?;
    let shape = a.shape().to_vec();
    let ro = a.readonly();
    let data = ro.as_slice()?;
    Ok(detach(py, || f(data, &shape))?)
}

/// A candle denoiser network (MLP or U-Net) with its weights. Call it as `model(x, t, y=None)`
/// on numpy arrays; samplers run it without leaving Rust.
#[pyclass(name = "Model", module = "ferrodiff.nn", frozen)]
pub struct PyModel {
    pub(crate) inner: Model,
}

#[pymethods]
impl PyModel {
    /// A new model from a configuration dict (`{"type": "mlp" | "unet" | "dit", ...}`); the same
    /// `seed` gives the same initial weights on every machine.
    #[new]
    #[pyo3(signature = (config, seed=0))]
    fn new(config: &Bound<'_, PyAny>, seed: u64) -> PyResult<Self> {
        let text = json_dumps(config)?;
        let cfg: ModelConfig = serde_json::from_str(&text)
            .map_err(|e| PyValueError::new_err(format!("invalid model config: {e}")))?;
        Ok(PyModel {
            inner: Model::new(cfg, seed, &Device::Cpu)?,
        })
    }

    /// The model output for x [B, ...] at integer timesteps t (int or [B]); `y`: class labels
    /// for class-conditional models (-1 = the null class; None = all null); `context`:
    /// [B, M, context_dim] embeddings for a model with cross-attention (None = the learned null
    /// context).
    #[pyo3(signature = (x, t, y=None, *, context=None))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        t: &Bound<'py, PyAny>,
        y: Option<&Bound<'py, PyAny>>,
        context: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let a = f32_array(x, "x")?;
        let shape = a.shape().to_vec();
        let batch = batch_of(&shape, "x")?;
        let ts = super::arrays::real_timesteps_arg(t, batch)?;
        let labels = match y {
            Some(y) => Some(labels_arg(y, batch, self.inner.config().num_classes())?),
            None => None,
        };
        let context = match context {
            Some(c) => Some(context_arg(c, &self.inner, Some(batch))?),
            None => None,
        };
        let ro = a.readonly();
        let data = ro.as_slice()?;
        let m = &self.inner;
        let out = detach(py, || {
            m.predict_host_real_t(
                data,
                &shape,
                &ts,
                labels.as_deref(),
                context.as_ref().map(ContextArg::host),
                None,
            )
        })?;
        vec_to_array(py, out.data, &out.shape)
    }

    /// Autoencoders: the latents [B, C, H/f, W/f] of images x [B, C, H, W] in [-1, 1]
    /// (unscaled: multiply by `scaling_factor` for diffusion). KL: the posterior mean, or with
    /// `sample=True` a posterior sample seeded by `seed`; VQ: the continuous latent before
    /// quantisation (`decode` quantises it).
    #[pyo3(signature = (x, *, sample=false, seed=0))]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        sample: bool,
        seed: u64,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let m = &self.inner;
        let out = on_host(py, x, "x", |data, shape| {
            m.encode_host(data, shape, sample.then_some(seed))
        })?;
        vec_to_array(py, out.data, &out.shape)
    }

    /// Autoencoders: images [B, C, H, W] from latents z [B, C, h, w] (unscaled); a VQ model
    /// quantises z to its codebook first.
    fn decode<'py>(
        &self,
        py: Python<'py>,
        z: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let m = &self.inner;
        let out = on_host(py, z, "z", |data, shape| m.decode_host(data, shape))?;
        vec_to_array(py, out.data, &out.shape)
    }

    /// Autoencoders: decode(encode(x)) with the posterior mean.
    fn reconstruct<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let m = &self.inner;
        let out = on_host(py, x, "x", |data, shape| {
            let z = m.encode_host(data, shape, None)?;
            m.decode_host(&z.data, &z.shape)
        })?;
        vec_to_array(py, out.data, &out.shape)
    }

    /// VQ autoencoders: the codebook indices [B, h, w] (int64) of images x [B, C, H, W].
    fn codes<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, numpy::PyArrayDyn<i64>>> {
        let m = &self.inner;
        let (codes, dims) = on_host(py, x, "x", |data, shape| m.image_codes(data, shape))?;
        let v: Vec<i64> = codes.iter().map(|&c| c as i64).collect();
        v.into_pyarray(py).reshape(dims.as_slice())
    }

    /// VQ autoencoders: how images x use the codebook, as a dict: `codes_used` (distinct
    /// entries), `num_codes` (K) and `perplexity` exp(H) of the code frequencies (K when
    /// every code is used equally, 1 when one code takes everything).
    fn codebook_usage<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let m = &self.inner;
        let (codes, _) = on_host(py, x, "x", |data, shape| m.image_codes(data, shape))?;
        let k = m.autoencoder()?.config().num_vq_embeddings;
        let (used, perplexity) = crate::nn::autoencoder::codebook_usage(&codes, k);
        let d = PyDict::new(py);
        d.set_item("codes_used", used)?;
        d.set_item("num_codes", k)?;
        d.set_item("perplexity", perplexity)?;
        Ok(d)
    }

    /// Super-resolution U-Nets (`cond_channels > 0`): the same model (sharing its weights)
    /// conditioned on the low-resolution images `images` [N, C, h, w] in every call and every
    /// sampler: upsampled to the model's resolution (`upsample`: "bilinear" or "nearest") and,
    /// with `add_noise=True`, corrupted at augmentation level `aug_level` with noise seeded by
    /// `seed` (non-truncated conditioning augmentation). With `add_noise=False` the images are
    /// taken as already at that level (truncated augmentation: a base sampler stopped at level
    /// `aug_level`). Row i of a sampled batch takes image i mod N.
    #[pyo3(signature = (images, aug_level=0.0, *, seed=0, add_noise=true, upsample="bilinear"))]
    fn with_low_res(
        &self,
        images: &Bound<'_, PyAny>,
        aug_level: f32,
        seed: u64,
        add_noise: bool,
        upsample: &str,
    ) -> PyResult<Self> {
        let a = f32_array(images, "images")?;
        let shape = a.shape().to_vec();
        let ro = a.readonly();
        let up = crate::nn::resize::Upsample::parse(upsample)?;
        Ok(PyModel {
            inner: self.inner.with_low_res(
                ro.as_slice()?,
                &shape,
                aug_level,
                add_noise.then_some(seed),
                up,
            )?,
        })
    }

    /// ControlNets: the same model (sharing its weights) conditioned on the control images
    /// `images` [N, C, H, W] in every call and every sampler (row i of a sampled batch takes
    /// image i mod N), with `conditioning_scale` overriding the configuration's.
    #[pyo3(signature = (images, *, conditioning_scale=None))]
    fn with_control(
        &self,
        images: &Bound<'_, PyAny>,
        conditioning_scale: Option<f64>,
    ) -> PyResult<Self> {
        let a = f32_array(images, "control images")?;
        let shape = a.shape().to_vec();
        let ro = a.readonly();
        Ok(PyModel {
            inner: self
                .inner
                .with_control(ro.as_slice()?, &shape, conditioning_scale)?,
        })
    }

    /// Autoencoders: the factor latents are multiplied by for diffusion (1 / std of the
    /// training latents once `fd.LatentDiffusion` has computed it).
    #[getter]
    fn scaling_factor(&self) -> PyResult<f64> {
        Ok(self.inner.autoencoder()?.config().scaling_factor)
    }

    /// Autoencoders: the same model (sharing weights) with another `scaling_factor`.
    fn with_scaling_factor(&self, scaling_factor: f64) -> PyResult<Self> {
        Ok(PyModel {
            inner: self.inner.with_scaling_factor(scaling_factor)?,
        })
    }

    /// Autoencoders: [C, h, w] of the latent of an image of `size` (default: the training
    /// size).
    #[pyo3(signature = (size=None))]
    fn latent_shape(&self, size: Option<usize>) -> PyResult<Vec<usize>> {
        let c = self.inner.autoencoder()?.config();
        let side = size.unwrap_or(c.image_size);
        let f = c.downsampling_factor();
        if side == 0 || !side.is_multiple_of(f) {
            return Err(PyValueError::new_err(format!(
                "size {side} is not a positive multiple of the downsampling factor {f}"
            )));
        }
        Ok(c.latent_shape(side))
    }

    /// The configuration as a dict (`Model(model.config)` rebuilds the architecture).
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(py, &to_json(self.inner.config())?)
    }

    #[getter]
    fn num_parameters(&self) -> usize {
        self.inner.params().num_parameters()
    }

    #[getter]
    fn num_classes(&self) -> usize {
        self.inner.config().num_classes()
    }

    #[getter]
    fn learn_sigma(&self) -> bool {
        self.inner.config().learn_sigma()
    }

    /// One sample's shape.
    #[getter]
    fn data_shape(&self) -> Vec<usize> {
        self.inner.config().data_shape()
    }

    /// The weights as {name: float32 array} (copies).
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, t) in self.inner.params().tensors()? {
            let v = t
                .flatten_all()
                .map_err(Error::from)?
                .to_vec1::<f32>()
                .map_err(Error::from)?;
            d.set_item(name, vec_to_array(py, v, t.dims())?)?;
        }
        Ok(d)
    }

    /// Loads weights from {name: array} holding exactly this model's names and shapes; with
    /// `strict=False` loads the names both have (shapes must match) and returns
    /// (missing, unexpected): this model's names the dict lacks, the dict's names it lacks.
    #[pyo3(signature = (state, strict=true))]
    fn load_state_dict(
        &self,
        state: &Bound<'_, PyDict>,
        strict: bool,
    ) -> PyResult<Option<(Vec<String>, Vec<String>)>> {
        let mut map = std::collections::HashMap::new();
        for (k, v) in state.iter() {
            let name: String = k.extract()?;
            let a = f32_array(&v, &name)?;
            let t =
                candle_core::Tensor::from_slice(a.readonly().as_slice()?, a.shape(), &Device::Cpu)
                    .map_err(Error::from)?;
            map.insert(name, t);
        }
        if strict {
            self.inner.params().load(&map, "the state dict")?;
            Ok(None)
        } else {
            Ok(Some(
                self.inner.params().load_matching(&map, "the state dict")?,
            ))
        }
    }

    /// Saves the weights and configuration to a safetensors file (atomically).
    fn save(&self, path: PathBuf) -> PyResult<()> {
        Ok(train::save_model(&self.inner, &path)?)
    }

    /// Loads a model file, or a training checkpoint (a run folder or its .safetensors file);
    /// from a checkpoint `ema=True` takes the EMA weights.
    #[staticmethod]
    #[pyo3(signature = (path, ema=true))]
    fn load(path: PathBuf, ema: bool) -> PyResult<Self> {
        Ok(PyModel {
            inner: train::load_model(&path, &Device::Cpu, ema)?,
        })
    }

    /// Reads a diffusers `save_pretrained` folder (UNet2DModel, AutoencoderKL, VQModel; no
    /// torch needed): see `ferrodiff.interop.from_diffusers` for the keywords and
    /// docs/interop.md for the configurations that map.
    #[staticmethod]
    #[pyo3(signature = (folder, **kwargs))]
    fn from_diffusers<'py>(
        py: Python<'py>,
        folder: Bound<'py, PyAny>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        py.import("ferrodiff.interop")?
            .getattr("from_diffusers")?
            .call((folder,), kwargs)
    }

    /// Writes a folder that diffusers' `from_pretrained` loads (config.json +
    /// diffusion_pytorch_model.safetensors); options diffusers has no counterpart for are a
    /// ValueError naming them.
    fn save_diffusers<'py>(slf: &Bound<'py, Self>, folder: Bound<'py, PyAny>) -> PyResult<()> {
        slf.py()
            .import("ferrodiff.interop")?
            .getattr("save_diffusers")?
            .call1((slf, folder))?;
        Ok(())
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let py = slf.py();
        let bytes = train::model_to_bytes(&slf.get().inner)?;
        let ctor = py.import("ferrodiff._core")?.getattr("_model_from_bytes")?;
        Ok((ctor, (PyBytes::new(py, &bytes),)))
    }

    fn __repr__(&self) -> String {
        let kind = match self.inner.config() {
            ModelConfig::Mlp(_) => "MLP",
            ModelConfig::Unet(_) => "UNet",
            ModelConfig::Dit(_) => "DiT",
            ModelConfig::ControlNet(_) => "ControlNet",
            ModelConfig::Autoencoder(c) => match c.kind {
                crate::nn::AutoencoderKind::Kl => "AutoencoderKL",
                crate::nn::AutoencoderKind::Vq => "VQModel",
            },
        };
        format!(
            "ferrodiff.nn.Model({kind}, data_shape={:?}, {} parameters)",
            self.inner.config().data_shape(),
            self.inner.params().num_parameters()
        )
    }
}

/// Median milliseconds (forward, forward + backward) of one network kernel on random f32
/// inputs: the per-op table of `benches/bench_train.py`. Ops and their dims:
/// conv2d [B, Cin, H, W, Cout, k, stride]; group_norm_silu [B, C, H, W, groups];
/// attention [BH, N, D]; linear_silu [N, Din, Dout]; silu [N, D]; modulated_layer_norm
/// [B, N, D]; gelu_tanh [N, D]; token_attention [B, N, heads, hd].
#[pyfunction]
#[pyo3(signature = (op, dims, repeats=10))]
fn _time_op(py: Python<'_>, op: &str, dims: Vec<usize>, repeats: usize) -> PyResult<(f64, f64)> {
    Ok(detach(py, || {
        crate::nn::op_timing::time_op(op, &dims, repeats)
    })?)
}

/// The configuration dict of a named DiT variant, e.g. "DiT-S/2" (depth 12, width 384, 6
/// heads, patch 2); the other fields at their defaults.
#[pyfunction]
fn _dit_variant<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    json_loads(py, &to_json(&crate::nn::DiTConfig::named(name)?)?)
}

#[pyfunction]
fn _model_from_bytes(data: &[u8]) -> PyResult<PyModel> {
    Ok(PyModel {
        inner: train::model_from_bytes(
            data,
            std::path::Path::new("<pickle>"),
            &Device::Cpu,
            false,
        )?,
    })
}

/// A model as a sampler's denoiser: each call runs the network with the GIL released.
pub(crate) struct PyModelDenoiser<'py> {
    pub(crate) py: Python<'py>,
    pub(crate) model: Model,
    /// The batch's cross-attention context (tiled over a guided batch's doubled rows).
    pub(crate) context: Option<ContextArg>,
}

impl<'py> PyModelDenoiser<'py> {
    pub(crate) fn new(py: Python<'py>, model: Model, context: Option<ContextArg>) -> Self {
        PyModelDenoiser { py, model, context }
    }
}

impl Denoiser for PyModelDenoiser<'_> {
    fn predict(&mut self, x: &[f32], shape: &[usize], t: &[i64]) -> Result<ModelOutput> {
        let m = &self.model;
        let c = self.context.as_ref().map(ContextArg::host);
        detach(self.py, || m.predict_host_cond(x, shape, t, None, c, None))
    }
    fn predict_continuous(&mut self, x: &[f32], shape: &[usize], t: &[f64]) -> Result<ModelOutput> {
        let m = &self.model;
        let c = self.context.as_ref().map(ContextArg::host);
        let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        detach(self.py, || {
            m.predict_host_real_t(x, shape, &tf, None, c, None)
        })
    }
}

impl LabeledDenoiser for PyModelDenoiser<'_> {
    /// Labels in [0, num_classes], num_classes (or any negative label) being the null class; a
    /// null row also takes the learned null context. A model with a context but no classes
    /// reads the labels only as that mark (0: conditional, -1: null).
    fn predict_labeled(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[i64],
        labels: &[i64],
    ) -> Result<ModelOutput> {
        let tf: Vec<f64> = t.iter().map(|&v| v as f64).collect();
        self.predict_labeled_continuous(x, shape, &tf, labels)
    }

    fn predict_labeled_continuous(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[f64],
        labels: &[i64],
    ) -> Result<ModelOutput> {
        let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        let classes = self.model.config().num_classes() as i64;
        let is_null = |v: i64| v < 0 || (classes > 0 && v >= classes);
        let y: Option<Vec<u32>> = (classes > 0).then(|| {
            labels
                .iter()
                .map(|&v| if is_null(v) { classes as u32 } else { v as u32 })
                .collect()
        });
        let null_rows: Option<Vec<bool>> = self
            .context
            .as_ref()
            .map(|_| labels.iter().map(|&v| is_null(v)).collect());
        let m = &self.model;
        let c = self.context.as_ref().map(ContextArg::host);
        detach(self.py, || {
            m.predict_host_real_t(x, shape, &tf, y.as_deref(), c, null_rows.as_deref())
        })
    }
}

/// The model a sampler should run for `obj`, if it is a ferrodiff model or trainer (a
/// trainer samples with its EMA weights).
pub(crate) fn model_of(obj: &Bound<'_, PyAny>) -> PyResult<Option<Model>> {
    if let Ok(m) = obj.cast::<PyModel>() {
        return Ok(Some(m.get().inner.clone()));
    }
    if let Ok(t) = obj.cast::<PyTrainer>() {
        let t = t.borrow();
        return Ok(Some(t.inner.ema_model()?));
    }
    Ok(None)
}

/// Progress bar with the loss, periodic callback and Ctrl-C around the training loop.
struct PyTrainHooks<'py> {
    py: Python<'py>,
    progress: Option<Bound<'py, PyAny>>,
    callback: Option<Bound<'py, PyAny>>,
    callback_every: u64,
    shows_postfix: bool,
}

impl TrainHooks for PyTrainHooks<'_> {
    fn run_step(&mut self, step: &mut (dyn FnMut() -> Result<f32> + Send)) -> Result<f32> {
        detach(self.py, step)
    }

    fn after_step(&mut self, trainer: &Trainer, loss: f32) -> Result<()> {
        self.py.check_signals().map_err(callback_error)?;
        if let Some(p) = &self.progress {
            p.call_method1("update", (1,)).map_err(callback_error)?;
            if self.shows_postfix && trainer.step.is_multiple_of(10) {
                let kw = PyDict::new(self.py);
                kw.set_item("loss", format!("{loss:.4}"))
                    .map_err(callback_error)?;
                kw.set_item("refresh", false).map_err(callback_error)?;
                p.call_method("set_postfix", (), Some(&kw))
                    .map_err(callback_error)?;
            }
        }
        if let Some(cb) = &self.callback {
            if self.callback_every > 0 && trainer.step.is_multiple_of(self.callback_every) {
                cb.call1((trainer.step, loss)).map_err(callback_error)?;
            }
        }
        Ok(())
    }
}

/// Trains a model on numpy data: AdamW, learning-rate warm-up and decay, gradient clipping,
/// EMA, any loss of `ferrodiff.losses`, checkpoints that resume exactly.
#[pyclass(name = "Trainer", module = "ferrodiff")]
pub struct PyTrainer {
    pub(crate) inner: Trainer,
}

#[pymethods]
impl PyTrainer {
    #[new]
    #[pyo3(signature = (model, schedule, data, labels=None, *, context=None, control=None, batch_size=128, lr=1e-3, lr_schedule="constant", warmup_steps=0, total_steps=0, grad_clip=Some(1.0), weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, ema_decay=0.9999, ema_power=0.75, ema_warmup=true, ema_update_after_step=0, prediction="epsilon", loss="mse", weighting="uniform", min_snr_gamma=5.0, timestep_sampling="uniform", class_dropout=0.0, bins=256, seed=0, objective="diffusion", objective_options=None, teacher=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: &Bound<'_, PyModel>,
        schedule: Option<&Bound<'_, PySchedule>>,
        data: &Bound<'_, PyAny>,
        labels: Option<&Bound<'_, PyAny>>,
        context: Option<&Bound<'_, PyAny>>,
        control: Option<&Bound<'_, PyAny>>,
        batch_size: usize,
        lr: f64,
        lr_schedule: &str,
        warmup_steps: u64,
        total_steps: u64,
        grad_clip: Option<f64>,
        weight_decay: f64,
        betas: (f64, f64),
        eps: f64,
        ema_decay: f64,
        ema_power: f64,
        ema_warmup: bool,
        ema_update_after_step: u64,
        prediction: &str,
        loss: &str,
        weighting: &str,
        min_snr_gamma: f64,
        timestep_sampling: &str,
        class_dropout: f64,
        bins: u32,
        seed: u64,
        objective: &str,
        objective_options: Option<&Bound<'_, PyDict>>,
        teacher: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let objective = super::distill::objective_arg(objective, objective_options)?;
        let schedule = super::distill::schedule_for(&objective, schedule)?;
        let teacher = teacher
            .map(|t| super::distill::teacher_arg(t, &schedule))
            .transpose()?;
        let config = TrainConfig {
            batch_size,
            lr,
            lr_schedule: LrDecay::parse(lr_schedule)?,
            warmup_steps,
            total_steps,
            grad_clip,
            optimizer: AdamWConfig {
                beta1: betas.0,
                beta2: betas.1,
                eps,
                weight_decay,
            },
            ema: EmaConfig {
                max_decay: ema_decay,
                power: ema_power,
                use_warmup: ema_warmup,
                update_after_step: ema_update_after_step,
                ..EmaConfig::default()
            },
            prediction: prediction.into(),
            loss: loss.into(),
            weighting: weighting.into(),
            min_snr_gamma,
            timestep_sampling: timestep_sampling.into(),
            class_dropout,
            bins,
            seed,
            objective,
        };
        let (values, shape) = data_arg(data)?;
        let model = model.get().inner.clone();
        let per: usize = shape.iter().product();
        let labels = match labels {
            Some(l) => Some(labels_arg(
                l,
                values.len() / per,
                model.config().num_classes(),
            )?),
            None => None,
        };
        let context = match context {
            Some(c) => {
                let c = context_arg(c, &model, Some(values.len() / per))?;
                Some((c.data, c.len))
            }
            None => None,
        };
        Ok(PyTrainer {
            inner: Trainer::with_teacher(model, schedule, config, values, shape, labels, teacher)?
                .with_context(context)?
                .with_control(control_arg(control)?)?,
        })
    }

    /// Runs `steps` optimisation steps with a progress bar showing the loss; calls
    /// `callback(step, loss)` every `callback_every` steps (an exception stops training after
    /// that step); with `checkpoint=PATH` saves every `checkpoint_every` steps and at the end.
    #[pyo3(signature = (steps, *, progress=true, callback=None, callback_every=100, checkpoint=None, checkpoint_every=0))]
    #[allow(clippy::too_many_arguments)]
    fn train(
        &mut self,
        py: Python<'_>,
        steps: u64,
        progress: bool,
        callback: Option<Bound<'_, PyAny>>,
        callback_every: u64,
        checkpoint: Option<PathBuf>,
        checkpoint_every: u64,
    ) -> PyResult<()> {
        if let Some(cb) = &callback {
            if !cb.is_callable() {
                return Err(PyTypeError::new_err(format!(
                    "callback must be callable as callback(step, loss), got {}",
                    type_name(cb)
                )));
            }
        }
        let progress = if progress {
            Some(
                py.import("ferrodiff._progress")?
                    .call_method1("progress_bar", (steps, "training"))?,
            )
        } else {
            None
        };
        let shows_postfix = progress
            .as_ref()
            .is_some_and(|p| p.hasattr("set_postfix").unwrap_or(false));
        let mut hooks = PyTrainHooks {
            py,
            progress,
            callback,
            callback_every,
            shows_postfix,
        };
        let ck = checkpoint.as_deref().map(|p| (p, checkpoint_every));
        let r = self.inner.train(steps, ck, &mut hooks);
        if let Some(p) = &hooks.progress {
            let _ = p.call_method0("close");
        }
        Ok(r?)
    }

    /// Saves a checkpoint (weights, EMA, optimizer, step, generator position) to a run folder
    /// (`checkpoint.safetensors` + `config.json`) or to a `.safetensors` file; returns the file.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<PathBuf> {
        let t = &self.inner;
        Ok(detach(py, || t.save(&path))?)
    }

    /// Continues a run from its checkpoint with the same data (and labels, contexts) it was
    /// trained on.
    #[staticmethod]
    #[pyo3(signature = (path, data, labels=None, *, context=None, control=None, teacher=None))]
    fn resume(
        path: PathBuf,
        data: &Bound<'_, PyAny>,
        labels: Option<&Bound<'_, PyAny>>,
        context: Option<&Bound<'_, PyAny>>,
        control: Option<&Bound<'_, PyAny>>,
        teacher: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let teacher = match teacher {
            Some(t) => {
                let (_, schedule, _) = train::read_checkpoint_info(&path)?;
                Some(super::distill::teacher_arg(t, &schedule)?)
            }
            None => None,
        };
        let (values, shape) = data_arg(data)?;
        let per: usize = shape.iter().product();
        let labels = match labels {
            Some(l) => {
                let (model, _, _) = train::read_checkpoint_info(&path)?;
                Some(labels_arg(l, values.len() / per, model.num_classes())?)
            }
            None => None,
        };
        let trainer =
            Trainer::resume_with_teacher(&path, values, shape, labels, &Device::Cpu, teacher)?;
        let context = match context {
            Some(c) => {
                let c = context_arg(c, trainer.model(), Some(trainer.count()))?;
                Some((c.data, c.len))
            }
            None => None,
        };
        Ok(PyTrainer {
            inner: trainer
                .with_context(context)?
                .with_control(control_arg(control)?)?,
        })
    }

    /// The trained model (its weights are the trainer's, live).
    #[getter]
    fn model(&self) -> PyModel {
        PyModel {
            inner: self.inner.model().clone(),
        }
    }

    /// A copy of the model with the EMA weights (what sampling should use).
    fn ema_model(&self) -> PyResult<PyModel> {
        Ok(PyModel {
            inner: self.inner.ema_model()?,
        })
    }

    #[getter]
    fn schedule(&self) -> PySchedule {
        PySchedule {
            inner: self.inner.schedule().clone(),
        }
    }

    /// Optimisation steps taken.
    #[getter]
    fn step(&self) -> u64 {
        self.inner.step
    }

    /// The loss of every step so far (float32 [step]).
    #[getter]
    fn losses<'py>(&self, py: Python<'py>) -> Bound<'py, numpy::PyArray1<f32>> {
        self.inner.losses.clone().into_pyarray(py)
    }

    /// The learning rate of the next step.
    #[getter]
    fn lr(&self) -> f64 {
        self.inner.current_lr()
    }

    /// The training settings as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(py, &to_json(&self.inner.config)?)
    }

    /// JSON-able metadata saved with checkpoints (the CLI records its dataset here).
    #[getter]
    fn get_extra<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(py, &to_json(&self.inner.extra)?)
    }

    #[setter]
    fn set_extra(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let text = json_dumps(value)?;
        self.inner.extra =
            serde_json::from_str(&text).map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(())
    }

    /// The objective's name ("diffusion", "progressive_distillation",
    /// "consistency_distillation", "consistency_training" or "autoencoder").
    #[getter]
    fn objective(&self) -> &'static str {
        self.inner.config.objective.name()
    }

    /// What the objective measured on the last step besides the loss, as a dict (an
    /// autoencoder's reconstruction error, KL, commitment, codes used and perplexity); None
    /// when it reports nothing.
    #[getter]
    fn objective_metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(py, &to_json(&self.inner.objective_metrics())?)
    }

    fn __repr__(&self) -> String {
        let objective = match &self.inner.config.objective {
            train::ObjectiveConfig::Diffusion => String::new(),
            o => format!(", objective={:?}", o.name()),
        };
        format!(
            "ferrodiff.Trainer(step={}, batch_size={}, lr={}{objective})",
            self.inner.step, self.inner.config.batch_size, self.inner.config.lr
        )
    }

    /// (σ_min, σ_max, σ_data, ρ) of a consistency objective, else None.
    #[getter]
    fn _consistency_params(&self) -> Option<(f64, f64, f64, f64)> {
        self.inner
            .config
            .objective
            .consistency_params()
            .map(|p| (p.sigma_min, p.sigma_max, p.sigma_data, p.rho))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModel>()?;
    m.add_class::<PyTrainer>()?;
    m.add_class::<PyClassifier>()?;
    m.add_function(wrap_pyfunction!(_model_from_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(_time_op, m)?)?;
    m.add_function(wrap_pyfunction!(_dit_variant, m)?)?;
    m.add_function(wrap_pyfunction!(_controlnet_from, m)?)?;
    m.add_function(wrap_pyfunction!(_classifier_from_bytes, m)?)?;
    Ok(())
}

/// A small MLP classifier on flattened inputs (the digits feature extractor of
/// `ferrodiff.metrics`).
#[pyclass(name = "Classifier", module = "ferrodiff.nn", frozen)]
pub struct PyClassifier {
    inner: crate::nn::Classifier,
    /// The schedule a noisy classifier was last fitted with (saved with it).
    schedule: std::sync::Mutex<Option<crate::schedule::Schedule>>,
}

impl PyClassifier {
    fn wrap(inner: crate::nn::Classifier, schedule: Option<crate::schedule::Schedule>) -> Self {
        PyClassifier {
            inner,
            schedule: std::sync::Mutex::new(schedule),
        }
    }

    fn fitted_schedule(&self) -> Option<crate::schedule::Schedule> {
        self.schedule.lock().map(|s| s.clone()).unwrap_or(None)
    }
}

#[pyfunction]
fn _classifier_from_bytes(data: &[u8]) -> PyResult<PyClassifier> {
    let (c, s) = train::classifier_from_bytes(data, std::path::Path::new("<pickle>"))?;
    Ok(PyClassifier::wrap(c, s))
}

fn rows_tensor(x: &Bound<'_, PyAny>) -> PyResult<candle_core::Tensor> {
    let a = f32_array(x, "x")?;
    let shape = a.shape().to_vec();
    batch_of(&shape, "x")?;
    Ok(
        candle_core::Tensor::from_slice(a.readonly().as_slice()?, shape, &Device::Cpu)
            .map_err(Error::from)?,
    )
}

fn times_arg(t: Option<&Bound<'_, PyAny>>, n: usize) -> PyResult<Option<Vec<f32>>> {
    Ok(match t {
        Some(t) => Some(timesteps_arg(t, n)?.into_iter().map(|v| v as f32).collect()),
        None => None,
    })
}

fn to_array<'py>(py: Python<'py>, t: candle_core::Tensor) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let shape = t.dims().to_vec();
    let v = t
        .flatten_all()
        .map_err(Error::from)?
        .to_vec1::<f32>()
        .map_err(Error::from)?;
    vec_to_array(py, v, &shape)
}

#[pymethods]
impl PyClassifier {
    /// `time_embed_dim > 0`: a noisy classifier f(y | x_t, t) for classifier guidance.
    #[new]
    #[pyo3(signature = (in_dim, hidden, num_classes, seed=0, time_embed_dim=0))]
    fn new(
        in_dim: usize,
        hidden: Vec<usize>,
        num_classes: usize,
        seed: u64,
        time_embed_dim: usize,
    ) -> PyResult<Self> {
        Ok(PyClassifier::wrap(
            crate::nn::Classifier::new(in_dim, &hidden, num_classes, time_embed_dim, seed)?,
            None,
        ))
    }

    /// Saves the weights, the architecture and (for a noisy classifier) the schedule it was
    /// fitted with to `path` (a `.safetensors` file, or a folder that then holds
    /// `classifier.safetensors`), atomically; returns the file written.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<PathBuf> {
        let c = &self.inner;
        let s = self.fitted_schedule();
        Ok(detach(py, || train::save_classifier(c, s.as_ref(), &path))?)
    }

    /// Loads a classifier written by `save` (a file or its folder).
    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        let (c, s) = train::load_classifier(&path)?;
        Ok(PyClassifier::wrap(c, s))
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let py = slf.py();
        let me = slf.get();
        let bytes = train::classifier_to_bytes(&me.inner, me.fitted_schedule().as_ref())?;
        let ctor = py
            .import("ferrodiff._core")?
            .getattr("_classifier_from_bytes")?;
        Ok((ctor, (PyBytes::new(py, &bytes),)))
    }

    /// The architecture as a dict (in_dim, hidden, num_classes, time_embed_dim).
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(py, &to_json(&self.inner.config())?)
    }

    /// The schedule a noisy classifier was fitted (or saved) with, if any.
    #[getter]
    fn schedule(&self) -> Option<PySchedule> {
        self.fitted_schedule().map(|inner| PySchedule { inner })
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "ferrodiff.nn.Classifier(in_dim={}, hidden={:?}, num_classes={}, time_embed_dim={})",
            c.in_dim, c.hidden, c.num_classes, c.time_embed_dim
        )
    }

    /// Trains on `data` [N, ...] with integer `labels` [N]; returns the loss of every step. A
    /// noisy classifier trains on data noised by `schedule` at uniformly drawn timesteps.
    #[pyo3(signature = (data, labels, *, steps=2000, batch_size=128, lr=3e-3, seed=0, schedule=None))]
    #[allow(clippy::too_many_arguments)]
    fn fit<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        labels: &Bound<'py, PyAny>,
        steps: u64,
        batch_size: usize,
        lr: f64,
        seed: u64,
        schedule: Option<PyRef<'py, PySchedule>>,
    ) -> PyResult<Bound<'py, numpy::PyArray1<f32>>> {
        let (values, shape) = data_arg(data)?;
        let per: usize = shape.iter().product();
        let n = values.len() / per;
        let y = labels_arg(labels, n, self.inner.num_classes())?;
        if y.iter().any(|&v| v as usize >= self.inner.num_classes()) {
            return Err(PyValueError::new_err("labels must be in [0, num_classes)"));
        }
        let c = &self.inner;
        let sch = schedule.as_ref().map(|s| s.inner.clone());
        let losses = detach(py, || {
            train::fit_classifier(c, sch.as_ref(), &values, &y, steps, batch_size, lr, seed)
        })?;
        if let Ok(mut fitted) = self.schedule.lock() {
            *fitted = sch;
        }
        Ok(losses.into_pyarray(py))
    }

    /// The last hidden layer's activations [N, hidden] (features for Fréchet distances);
    /// `t` (int or [N]) for a noisy classifier.
    #[pyo3(signature = (x, t=None))]
    fn features<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        t: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let xt = rows_tensor(x)?;
        let tf = times_arg(t, xt.dims()[0])?;
        let c = &self.inner;
        let f = detach(py, || c.features(&xt, tf.as_deref()))?;
        to_array(py, f)
    }

    /// Class probabilities [N, num_classes]; `t` for a noisy classifier.
    #[pyo3(signature = (x, t=None))]
    fn predict_proba<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        t: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let xt = rows_tensor(x)?;
        let tf = times_arg(t, xt.dims()[0])?;
        let c = &self.inner;
        let p = detach(py, || -> Result<candle_core::Tensor> {
            Ok(c.log_probs(&xt, tf.as_deref())?.exp()?)
        })?;
        to_array(py, p)
    }

    /// ∇_x log f(y | x, t), shaped like x: the guidance direction of classifier guidance.
    #[pyo3(signature = (x, t, y))]
    fn grad_log_prob<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        t: Option<&Bound<'py, PyAny>>,
        y: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let xt = rows_tensor(x)?;
        let n = xt.dims()[0];
        let tf = times_arg(t, n)?;
        let labels = labels_arg(y, n, self.inner.num_classes())?;
        let c = &self.inner;
        let g = detach(py, || c.grad_log_prob(&xt, tf.as_deref(), &labels))?;
        to_array(py, g)
    }

    #[getter]
    fn is_noisy(&self) -> bool {
        self.inner.is_noisy()
    }

    #[getter]
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
}

/// A ferrodiff noisy classifier or a Python `grad_fn(x, t, y)` as the gradient source of
/// classifier guidance.
pub(crate) fn grad_fn_for<'py>(
    obj: &Bound<'py, PyAny>,
    labels: &[i64],
) -> PyResult<Box<dyn GradLogProb + 'py>> {
    let py = obj.py();
    if let Ok(c) = obj.cast::<PyClassifier>() {
        let clf = c.get().inner.clone();
        if !clf.is_noisy() {
            return Err(PyValueError::new_err(
                "classifier guidance needs a noisy classifier (Classifier(..., time_embed_dim > 0) trained with a schedule)",
            ));
        }
        if let Some(&bad) = labels
            .iter()
            .find(|&&y| y < 0 || y as usize >= clf.num_classes())
        {
            return Err(PyValueError::new_err(format!(
                "label {bad} is out of range for a classifier of {} classes",
                clf.num_classes()
            )));
        }
        return Ok(Box::new(ClassifierGrad { py, clf }));
    }
    if obj.is_callable() {
        return Ok(Box::new(PyGradFn { f: obj.clone() }));
    }
    Err(PyTypeError::new_err(format!(
        "classifier must be a ferrodiff.nn.Classifier or callable as grad_fn(x, t, y), got {}",
        type_name(obj)
    )))
}

struct ClassifierGrad<'py> {
    py: Python<'py>,
    clf: crate::nn::Classifier,
}

impl GradLogProb for ClassifierGrad<'_> {
    fn grad_log_prob(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[i64],
        labels: &[i64],
    ) -> Result<Vec<f32>> {
        let c = &self.clf;
        detach(self.py, || {
            let xt = candle_core::Tensor::from_slice(x, shape, &Device::Cpu)?;
            let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
            let y: Vec<u32> = labels.iter().map(|&v| v as u32).collect();
            Ok(c.grad_log_prob(&xt, Some(&tf), &y)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        })
    }
}

struct PyGradFn<'py> {
    f: Bound<'py, PyAny>,
}

impl GradLogProb for PyGradFn<'_> {
    fn grad_log_prob(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[i64],
        labels: &[i64],
    ) -> Result<Vec<f32>> {
        let py = self.f.py();
        let run = || -> PyResult<Vec<f32>> {
            let xa = vec_to_array(py, x.to_vec(), shape)?;
            let ta = t.to_vec().into_pyarray(py);
            let ya = labels.to_vec().into_pyarray(py);
            let r = self.f.call1((xa, ta, ya))?;
            let a = f32_array(&r, "the classifier gradient")?;
            if a.shape() != shape {
                return Err(PyValueError::new_err(format!(
                    "grad_fn returned shape {:?} but x has shape {shape:?}",
                    a.shape()
                )));
            }
            Ok(a.readonly().as_slice()?.to_vec())
        };
        run().map_err(callback_error)
    }
}

/// Control images as (values, [C, H, W]) for the trainer.
fn control_arg(control: Option<&Bound<'_, PyAny>>) -> PyResult<Option<(Vec<f32>, Vec<usize>)>> {
    let Some(c) = control else {
        return Ok(None);
    };
    let a = f32_array(c, "control")?;
    let shape = a.shape().to_vec();
    if shape.len() != 4 {
        return Err(PyValueError::new_err(format!(
            "control must be images [N, C, H, W], got shape {shape:?}"
        )));
    }
    let ro = a.readonly();
    Ok(Some((ro.as_slice()?.to_vec(), shape[1..].to_vec())))
}

/// `fd.nn.ControlNet.from_unet`: a ControlNet on `base` (see `Model::controlnet_from`).
#[pyfunction]
#[pyo3(signature = (base, conditioning_channels=1, conditioning_embedding_channels=vec![16], conditioning_scale=1.0, seed=0))]
pub(crate) fn _controlnet_from(
    base: &PyModel,
    conditioning_channels: usize,
    conditioning_embedding_channels: Vec<usize>,
    conditioning_scale: f64,
    seed: u64,
) -> PyResult<PyModel> {
    Ok(PyModel {
        inner: Model::controlnet_from(
            &base.inner,
            conditioning_channels,
            conditioning_embedding_channels,
            conditioning_scale,
            seed,
        )?,
    })
}

/// `obj` (a ferrodiff ControlNet, or a trainer of one: its EMA weights) conditioned on the
/// control images `images`, as a Python model object for the samplers.
pub(crate) fn with_control_obj<'py>(
    obj: &Bound<'py, PyAny>,
    images: &Bound<'py, PyAny>,
    scale: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    let Some(model) = model_of(obj)? else {
        return Err(PyTypeError::new_err(
            "control_image= conditions a ferrodiff ControlNet; a Python denoiser can close over \
             its own control images",
        ));
    };
    let a = f32_array(images, "control_image")?;
    let shape = a.shape().to_vec();
    let ro = a.readonly();
    let inner = model.with_control(ro.as_slice()?, &shape, scale)?;
    Ok(Bound::new(obj.py(), PyModel { inner })?.into_any())
}
