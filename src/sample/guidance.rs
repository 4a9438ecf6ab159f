//! Classifier-free guidance (Ho & Salimans 2022) around any denoiser that takes class labels.
//!
//! With guidance scale s (diffusers' convention) the guided prediction is
//! ε̃ = ε_u + s (ε_c − ε_u), which is the paper's (1 + w) ε_c − w ε_u with s = 1 + w: s = 1 is
//! plain conditional sampling, s = 0 unconditional. The conditional and unconditional
//! predictions come from one model call on a doubled batch. A learned-variance output keeps the
//! conditional variance half; only the mean (ε) half is guided. `rescale` = φ > 0 applies the
//! std-ratio rescale of Lin et al. 2023 (eq. 15-16): ε̃ ← φ ε̃ σ(ε_c)/σ(ε̃) + (1 − φ) ε̃.

use super::{model_output_layout, Denoiser, ModelOutput};
use crate::error::Result;
use crate::{shape_error, value_error};

/// A denoiser that takes one class label per row.
pub trait LabeledDenoiser {
    fn predict_labeled(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[i64],
        labels: &[i64],
    ) -> Result<ModelOutput>;

    /// As [`LabeledDenoiser::predict_labeled`] at real-valued timesteps; the default serves
    /// integral ones only.
    fn predict_labeled_continuous(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[f64],
        labels: &[i64],
    ) -> Result<ModelOutput> {
        let ti = super::denoiser::integral_timesteps(t)?;
        self.predict_labeled(x, shape, &ti, labels)
    }
}

/// Guidance settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guidance {
    pub scale: f64,
    pub rescale: f64,
    /// The label of the unconditional rows.
    pub null_label: i64,
}

impl Guidance {
    pub fn new(scale: f64, rescale: f64, null_label: i64) -> Result<Self> {
        if !scale.is_finite() {
            value_error!("guidance_scale must be finite, got {scale}");
        }
        if !(0.0..=1.0).contains(&rescale) {
            value_error!("guidance_rescale must be in [0, 1], got {rescale}");
        }
        Ok(Guidance {
            scale,
            rescale,
            null_label,
        })
    }
}

impl<T: LabeledDenoiser + ?Sized> LabeledDenoiser for Box<T> {
    fn predict_labeled(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[i64],
        labels: &[i64],
    ) -> Result<ModelOutput> {
        (**self).predict_labeled(x, shape, t, labels)
    }
    fn predict_labeled_continuous(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[f64],
        labels: &[i64],
    ) -> Result<ModelOutput> {
        (**self).predict_labeled_continuous(x, shape, t, labels)
    }
}

/// A labelled denoiser with fixed labels and, optionally, classifier-free guidance.
pub struct Conditioned<D: LabeledDenoiser> {
    pub inner: D,
    pub labels: Vec<i64>,
    pub guidance: Option<Guidance>,
}

fn std_of(v: &[f32]) -> f64 {
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&a| a as f64).sum::<f64>() / n;
    (v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
}

/// Combines the conditional rows (first half of `out`) and unconditional rows (second half)
/// into guided rows; `mean_len` elements of each row are guided, the rest copied from the
/// conditional row.
pub fn combine(
    out: &[f32],
    batch: usize,
    out_row: usize,
    mean_len: usize,
    g: &Guidance,
) -> Vec<f32> {
    let (cond, uncond) = out.split_at(batch * out_row);
    let mut result = cond.to_vec();
    let s = g.scale as f32;
    for b in 0..batch {
        let row = &mut result[b * out_row..b * out_row + mean_len];
        let u = &uncond[b * out_row..b * out_row + mean_len];
        for (r, &uj) in row.iter_mut().zip(u) {
            *r = uj + s * (*r - uj);
        }
        if g.rescale > 0.0 {
            let std_cond = std_of(&cond[b * out_row..b * out_row + mean_len]);
            let std_guided = std_of(row);
            if std_guided > 0.0 {
                let factor = (g.rescale * std_cond / std_guided + (1.0 - g.rescale)) as f32;
                row.iter_mut().for_each(|r| *r *= factor);
            }
        }
    }
    result
}

impl<D: LabeledDenoiser> Denoiser for Conditioned<D> {
    fn predict(&mut self, x: &[f32], shape: &[usize], t: &[i64]) -> Result<ModelOutput> {
        self.guided(x, shape, t, |d, x, s, t, y| d.predict_labeled(x, s, t, y))
    }
    fn predict_continuous(&mut self, x: &[f32], shape: &[usize], t: &[f64]) -> Result<ModelOutput> {
        self.guided(x, shape, t, |d, x, s, t, y| {
            d.predict_labeled_continuous(x, s, t, y)
        })
    }
}

