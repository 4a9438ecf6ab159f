//! A small MLP classifier on flattened inputs: the feature extractor behind Fréchet distances
//! on the digits data (its last hidden layer), and, with a time embedding, the noisy classifier
//! f(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021), whose input gradient
//! ∇ log f(y | x_t, t) comes from candle's autograd.

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use super::layers::{silu, timestep_embedding, Linear};
use super::params::ParamStore;
use crate::error::Result;
use crate::{shape_error, value_error};

/// A classifier's architecture; round-trips through JSON (saved with its weights).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    pub in_dim: usize,
    pub hidden: Vec<usize>,
    pub num_classes: usize,
    /// 0: a classifier of clean inputs; > 0: a noisy classifier f(y | x_t, t).
    pub time_embed_dim: usize,
}

#[derive(Clone)]
pub struct Classifier {
    params: ParamStore,
    hidden: Vec<Linear>,
    /// Per hidden layer, the projection of the time embedding (noisy classifiers only).
    time_proj: Vec<Linear>,
    time_embed_dim: usize,
    out: Linear,
    in_dim: usize,
    num_classes: usize,
}

impl Classifier {
    /// A classifier of clean inputs; `time_embed_dim > 0` makes it a noisy classifier whose
    /// hidden layers also see the sinusoidal embedding of t.
    pub fn new(
        in_dim: usize,
        hidden: &[usize],
        num_classes: usize,
        time_embed_dim: usize,
        seed: u64,
    ) -> Result<Self> {
        Self::new_in(
            in_dim,
            hidden,
            num_classes,
            time_embed_dim,
            seed,
            DType::F32,
        )
    }

    /// As [`Classifier::new`] with parameters of type `dtype`.
    pub fn new_in(
        in_dim: usize,
        hidden: &[usize],
        num_classes: usize,
        time_embed_dim: usize,
        seed: u64,
        dtype: DType,
    ) -> Result<Self> {
        if !time_embed_dim.is_multiple_of(2) {
            value_error!("time_embed_dim must be even, got {time_embed_dim}");
        }
        if in_dim == 0 || num_classes < 2 || hidden.is_empty() || hidden.contains(&0) {
            value_error!(
                "a classifier needs in_dim > 0, at least 2 classes and positive hidden widths, got \
                 in_dim {in_dim}, {num_classes} classes, hidden {hidden:?}"
            );
        }
        let params = ParamStore::new(seed, Device::Cpu, dtype);
        let root = params.root();
        let mut layers = Vec::new();
        let mut time_proj = Vec::new();
        let mut width = in_dim;
        for (i, &h) in hidden.iter().enumerate() {
            layers.push(Linear::new(&root.pp("hidden").pp(i), width, h)?);
            if time_embed_dim > 0 {
                time_proj.push(Linear::new(&root.pp("time_proj").pp(i), time_embed_dim, h)?);
            }
            width = h;
        }
        let out = Linear::new(&root.pp("out"), width, num_classes)?;
        Ok(Classifier {
            params,
            hidden: layers,
            time_proj,
            time_embed_dim,
            out,
            in_dim,
            num_classes,
        })
    }

    /// A classifier of `config`'s architecture with fresh weights.
    pub fn from_config(config: &ClassifierConfig, seed: u64) -> Result<Self> {
        Self::new(
            config.in_dim,
            &config.hidden,
            config.num_classes,
            config.time_embed_dim,
            seed,
        )
    }

