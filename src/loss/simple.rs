//! The simple loss of Ho et al. 2020 (eq. 14): the mean squared error between the model's
//! output and its regression target (ε, x0 or v), per sample, optionally weighted per sample
//! (an SNR weighting from `weights`, an importance-sampling correction), with its gradient.

use rayon::prelude::*;

use crate::kernels::{parallel_allowed, PARALLEL_MIN_ELEMENTS};

/// Per-sample weighted mean squared error `w_b · mean_i (o_bi - y_bi)²`, in f64.
///
/// - `model_output`, `target`: f32, batch-first, `row_len` elements per sample.
/// - `weights`: one weight per sample (finite, non-negative); `None` means 1 for every sample.
/// - `grad`: if given, receives the gradient with respect to `model_output` of the **sum over
///   samples** of the returned losses, `w_b · 2 (o_bi - y_bi) / row_len`. A caller who trains on
///   the batch mean divides it by the number of samples.
pub fn simple_loss(
    model_output: &[f32],
    target: &[f32],
    row_len: usize,
    weights: Option<&[f64]>,
    grad: Option<&mut [f32]>,
) -> Result<Vec<f64>, String> {
    if row_len == 0 {
        return Err(
            "row_len must be positive (a sample with no elements has no mean squared error), got 0"
                .to_string(),
        );
    }
    if !model_output.len().is_multiple_of(row_len) {
        return Err(format!(
            "model_output has {} elements, not a multiple of row_len ({row_len})",
            model_output.len()
        ));
    }
    if target.len() != model_output.len() {
        return Err(format!(
            "target has {} elements but model_output has {}",
            target.len(),
            model_output.len()
        ));
    }
    let n_rows = model_output.len() / row_len;
    if let Some(weights) = weights {
        if weights.len() != n_rows {
            return Err(format!(
                "weights has {} values but there are {n_rows} samples (model_output has {} elements, row_len {row_len})",
                weights.len(),
                model_output.len()
            ));
        }
        if let Some(b) = weights.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(format!(
                "weights must be finite and non-negative, got {} for sample {b}",
                weights[b]
            ));
        }
    }
    if let Some(grad) = grad.as_deref() {
        if grad.len() != model_output.len() {
            return Err(format!(
                "grad has {} elements but model_output has {}",
                grad.len(),
                model_output.len()
            ));
        }
    }

    let weight = |b: usize| weights.map_or(1.0, |w| w[b]);
    let rows = model_output.chunks(row_len).zip(target.chunks(row_len));
    let serial = model_output.len() < PARALLEL_MIN_ELEMENTS || !parallel_allowed();
    Ok(match (grad, serial) {
        (Some(grad), true) => rows
            .zip(grad.chunks_mut(row_len))
            .enumerate()
            .map(|(b, ((o, y), g))| row_loss(o, y, weight(b), Some(g)))
            .collect(),
        (None, true) => rows
            .enumerate()
            .map(|(b, (o, y))| row_loss(o, y, weight(b), None))
            .collect(),
        (Some(grad), false) => model_output
            .par_chunks(row_len)
            .zip(target.par_chunks(row_len))
            .zip(grad.par_chunks_mut(row_len))
            .enumerate()
            .map(|(b, ((o, y), g))| row_loss(o, y, weight(b), Some(g)))
            .collect(),
        (None, false) => model_output
            .par_chunks(row_len)
            .zip(target.par_chunks(row_len))
            .enumerate()
            .map(|(b, (o, y))| row_loss(o, y, weight(b), None))
            .collect(),
    })
}