impl<D: LabeledDenoiser> Conditioned<D> {
    /// The labelled call, or one call on the doubled batch combined by guidance.
    fn guided<T: Copy>(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[T],
        call: impl Fn(&mut D, &[f32], &[usize], &[T], &[i64]) -> Result<ModelOutput>,
    ) -> Result<ModelOutput> {
        let batch = shape.first().copied().unwrap_or(0);
        if self.labels.len() != batch {
            shape_error!(
                "labels have {} entries but the batch has {batch} rows",
                self.labels.len()
            );
        }
        let g = match self.guidance {
            Some(g) if g.scale != 1.0 => g,
            _ => return call(&mut self.inner, x, shape, t, &self.labels),
        };
        let mut x2 = Vec::with_capacity(2 * x.len());
        x2.extend_from_slice(x);
        x2.extend_from_slice(x);
        let mut t2 = t.to_vec();
        t2.extend_from_slice(t);
        let mut y2 = self.labels.clone();
        y2.extend(std::iter::repeat_n(g.null_label, batch));
        let mut shape2 = shape.to_vec();
        shape2[0] = 2 * batch;
        let out = call(&mut self.inner, &x2, &shape2, &t2, &y2)?;
        let (mean_len, out_row) = model_output_layout(&shape2, &out.shape)?;
        if out.data.len() != 2 * batch * out_row {
            shape_error!(
                "the denoiser returned {} values for shape {:?}",
                out.data.len(),
                out.shape
            );
        }
        let mut out_shape = out.shape.clone();
        out_shape[0] = batch;
        Ok(ModelOutput {
            data: combine(&out.data, batch, out_row, mean_len, &g),
            shape: out_shape,
        })
    }
}

/// ∇_x log f(y | x_t, t) of a classifier, per row, shaped like x.
pub trait GradLogProb {
    fn grad_log_prob(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[i64],
        labels: &[i64],
    ) -> Result<Vec<f32>>;
}

/// Classifier guidance (Dhariwal & Nichol 2021) of an ε-prediction denoiser for a sampler:
/// ε' = ε − k_t s ∇ log f(y | x_t, t), with k_t from [`super::Sampler::classifier_guidance_factor`]
/// (DDIM: the ε form, algorithm 2; DDPM: the mean shift s Σ ∇, algorithm 1). Only the ε half of
/// a learned-variance output is shifted.
/// Where classifier guidance gets its prediction type and ε-shift factor: every discrete
/// [`super::Sampler`], and the σ-space samplers of a discrete model.
pub trait ClassifierFactor {
    fn prediction(&self) -> Option<crate::diffusion::Prediction>;
    fn classifier_guidance_factor(&self, t: i64) -> Result<f64>;
}

impl<S: super::Sampler + ?Sized> ClassifierFactor for S {
    fn prediction(&self) -> Option<crate::diffusion::Prediction> {
        Some(super::Sampler::prediction(self))
    }
    fn classifier_guidance_factor(&self, t: i64) -> Result<f64> {
        super::Sampler::classifier_guidance_factor(self, t)
    }
}

impl ClassifierFactor for super::sigma::SigmaGrid {
    fn prediction(&self) -> Option<crate::diffusion::Prediction> {
        match self.parameterization {
            super::sigma::Parameterization::Discrete(p) => Some(p),
            _ => None,
        }
    }
    /// The ε form: √(1 − ᾱ_t) = σ_t/√(σ_t² + 1).
    fn classifier_guidance_factor(&self, t: i64) -> Result<f64> {
        let logs = &self.log_sigmas;
        if t < 0 || t as usize >= logs.len() {
            value_error!("timestep {t} is outside the schedule's [0, {})", logs.len());
        }
        let sigma = logs[t as usize].exp();
        Ok(sigma / (sigma * sigma + 1.0).sqrt())
    }
}

impl ClassifierFactor for super::ode::SigmaSampler {
    fn prediction(&self) -> Option<crate::diffusion::Prediction> {
        self.grid.prediction()
    }
    fn classifier_guidance_factor(&self, t: i64) -> Result<f64> {
        self.grid.classifier_guidance_factor(t)
    }
}

pub struct ClassifierGuided<'s, D: Denoiser, G: GradLogProb, S: ClassifierFactor + ?Sized> {
    pub inner: D,
    pub classifier: G,
    pub sampler: &'s S,
    pub labels: Vec<i64>,
    pub scale: f64,
}

impl<D: Denoiser, G: GradLogProb, S: ClassifierFactor + ?Sized> Denoiser
    for ClassifierGuided<'_, D, G, S>
{
    fn predict(&mut self, x: &[f32], shape: &[usize], t: &[i64]) -> Result<ModelOutput> {
        if self.sampler.prediction() != Some(crate::diffusion::Prediction::Epsilon) {
            value_error!("classifier guidance shifts the ε-prediction: the sampler must use prediction='epsilon'");
        }
        let batch = shape.first().copied().unwrap_or(0);
        if self.labels.len() != batch {
            shape_error!(
                "labels have {} entries but the batch has {batch} rows",
                self.labels.len()
            );
        }
        let mut out = self.inner.predict(x, shape, t)?;
        let (row, out_row) = model_output_layout(shape, &out.shape)?;
        let grad = self.classifier.grad_log_prob(x, shape, t, &self.labels)?;
        if grad.len() != x.len() {
            shape_error!(
                "the classifier gradient has {} values but x has {}",
                grad.len(),
                x.len()
            );
        }
        for b in 0..batch {
            let k = (self.sampler.classifier_guidance_factor(t[b])? * self.scale) as f32;
            let eps = &mut out.data[b * out_row..b * out_row + row];
            for (e, &g) in eps.iter_mut().zip(&grad[b * row..(b + 1) * row]) {
                *e -= k * g;
            }
        }
        Ok(out)
    }
}

