//! The teacher of a distillation objective: a trained diffusion model of a discrete schedule
//! (a ferrodiff [`Model`] or any external network, e.g. a PyTorch model called from Python),
//! seen in σ space as the denoiser D(x, σ) with x = x0 + σ z (Karras et al. 2022): the model
//! is called on x/√(σ²+1) at the fractional timestep of σ (linear in log σ between trained
//! timesteps), its ε / x0 / v output turned into D, optionally with classifier-free guidance.

use crate::diffusion::Prediction;
use crate::error::Result;
use crate::nn::Model;
use crate::sample::sigma::{schedule_sigmas, sigma_to_t, Parameterization};
use crate::sample::{model_output_layout, ModelOutput};
use crate::schedule::Schedule;
use crate::{shape_error, value_error};

/// A teacher network outside ferrodiff.
pub trait ExternalTeacher: Send + Sync {
    /// The raw output (of the teacher's `prediction` type) for x [B, ...] at the
    /// variance-preserving scale and real-valued timesteps t [B]; `labels` [B] for a
    /// class-conditional teacher, the null class being `num_classes`.
    fn predict(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[f64],
        labels: Option<&[u32]>,
    ) -> Result<ModelOutput>;
}

/// The network of a teacher (built once per trainer, so the size of the model variant does
/// not matter).
#[allow(clippy::large_enum_variant)]
pub enum TeacherNet {
    Model(Model),
    External(Box<dyn ExternalTeacher>),
}

/// A teacher in σ space.
pub struct Teacher {
    pub net: TeacherNet,
    pub prediction: Prediction,
    /// Classifier-free guidance scale s (diffusers' convention: D_u + s (D_c − D_u)).
    pub guidance: Option<f64>,
    /// Classes of a conditional teacher (0: unconditional).
    pub num_classes: usize,
    log_sigmas: Vec<f64>,
}

impl Teacher {
    /// `num_classes` is the student's: a model teacher must have the same.
    pub fn new(
        net: TeacherNet,
        prediction: Prediction,
        guidance: Option<f64>,
        schedule: &Schedule,
        num_classes: usize,
        data_shape: &[usize],
    ) -> Result<Self> {
        if let TeacherNet::Model(m) = &net {
            let c = m.config();
            if c.data_shape() != data_shape {
                shape_error!(
                    "the teacher takes samples of shape {:?} but the data has shape {data_shape:?}",
                    c.data_shape()
                );
            }
            if c.num_classes() != num_classes {
                value_error!(
                    "the teacher has {} classes but the student has {num_classes}: distil a \
                     conditional teacher into a student with the same classes",
                    c.num_classes()
                );
            }
            if c.context_dim() > 0 {
                value_error!("teachers with cross-attention (context_dim > 0) are not supported");
            }
        }
        if let Some(s) = guidance {
            if !s.is_finite() {
                value_error!("the teacher's guidance scale must be finite, got {s}");
            }
            if num_classes == 0 {
                value_error!(
                    "guidance needs a class-conditional teacher and student (num_classes > 0)"
                );
            }
        }
        Ok(Teacher {
            net,
            prediction,
            guidance,
            num_classes,
            log_sigmas: schedule_sigmas(schedule).iter().map(|s| s.ln()).collect(),
        })
    }

    /// The model teacher, if it is one (its weights go into checkpoints).
    pub fn model(&self) -> Option<&Model> {
        match &self.net {
            TeacherNet::Model(m) => Some(m),
            TeacherNet::External(_) => None,
        }
    }

    /// The fractional timestep of σ on the teacher's schedule.
    pub fn timestep_of(&self, sigma: f64) -> f64 {
        sigma_to_t(sigma, &self.log_sigmas)
    }

