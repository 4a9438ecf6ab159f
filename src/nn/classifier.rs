//! A small MLP classifier on flattened inputs: the feature extractor behind Fréchet distances
//! on the digits data (its last hidden layer), and a sanity check of generated samples.

use candle_core::{DType, Device, Tensor, D};

use super::layers::{silu, Linear};
use super::params::ParamStore;
use crate::error::Result;
use crate::{shape_error, value_error};

#[derive(Clone)]
pub struct Classifier {
    params: ParamStore,
    hidden: Vec<Linear>,
    out: Linear,
    in_dim: usize,
    num_classes: usize,
}

impl Classifier {
    pub fn new(in_dim: usize, hidden: &[usize], num_classes: usize, seed: u64) -> Result<Self> {
        Self::new_in(in_dim, hidden, num_classes, seed, DType::F32)
    }

    /// As [`Classifier::new`] with parameters of type `dtype`.
    pub fn new_in(
        in_dim: usize,
        hidden: &[usize],
        num_classes: usize,
        seed: u64,
        dtype: DType,
    ) -> Result<Self> {
        if in_dim == 0 || num_classes < 2 || hidden.is_empty() || hidden.contains(&0) {
            value_error!(
                "a classifier needs in_dim > 0, at least 2 classes and positive hidden widths, got \
                 in_dim {in_dim}, {num_classes} classes, hidden {hidden:?}"
            );
        }
        let params = ParamStore::new(seed, Device::Cpu, dtype);
        let root = params.root();
        let mut layers = Vec::new();
        let mut width = in_dim;
        for (i, &h) in hidden.iter().enumerate() {
            layers.push(Linear::new(&root.pp("hidden").pp(i), width, h)?);
            width = h;
        }
        let out = Linear::new(&root.pp("out"), width, num_classes)?;
        Ok(Classifier {
            params,
            hidden: layers,
            out,
            in_dim,
            num_classes,
        })
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

    /// The last hidden layer's activations [N, hidden].
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.check(x)?;
        for l in &self.hidden {
            h = silu(&l.forward(&h)?)?;
        }
        Ok(h)
    }

    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.features(x)?)
    }

    /// log softmax from differentiable primitives.
    pub fn log_probs(&self, x: &Tensor) -> Result<Tensor> {
        let z = self.logits(x)?;
        let m = z.max_keepdim(D::Minus1)?.detach();
        let shifted = z.broadcast_sub(&m)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        Ok(shifted.broadcast_sub(&lse)?)
    }

    /// Mean cross-entropy of `labels` [N].
    pub fn cross_entropy(&self, x: &Tensor, labels: &[u32]) -> Result<Tensor> {
        let lp = self.log_probs(x)?;
        let n = labels.len();
        let mut onehot = vec![0f32; n * self.num_classes];
        for (i, &y) in labels.iter().enumerate() {
            if y as usize >= self.num_classes {
                value_error!("label {y} is out of range for {} classes", self.num_classes);
            }
            onehot[i * self.num_classes + y as usize] = 1.0;
        }
        let onehot =
            Tensor::from_vec(onehot, (n, self.num_classes), x.device())?.to_dtype(lp.dtype())?;
        Ok((lp * onehot)?.sum_all()?.affine(-1.0 / n as f64, 0.0)?)
    }
}
