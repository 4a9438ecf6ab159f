//! Choosing the timesteps a sampler visits.

use crate::error::Result;
use crate::value_error;

/// How a sampler picks `steps` timesteps out of `T` training timesteps.
#[derive(Clone, Debug, PartialEq)]
pub enum Spacing {
    /// diffusers `leading`: `arange(N) · (T // N)` reversed, plus `steps_offset`.
    Leading,
    /// diffusers `trailing`: `round(arange(T, 0, -T/N)) - 1` (ends at T - 1).
    Trailing,
    /// diffusers `linspace`: `round(linspace(0, T - 1, N))` reversed.
    Linspace,
    /// OpenAI's `space_timesteps` string: `"ddim50"` or section counts `"10,15,20"`.
    OpenAi(String),
    /// An explicit strictly descending list.
    Explicit(Vec<i64>),
}

impl Spacing {
    /// Parses `"leading" | "trailing" | "linspace"` or an OpenAI section string.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "linspace" => Ok(Spacing::Linspace),
            s if is_openai_spacing(s) => Ok(Spacing::OpenAi(s.to_string())),
            other => value_error!(
                "unknown spacing {other:?}: expected one of 'leading', 'trailing', 'linspace', an OpenAI string such as 'ddim50' or '10,15,20', or an explicit descending array of timesteps"
            ),
        }
    }

    /// The name used in configs (`Explicit` has none; it is stored as its list).
    pub fn name(&self) -> String {
        match self {
            Spacing::Leading => "leading".into(),
            Spacing::Trailing => "trailing".into(),
            Spacing::Linspace => "linspace".into(),
            Spacing::OpenAi(s) => s.clone(),
            Spacing::Explicit(_) => "explicit".into(),
        }
    }
}

fn is_openai_spacing(s: &str) -> bool {
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = s.strip_prefix("ddim") {
        return digits(rest);
    }
    s.split(',').all(|p| digits(p.trim()))
}

/// numpy's `round` (half to even) of a non-negative-or-negative f64, as i64.
fn round_half_even(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// OpenAI's `space_timesteps(T, section_counts)`: the set of kept timesteps, ascending.
/// `"ddimN"` takes the smallest integer stride i with `len(range(0, T, i)) == N`; otherwise
/// T is split into equal sections (the first `T % k` one longer), each sampled with a
/// fractional stride `(size - 1)/(count - 1)` and Python's rounding.
pub fn space_timesteps(num_train_timesteps: usize, section_counts: &str) -> Result<Vec<i64>> {
    let t_total = num_train_timesteps;
    if let Some(rest) = section_counts.strip_prefix("ddim") {
        let desired: usize = rest.parse().map_err(|_| {
            crate::error::Error::Value(format!(
                "cannot parse {section_counts:?}: expected 'ddim' followed by a step count"
            ))
        })?;
        for stride in 1..t_total.max(2) {
            if t_total.div_ceil(stride) == desired {
                return Ok((0..t_total).step_by(stride).map(|t| t as i64).collect());
            }
        }
        value_error!("cannot create exactly {desired} steps with an integer stride from {t_total} timesteps ({section_counts:?})");
    }
    let counts: Vec<usize> = section_counts
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| {
            crate::error::Error::Value(format!(
                "cannot parse section counts {section_counts:?}: expected comma-separated integers"
            ))
        })?;
    if counts.is_empty() || counts.len() > t_total {
        value_error!("{} sections cannot split {t_total} timesteps", counts.len());
    }
    let size_per = t_total / counts.len();
    let extra = t_total % counts.len();
    let mut start = 0usize;
    let mut all = Vec::new();
    for (i, &count) in counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        if size < count {
            value_error!("cannot take {count} steps from a section of {size} timesteps ({section_counts:?} over {t_total})");
        }
        let stride = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        // Accumulated by repeated addition, as the reference does, so rounding agrees.
        let mut cur = 0.0f64;
        for _ in 0..count {
            all.push(start as i64 + round_half_even(cur));
            cur += stride;
        }
        start += size;
    }
    all.sort_unstable();
    all.dedup();
    Ok(all)
}

