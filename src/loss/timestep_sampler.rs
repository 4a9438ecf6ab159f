//! Importance sampling of the timestep (Nichol & Dhariwal 2021, sec. 3.3): draw t with
//! probability p_t ∝ sqrt(E[L_t²]) over the last losses seen at t, mixed with a little of the
//! uniform distribution, and weight the loss by 1/(T p_t) so its expectation is unchanged.

use crate::error::Result;
use crate::kernels::rng::philox4x32_10;
use crate::value_error;

/// Losses remembered per timestep (Nichol & Dhariwal: 10).
pub const HISTORY_PER_TERM: usize = 10;
/// Share of the uniform distribution mixed into p_t (Nichol & Dhariwal: 0.001).
pub const UNIFORM_PROB: f64 = 0.001;
/// Stream of the timestep draws in the counter-based generator.
const TIMESTEP_STREAM: u64 = u64::MAX - 4;

/// How timesteps are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSampling {
    Uniform,
    /// p_t ∝ sqrt(mean of the last `history` squared losses at t), once every t has them.
    LossSecondMoment,
}

/// A timestep sampler with its loss history.
#[derive(Clone, Debug, PartialEq)]
pub struct TimestepSampler {
    pub kind: TimestepSampling,
    pub num_timesteps: usize,
    pub history: usize,
    pub uniform_prob: f64,
    /// [T, history] ring of the last losses per t, oldest first.
    pub losses: Vec<f64>,
    /// Losses recorded per t, capped at `history`.
    pub counts: Vec<usize>,
    /// Draws made so far: the counter of the next draw, so a restored sampler continues.
    pub draws: u64,
}

impl TimestepSampler {
    pub fn new(
        kind: TimestepSampling,
        num_timesteps: usize,
        history: usize,
        uniform_prob: f64,
    ) -> Result<Self> {
        if num_timesteps == 0 {
            value_error!("num_timesteps must be at least 1, got 0");
        }
        if history == 0 {
            value_error!("history must be at least 1, got 0");
        }
        if !(0.0..=1.0).contains(&uniform_prob) {
            value_error!("uniform_prob must be in [0, 1], got {uniform_prob}");
        }
        Ok(TimestepSampler {
            kind,
            num_timesteps,
            history,
            uniform_prob,
            losses: vec![0.0; num_timesteps * history],
            counts: vec![0; num_timesteps],
            draws: 0,
        })
    }

    /// Whether every timestep has a full history (before that, sampling is uniform).
    pub fn warmed_up(&self) -> bool {
        self.counts.iter().all(|&c| c == self.history)
    }

