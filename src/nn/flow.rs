//! A candle model as the probability-flow field of the likelihood ODE, with Hutchinson's
//! divergence estimate εᵀ (∂g/∂x) ε computed by candle's autograd (one backward pass per
//! evaluation).

use candle_core::{DType, Tensor, Var};

use super::layers::Ctx;
use super::{Cond, Model};
use crate::error::Result;
use crate::sample::ode::likelihood::FlowField;
use crate::sample::sigma::SigmaGrid;

pub struct ModelFlow<'a> {
    pub model: &'a Model,
    /// The parameterisation and timestep map of the model (a grid's `timestep_of`).
    pub grid: &'a SigmaGrid,
    pub shape: Vec<usize>,
    pub labels: Option<Vec<u32>>,
    /// One fixed probe per value (Rademacher or Gaussian).
    pub probes: Vec<f32>,
}

impl FlowField for ModelFlow<'_> {
    fn field(&mut self, x: &[f64], sigma: f64) -> Result<(Vec<f64>, Vec<f64>)> {
        let device = self.model.device();
        let dtype = self.model.params().dtype();
        let batch = self.shape[0];
        let channels = self.shape.get(1).copied().unwrap_or(1);
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let xt = Tensor::from_vec(xf, self.shape.as_slice(), device)?.to_dtype(dtype)?;
        let xv = Var::from_tensor(&xt)?;
        let p = self.grid.parameterization;
        let t = vec![self.grid.timestep_of(sigma) as f32; batch];
        let cond = Cond {
            labels: self.labels.as_deref(),
            context: None,
            null_context: None,
            guidance: None,
            low_res: None,
            aug_level: None,
            control: None,
            control_scale: None,
        };
        let input = xv.as_tensor().affine(p.c_in(sigma), 0.0)?;
        let mut f = self.model.forward_cond(&input, &t, &cond, &Ctx::eval())?;
        if self.model.config().learn_sigma() && self.shape.len() >= 2 {
            f = f.narrow(1, 0, channels)?;
        }
        let (a, b) = p.denoised_coefficients(sigma);
        // g = x − D = (1 − a) x − b F
        let g = (xv.as_tensor().affine(1.0 - a, 0.0)? - f.affine(b, 0.0)?)?;
        let probe = Tensor::from_vec(self.probes.clone(), self.shape.as_slice(), device)?
            .to_dtype(dtype)?;
        let grads = (g.clone() * &probe)?.sum_all()?.backward()?;
        let gx = grads
            .get(xv.as_tensor())
            .ok_or_else(|| crate::Error::Value("the model's output does not depend on x".into()))?;
        let div = (gx * &probe)?
            .flatten_from(1)?
            .sum(1)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let gv = g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok((gv, div))
    }
}