    pub fn config(&self) -> ClassifierConfig {
        ClassifierConfig {
            in_dim: self.in_dim,
            hidden: self.hidden.iter().map(Linear::out_dim).collect(),
            num_classes: self.num_classes,
            time_embed_dim: self.time_embed_dim,
        }
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Whether the classifier takes a timestep (a noisy classifier).
    pub fn is_noisy(&self) -> bool {
        self.time_embed_dim > 0
    }

    fn check(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dims().first().copied().unwrap_or(0);
        if x.elem_count() != rows * self.in_dim || rows == 0 {
            shape_error!(
                "x has shape {:?} but the classifier takes [N, ...] with {} values per row",
                x.dims(),
                self.in_dim
            );
        }
        Ok(x.reshape((rows, self.in_dim))?)
    }

    /// The last hidden layer's activations [N, hidden]; `t` [N] for a noisy classifier.
    pub fn features(&self, x: &Tensor, t: Option<&[f32]>) -> Result<Tensor> {
        let mut h = self.check(x)?;
        let temb = match (self.is_noisy(), t) {
            (true, Some(t)) => {
                if t.len() != h.dims()[0] {
                    shape_error!("t has {} entries but x has {} rows", t.len(), h.dims()[0]);
                }
                Some(timestep_embedding(t, self.time_embed_dim, x.device())?.to_dtype(h.dtype())?)
            }
            (true, None) => {
                value_error!("this noisy classifier needs the timesteps t of its inputs")
            }
            (false, Some(_)) => {
                value_error!("this classifier takes clean inputs: it has no time embedding")
            }
            (false, None) => None,
        };
        for (i, l) in self.hidden.iter().enumerate() {
            let mut z = l.forward(&h)?;
            if let Some(e) = &temb {
                z = (z + self.time_proj[i].forward(e)?)?;
            }
            h = silu(&z)?;
        }
        Ok(h)
    }

    pub fn logits(&self, x: &Tensor, t: Option<&[f32]>) -> Result<Tensor> {
        self.out.forward(&self.features(x, t)?)
    }

    /// log softmax from differentiable primitives.
    pub fn log_probs(&self, x: &Tensor, t: Option<&[f32]>) -> Result<Tensor> {
        let z = self.logits(x, t)?;
        let m = z.max_keepdim(D::Minus1)?.detach();
        let shifted = z.broadcast_sub(&m)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        Ok(shifted.broadcast_sub(&lse)?)
    }

    fn one_hot(&self, labels: &[u32], like: &Tensor) -> Result<Tensor> {
        let n = labels.len();
        let mut onehot = vec![0f32; n * self.num_classes];
        for (i, &y) in labels.iter().enumerate() {
            if y as usize >= self.num_classes {
                value_error!("label {y} is out of range for {} classes", self.num_classes);
            }
            onehot[i * self.num_classes + y as usize] = 1.0;
        }
        Ok(
            Tensor::from_vec(onehot, (n, self.num_classes), like.device())?
                .to_dtype(like.dtype())?,
        )
    }

    /// ∇_x log f(y | x, t) per row, shaped like x (candle autograd through the network).
    pub fn grad_log_prob(&self, x: &Tensor, t: Option<&[f32]>, labels: &[u32]) -> Result<Tensor> {
        let rows = x.dims().first().copied().unwrap_or(0);
        if labels.len() != rows {
            shape_error!("labels have {} entries but x has {rows} rows", labels.len());
        }
        let xv = candle_core::Var::from_tensor(&x.detach())?;
        let lp = self.log_probs(xv.as_tensor(), t)?;
        let selected = (lp.clone() * self.one_hot(labels, &lp)?)?.sum_all()?;
        let grads = selected.backward()?;
        let g = grads.get(xv.as_tensor()).ok_or_else(|| {
            crate::Error::Value("the classifier's output does not depend on x".into())
        })?;
        Ok(g.reshape(x.dims())?)
    }

    /// Mean cross-entropy of `labels` [N].
    pub fn cross_entropy(&self, x: &Tensor, t: Option<&[f32]>, labels: &[u32]) -> Result<Tensor> {
        let lp = self.log_probs(x, t)?;
        let n = labels.len();
        let onehot = self.one_hot(labels, &lp)?;
        Ok((lp * onehot)?.sum_all()?.affine(-1.0 / n as f64, 0.0)?)
    }
}