    /// The sampling distribution p_t.
    pub fn probabilities(&self) -> Vec<f64> {
        let t = self.num_timesteps;
        let uniform = vec![1.0 / t as f64; t];
        if self.kind == TimestepSampling::Uniform || !self.warmed_up() {
            return uniform;
        }
        let mut w: Vec<f64> = (0..t)
            .map(|i| {
                let h = &self.losses[i * self.history..(i + 1) * self.history];
                (h.iter().map(|l| l * l).sum::<f64>() / self.history as f64).sqrt()
            })
            .collect();
        let total: f64 = w.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            return uniform;
        }
        for v in &mut w {
            *v = *v / total * (1.0 - self.uniform_prob) + self.uniform_prob / t as f64;
        }
        w
    }

    /// Draws `batch` timesteps and their weights 1/(T p_t), from `seed` and the draw counter.
    pub fn sample(&mut self, batch: usize, seed: u64) -> (Vec<i64>, Vec<f64>) {
        let p = self.probabilities();
        let mut cdf = Vec::with_capacity(p.len());
        let mut acc = 0.0;
        for v in &p {
            acc += v;
            cdf.push(acc);
        }
        let key = [seed as u32, (seed >> 32) as u32];
        let mut ts = Vec::with_capacity(batch);
        let mut ws = Vec::with_capacity(batch);
        for _ in 0..batch {
            let c = self.draws;
            self.draws += 1;
            let r = philox4x32_10(
                [
                    c as u32,
                    (c >> 32) as u32,
                    TIMESTEP_STREAM as u32,
                    (TIMESTEP_STREAM >> 32) as u32,
                ],
                key,
            );
            // 53-bit uniform in [0, 1), scaled to the CDF's total (≈ 1 up to rounding).
            let u =
                (((r[0] as u64) << 21) ^ ((r[1] as u64) >> 11)) as f64 / (1u64 << 53) as f64 * acc;
            let i = cdf.partition_point(|&v| v <= u).min(p.len() - 1);
            ts.push(i as i64);
            ws.push(1.0 / (self.num_timesteps as f64 * p[i]));
        }
        (ts, ws)
    }

    /// Records observed per-sample losses at their timesteps.
    pub fn update(&mut self, t: &[i64], losses: &[f64]) -> Result<()> {
        if t.len() != losses.len() {
            value_error!("t has {} entries but losses has {}", t.len(), losses.len());
        }
        for (&ti, &l) in t.iter().zip(losses) {
            if ti < 0 || ti as usize >= self.num_timesteps {
                value_error!("timestep {ti} is out of range [0, {})", self.num_timesteps);
            }
            if !l.is_finite() {
                value_error!("loss {l} at timestep {ti} is not finite");
            }
            let i = ti as usize;
            let h = &mut self.losses[i * self.history..(i + 1) * self.history];
            if self.counts[i] == self.history {
                h.rotate_left(1);
                h[self.history - 1] = l;
            } else {
                h[self.counts[i]] = l;
                self.counts[i] += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_until_warmed_up_then_proportional_to_the_rms_loss() {
        let mut s = TimestepSampler::new(TimestepSampling::LossSecondMoment, 4, 2, 0.0).unwrap();
        assert_eq!(s.probabilities(), vec![0.25; 4]);
        s.update(&[0, 1, 2, 3, 0, 1, 2], &[1.0, 1.0, 2.0, 4.0, 1.0, 1.0, 2.0])
            .unwrap();
        assert!(!s.warmed_up());
        s.update(&[3], &[4.0]).unwrap();
        let p = s.probabilities();
        let expect = [1.0 / 8.0, 1.0 / 8.0, 2.0 / 8.0, 4.0 / 8.0];
        for (a, b) in p.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12);
        }
        // The history is a ring: the oldest loss at t = 0 is replaced.
        s.update(&[0], &[3.0]).unwrap();
        let rms0 = ((1.0f64 + 9.0) / 2.0).sqrt();
        assert!((s.probabilities()[0] - rms0 / (rms0 + 1.0 + 2.0 + 4.0)).abs() < 1e-12);
    }

    #[test]
    fn weighted_estimate_is_unbiased_and_draws_follow_p() {
        let t_total = 50;
        let mut s = TimestepSampler::new(
            TimestepSampling::LossSecondMoment,
            t_total,
            10,
            UNIFORM_PROB,
        )
        .unwrap();
        let curve = |t: usize| 0.1 + (t as f64 / 10.0).exp() / 100.0;
        for _ in 0..10 {
            let ts: Vec<i64> = (0..t_total as i64).collect();
            let ls: Vec<f64> = (0..t_total).map(curve).collect();
            s.update(&ts, &ls).unwrap();
        }
        let n = 400_000;
        let (ts, ws) = s.sample(n, 3);
        let est: f64 = ts
            .iter()
            .zip(&ws)
            .map(|(&t, w)| w * curve(t as usize))
            .sum::<f64>()
            / n as f64;
        let truth: f64 = (0..t_total).map(curve).sum::<f64>() / t_total as f64;
        assert!((est - truth).abs() < 0.01 * truth, "{est} vs {truth}");
        // Large losses are drawn more often than small ones.
        let high = ts.iter().filter(|&&t| t >= 40).count() as f64 / n as f64;
        let p = s.probabilities();
        assert!((high - p[40..].iter().sum::<f64>()).abs() < 0.005);
        assert!(high > 0.5);
    }
}