impl<T: Denoiser + ?Sized> Denoiser for Box<T> {
    fn predict(&mut self, x: &[f32], shape: &[usize], t: &[i64]) -> Result<ModelOutput> {
        (**self).predict(x, shape, t)
    }
    fn predict_continuous(&mut self, x: &[f32], shape: &[usize], t: &[f64]) -> Result<ModelOutput> {
        (**self).predict_continuous(x, shape, t)
    }
}

impl<T: GradLogProb + ?Sized> GradLogProb for Box<T> {
    fn grad_log_prob(
        &mut self,
        x: &[f32],
        shape: &[usize],
        t: &[i64],
        labels: &[i64],
    ) -> Result<Vec<f32>> {
        (**self).grad_log_prob(x, shape, t, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ε_c = x + y, ε_u = x - 1 (null label 9): analytic, so every combination is checkable.
    struct Affine {
        calls: usize,
        doubled_variance: bool,
    }

    impl LabeledDenoiser for Affine {
        fn predict_labeled(
            &mut self,
            x: &[f32],
            shape: &[usize],
            _t: &[i64],
            labels: &[i64],
        ) -> Result<ModelOutput> {
            self.calls += 1;
            let row: usize = shape[1..].iter().product();
            let mut data = Vec::new();
            for (b, &y) in labels.iter().enumerate() {
                let xr = &x[b * row..(b + 1) * row];
                let eps: Vec<f32> = xr
                    .iter()
                    .map(|&v| if y == 9 { v - 1.0 } else { v + y as f32 })
                    .collect();
                data.extend(&eps);
                if self.doubled_variance {
                    data.extend(std::iter::repeat_n(y as f32, row));
                }
            }
            let mut s = shape.to_vec();
            if self.doubled_variance {
                s[1] *= 2;
            }
            Ok(ModelOutput { data, shape: s })
        }
    }

    fn run(scale: f64, rescale: f64, variance: bool) -> (ModelOutput, usize) {
        let x = [0.5f32, -1.0, 2.0, 0.0];
        let mut c = Conditioned {
            inner: Affine {
                calls: 0,
                doubled_variance: variance,
            },
            labels: vec![2, 3],
            guidance: Some(Guidance::new(scale, rescale, 9).unwrap()),
        };
        let out = c.predict(&x, &[2, 2], &[5, 5]).unwrap();
        (out, c.inner.calls)
    }

    #[test]
    fn scale_one_is_the_conditional_prediction_in_one_unbatched_call() {
        let (out, calls) = run(1.0, 0.0, false);
        assert_eq!(out.data, vec![2.5, 1.0, 5.0, 3.0]);
        assert_eq!(calls, 1);
    }

    #[test]
    fn guidance_matches_both_conventions_in_one_batched_call() {
        let s = 3.0f32;
        let (out, calls) = run(s as f64, 0.0, false);
        assert_eq!(calls, 1);
        let x = [0.5f32, -1.0, 2.0, 0.0];
        let labels = [2.0f32, 2.0, 3.0, 3.0];
        for i in 0..4 {
            let (c, u) = (x[i] + labels[i], x[i] - 1.0);
            let diffusers = u + s * (c - u);
            let w = s - 1.0; // the paper's (1 + w) ε_c − w ε_u
            let paper = (1.0 + w) * c - w * u;
            assert!((out.data[i] - diffusers).abs() < 1e-6 && (out.data[i] - paper).abs() < 1e-5);
        }
    }

    #[test]
    fn learned_variances_keep_the_conditional_half() {
        let (out, _) = run(4.0, 0.0, true);
        assert_eq!(out.shape, vec![2, 4]);
        assert_eq!(&out.data[2..4], &[2.0, 2.0]);
        assert_eq!(&out.data[6..8], &[3.0, 3.0]);
    }

    #[test]
    fn full_rescale_restores_the_conditional_std() {
        let (out, _) = run(5.0, 1.0, false);
        let (plain, _) = run(1.0, 0.0, false);
        for b in 0..2 {
            let g = std_of(&out.data[2 * b..2 * b + 2]);
            let c = std_of(&plain.data[2 * b..2 * b + 2]);
            assert!((g - c).abs() < 1e-6, "{g} vs {c}");
        }
    }

    #[test]
    fn bad_settings_and_label_counts_are_errors() {
        assert!(Guidance::new(f64::NAN, 0.0, 0).is_err());
        assert!(Guidance::new(2.0, 1.5, 0).is_err());
        let mut c = Conditioned {
            inner: Affine {
                calls: 0,
                doubled_variance: false,
            },
            labels: vec![1],
            guidance: None,
        };
        assert!(c.predict(&[0.0; 4], &[2, 2], &[0, 0]).is_err());
    }
}