    fn raw(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[f64],
        labels: Option<&[u32]>,
        w: Option<&[f32]>,
    ) -> Result<ModelOutput> {
        match &mut self.net {
            TeacherNet::Model(m) => {
                let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
                match w {
                    None => m.predict_host_real_t(x, shape, &tf, labels, None, None),
                    Some(w) => {
                        // A teacher that takes the guidance scale as an input (a student of an
                        // earlier round): one pass, w per row.
                        let xt = candle_core::Tensor::from_slice(x, shape, m.device())?;
                        let cond = crate::nn::Cond {
                            labels,
                            guidance: Some(w),
                            ..Default::default()
                        };
                        let y = m.forward_cond(&xt, &tf, &cond, &crate::nn::Ctx::eval())?;
                        Ok(ModelOutput {
                            shape: y.dims().to_vec(),
                            data: y.flatten_all()?.to_vec1::<f32>()?,
                        })
                    }
                }
            }
            TeacherNet::External(e) => e.predict(x, shape, t, labels),
        }
    }

    /// D(x, σ_r) for every row r of x [B, ...] (x = x0 + σ z), with guidance when set.
    pub fn denoise(
        &mut self,
        x: &[f32],
        shape: &[usize],
        sigmas: &[f64],
        labels: Option<&[u32]>,
    ) -> Result<Vec<f32>> {
        let scales = self.guidance.map(|s| vec![s; shape[0]]);
        self.denoise_with(x, shape, sigmas, labels, scales.as_deref())
    }

    /// As [`Teacher::denoise`] with a guidance scale per row (None: unguided).
    pub fn denoise_with(
        &mut self,
        x: &[f32],
        shape: &[usize],
        sigmas: &[f64],
        labels: Option<&[u32]>,
        scales: Option<&[f64]>,
    ) -> Result<Vec<f32>> {
        let b = shape[0];
        let row = x.len() / b.max(1);
        if sigmas.len() != b {
            shape_error!("{} σ levels for a batch of {b}", sigmas.len());
        }
        if self.num_classes > 0 && labels.is_none() {
            value_error!("the teacher is class-conditional: the batch needs labels");
        }
        let p = Parameterization::Discrete(self.prediction);
        let mut input = Vec::with_capacity(x.len());
        for (r, &s) in sigmas.iter().enumerate() {
            let c = p.c_in(s) as f32;
            input.extend(x[r * row..(r + 1) * row].iter().map(|&v| v * c));
        }
        let t: Vec<f64> = sigmas.iter().map(|&s| self.timestep_of(s)).collect();
        let embeds = matches!(&self.net, TeacherNet::Model(m) if m.config().guidance_embed());
        let w_input: Option<Vec<f32>> = embeds.then(|| match scales {
            Some(s) => s.iter().map(|&v| v as f32).collect(),
            None => vec![1.0; b],
        });
        let guided = match (scales, labels) {
            (Some(s), Some(l)) if !embeds && s.iter().any(|&v| v != 1.0) => Some((s, l)),
            _ => None,
        };
        let (out, rows) = match guided {
            None => (self.raw(&input, shape, &t, labels, w_input.as_deref())?, b),
            Some((_, l)) => {
                // One call on the doubled batch: conditional rows, then null-class rows.
                let mut x2 = input.clone();
                x2.extend_from_slice(&input);
                let mut t2 = t.clone();
                t2.extend_from_slice(&t);
                let mut l2 = l.to_vec();
                l2.extend(std::iter::repeat_n(self.num_classes as u32, b));
                let mut sh = shape.to_vec();
                sh[0] = 2 * b;
                (self.raw(&x2, &sh, &t2, Some(&l2), None)?, 2 * b)
            }
        };
        let mut sh = shape.to_vec();
        sh[0] = rows;
        crate::sample::engine::check_output(&out, &sh)?;
        let (_, stride) = model_output_layout(&sh, &out.shape)?;
        let f = |r: usize, j: usize| out.data[r * stride + j];
        let mut d = vec![0f32; x.len()];
        for (r, &s) in sigmas.iter().enumerate() {
            let (a, c) = p.denoised_coefficients(s);
            let (a, c) = (a as f32, c as f32);
            for j in 0..row {
                let xv = x[r * row + j];
                let cond = a * xv + c * f(r, j);
                d[r * row + j] = match guided {
                    None => cond,
                    Some((g, _)) => {
                        let unc = a * xv + c * f(b + r, j);
                        unc + g[r] as f32 * (cond - unc)
                    }
                };
            }
        }
        if let Some(bad) = d.iter().position(|v| !v.is_finite()) {
            value_error!("the teacher returned a non-finite prediction (flat index {bad})");
        }
        Ok(d)
    }
}