/// The descending timesteps a sampler visits. `steps = None` means every training timestep.
/// `steps_offset` applies to `leading` spacing (diffusers). Every returned t is in [0, T):
/// a spacing/offset that would leave that range (diffusers issue #10003) is an error.
pub fn select_timesteps(
    num_train_timesteps: usize,
    steps: Option<usize>,
    spacing: &Spacing,
    steps_offset: i64,
) -> Result<Vec<i64>> {
    let t_total = num_train_timesteps as i64;
    let ts: Vec<i64> = match spacing {
        Spacing::OpenAi(s) => {
            let mut v = space_timesteps(num_train_timesteps, s)?;
            v.reverse();
            v
        }
        Spacing::Explicit(v) => {
            if v.is_empty() {
                value_error!("the explicit timesteps array is empty");
            }
            for w in v.windows(2) {
                if w[0] <= w[1] {
                    value_error!(
                        "explicit timesteps must be strictly descending, got {} then {}",
                        w[0],
                        w[1]
                    );
                }
            }
            v.clone()
        }
        _ => {
            let n = match steps {
                None => return Ok((0..t_total).rev().collect()),
                Some(n) => n,
            };
            if n == 0 {
                value_error!("steps must be at least 1, got 0");
            }
            if n > num_train_timesteps {
                value_error!(
                    "steps ({n}) cannot exceed num_train_timesteps ({num_train_timesteps})"
                );
            }
            match spacing {
                Spacing::Leading => {
                    let ratio = t_total / n as i64;
                    (0..n as i64)
                        .rev()
                        .map(|i| i * ratio + steps_offset)
                        .collect()
                }
                Spacing::Trailing => {
                    let ratio = t_total as f64 / n as f64;
                    (0..n)
                        .map(|i| round_half_even(t_total as f64 - i as f64 * ratio) - 1)
                        .collect()
                }
                Spacing::Linspace => {
                    let last = (t_total - 1) as f64;
                    let step = if n > 1 { last / (n - 1) as f64 } else { 0.0 };
                    (0..n)
                        .rev()
                        .map(|i| {
                            if i == n - 1 {
                                round_half_even(last)
                            } else {
                                round_half_even(i as f64 * step)
                            }
                        })
                        .collect()
                }
                _ => unreachable!("handled above"),
            }
        }
    };
    for &t in &ts {
        if t < 0 || t >= t_total {
            value_error!(
                "spacing {:?} with steps_offset={steps_offset} gives timestep {t}, outside [0, {t_total}) (diffusers issue #10003: leading spacing with steps_offset=1 and steps=T); use fewer steps, steps_offset=0 or 'trailing' spacing",
                spacing.name()
            );
        }
    }
    for w in ts.windows(2) {
        if w[0] <= w[1] {
            value_error!(
                "spacing {:?} gives repeated timestep {} for {} steps; use fewer steps",
                spacing.name(),
                w[1],
                ts.len()
            );
        }
    }
    Ok(ts)
}

/// Betas of the process restricted to the ascending subset τ: β'_i = 1 - ᾱ[τ_i]/ᾱ[τ_{i-1}],
/// with ᾱ[τ_{-1}] = 1 (Nichol & Dhariwal 2021, sec. 4; OpenAI's `SpacedDiffusion`).
pub fn respaced_betas(alphas_cumprod: &[f64], use_timesteps: &[i64]) -> Result<Vec<f64>> {
    if use_timesteps.is_empty() {
        value_error!("cannot respace to an empty set of timesteps");
    }
    let mut last = 1.0;
    let mut prev_t = -1i64;
    let mut betas = Vec::with_capacity(use_timesteps.len());
    for &t in use_timesteps {
        if t <= prev_t || t < 0 || t as usize >= alphas_cumprod.len() {
            value_error!(
                "respacing needs strictly ascending timesteps in [0, {}), got {t} after {prev_t}",
                alphas_cumprod.len()
            );
        }
        let abar = alphas_cumprod[t as usize];
        betas.push(1.0 - abar / last);
        last = abar;
        prev_t = t;
    }
    Ok(betas)
}