/// Ho et al. 2020, eq. 14, with the mean over dimensions (improved-diffusion's `mean_flat`).
fn row_loss(output: &[f32], target: &[f32], weight: f64, grad: Option<&mut [f32]>) -> f64 {
    let n = output.len() as f64;
    let squared: f64 = output
        .iter()
        .zip(target)
        .map(|(&o, &y)| {
            let d = f64::from(o) - f64::from(y);
            d * d
        })
        .sum();
    if let Some(grad) = grad {
        let scale = 2.0 * weight / n;
        for ((g, &o), &y) in grad.iter_mut().zip(output).zip(target) {
            *g = (scale * (f64::from(o) - f64::from(y))) as f32;
        }
    }
    weight * squared / n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loss of one sample in f64 throughout, for finite differences.
    fn loss_f64(output: &[f64], target: &[f32], weight: f64) -> f64 {
        output
            .iter()
            .zip(target)
            .map(|(&o, &y)| (o - f64::from(y)).powi(2))
            .sum::<f64>()
            * weight
            / output.len() as f64
    }

    #[test]
    fn test_simple_loss_is_weighted_mean_squared_error_per_sample() {
        let output = [1.0f32, 2.0, 3.0, 0.0, 0.0, 0.0];
        let target = [0.0f32, 0.0, 0.0, 1.0, -1.0, 2.0];
        let unweighted = simple_loss(&output, &target, 3, None, None).unwrap();
        assert_eq!(unweighted, vec![14.0 / 3.0, 2.0]);
        let weighted = simple_loss(&output, &target, 3, Some(&[0.5, 3.0]), None).unwrap();
        assert_eq!(weighted, vec![7.0 / 3.0, 6.0]);
    }

    #[test]
    fn test_simple_loss_gradient_matches_central_differences_of_the_sum() {
        let row_len = 5;
        let output: Vec<f32> = (0..15)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let target: Vec<f32> = (0..15).map(|i| ((i * 53 % 7) as f32 - 3.0) / 2.0).collect();
        let weights = [0.25, 1.0, 7.5];
        let mut grad = vec![0f32; 15];
        simple_loss(&output, &target, row_len, Some(&weights), Some(&mut grad)).unwrap();
        let total = |values: &[f64]| -> f64 {
            (0..3)
                .map(|b| {
                    let span = b * row_len..(b + 1) * row_len;
                    loss_f64(&values[span.clone()], &target[span], weights[b])
                })
                .sum()
        };
        let base: Vec<f64> = output.iter().map(|&o| f64::from(o)).collect();
        let h = 1e-4;
        for i in 0..15 {
            let (mut plus, mut minus) = (base.clone(), base.clone());
            plus[i] += h;
            minus[i] -= h;
            let numeric = (total(&plus) - total(&minus)) / (2.0 * h);
            assert!(
                (f64::from(grad[i]) - numeric).abs() <= 1e-6 * numeric.abs().max(1.0),
                "element {i}: analytic {} vs numeric {numeric}",
                grad[i]
            );
        }
    }

    #[test]
    fn test_simple_loss_gradient_without_weights_is_two_diff_over_row_len() {
        let output = [1.0f32, -2.0, 0.5, 0.5];
        let target = [0.0f32, 0.0, 1.0, 0.5];
        let mut grad = [9f32; 4];
        simple_loss(&output, &target, 2, None, Some(&mut grad)).unwrap();
        assert_eq!(grad, [1.0, -2.0, -0.5, 0.0]);
    }

    #[test]
    fn test_simple_loss_parallel_path_matches_per_row_calls() {
        let row_len = 4096;
        let n_rows = 9;
        assert!(row_len * n_rows >= PARALLEL_MIN_ELEMENTS);
        let output: Vec<f32> = (0..row_len * n_rows)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let target: Vec<f32> = (0..row_len * n_rows)
            .map(|i| ((i * 104729) % 997) as f32 / 400.0 - 1.0)
            .collect();
        let weights: Vec<f64> = (0..n_rows).map(|b| 0.5 + b as f64).collect();
        let mut grad = vec![0f32; row_len * n_rows];
        let all = simple_loss(&output, &target, row_len, Some(&weights), Some(&mut grad)).unwrap();
        let no_grad = simple_loss(&output, &target, row_len, Some(&weights), None).unwrap();
        assert_eq!(all, no_grad);
        for b in 0..n_rows {
            let span = b * row_len..(b + 1) * row_len;
            let mut row_grad = vec![0f32; row_len];
            let one = simple_loss(
                &output[span.clone()],
                &target[span.clone()],
                row_len,
                Some(&weights[b..b + 1]),
                Some(&mut row_grad),
            )
            .unwrap();
            assert_eq!(one[0], all[b]);
            assert_eq!(row_grad, grad[span]);
        }
    }

    #[test]
    fn test_simple_loss_empty_batch_is_empty() {
        assert_eq!(
            simple_loss(&[], &[], 3, None, None).unwrap(),
            Vec::<f64>::new()
        );
    }

    #[test]
    fn test_simple_loss_rejects_bad_arguments_by_name() {
        let four = [0f32; 4];
        let err = simple_loss(&four, &four, 0, None, None).unwrap_err();
        assert!(
            err.starts_with("row_len must be positive") && err.ends_with("got 0"),
            "{err}"
        );
        let err = simple_loss(&four, &four, 3, None, None).unwrap_err();
        assert_eq!(
            err,
            "model_output has 4 elements, not a multiple of row_len (3)"
        );
        let err = simple_loss(&four, &[0f32; 2], 2, None, None).unwrap_err();
        assert_eq!(err, "target has 2 elements but model_output has 4");
        let err = simple_loss(&four, &four, 2, Some(&[1.0]), None).unwrap_err();
        assert!(
            err.starts_with("weights has 1 values but there are 2 samples"),
            "{err}"
        );
        let err = simple_loss(&four, &four, 2, Some(&[1.0, f64::NAN]), None).unwrap_err();
        assert_eq!(
            err,
            "weights must be finite and non-negative, got NaN for sample 1"
        );
        let err = simple_loss(&four, &four, 2, Some(&[-1.0, 1.0]), None).unwrap_err();
        assert!(err.contains("got -1 for sample 0"), "{err}");
        let mut short = [0f32; 3];
        let err = simple_loss(&four, &four, 2, None, Some(&mut short)).unwrap_err();
        assert_eq!(err, "grad has 3 elements but model_output has 4");
    }
}
