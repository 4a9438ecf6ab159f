//! `ferrodiff.likelihood.ode_bits_per_dim`: bits per dimension through the probability-flow
//! ODE, for a ferrodiff model (Hutchinson's divergence by autograd), an analytic mixture (exact
//! divergence) or any callable (Hutchinson by central differences).

use numpy::{IntoPyArray, PyArray1, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::arrays::{batch_of, f32_array};
use super::oracles::PyGaussianMixture;
use super::sampling::{denoiser_for, GuidanceArgs};
use super::schedule::PySchedule;
use crate::kernels::rng::philox4x32_10;
use crate::sample::ode::likelihood::{
    ode_log_likelihood, rademacher, FiniteDifferenceFlow, FlowField, MixtureFlow,
    OdeLikelihoodConfig,
};
use crate::sample::sigma::{
    schedule_sigmas, Parameterization, SigmaGrid, TimestepMode, EDM_SIGMA_DATA, EDM_SIGMA_MAX,
    EDM_SIGMA_MIN,
};

/// Ctrl-C between steps of a solve that runs without the GIL.
fn interrupted(_sigma: f64) -> crate::error::Result<()> {
    Python::attach(|py| py.check_signals()).map_err(super::callback_error)
}

/// `f` without the GIL, on a pool that exists in a forked child too (candle's ops use rayon).
fn released<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    py.detach(|| crate::kernels::in_pool(f))
}

/// Stream of the dequantisation noise.
const DEQUANTIZE_STREAM: u32 = 0xDE0;

/// x0 on 256 levels in [-1, 1] → (k + u)/128 − 1, u ~ U(0, 1) per value (Song et al. 2021's
/// uniform dequantisation).
fn dequantized(x0: &[f32], seed: u64) -> Vec<f64> {
    let key = [seed as u32, (seed >> 32) as u32];
    x0.iter()
        .enumerate()
        .map(|(i, &v)| {
            let k = ((v as f64 + 1.0) * 127.5).round().clamp(0.0, 255.0);
            let r = philox4x32_10(
                [i as u32, (i as u64 >> 32) as u32, DEQUANTIZE_STREAM, 0],
                key,
            );
            let u = (r[0] as f64 + 0.5) / 4_294_967_296.0;
            (k + u) / 128.0 - 1.0
        })
        .collect()
}

/// Bits per dimension of each row of `x0` under the model's probability-flow ODE (Song et al.
/// 2021): log p(x0) = log p_T(x(σ_max)) + ∫ div, integrated from σ_min to σ_max by an adaptive
/// Runge–Kutta 5(4) with `rtol` / `atol`. `model`: a ferrodiff model or trainer (divergence
/// by Hutchinson's estimator through candle's autograd), a `ferrodiff.oracles.GaussianMixture`
/// (its exact denoiser and divergence) or a callable `denoiser(x, t)` (Hutchinson's estimator by
/// central differences of step `delta`). `dequantize=True` treats x0 as 8-bit data in [-1, 1]
/// with uniform dequantisation, as the paper reports bits/dim; otherwise the density of
/// continuous data. The prior at σ_max is N(0, σ_max² + data_variance) (1 for a discrete VP
/// schedule's model, σ_data² for EDM). With `return_info=True` returns `(bpd, info)`, info
/// holding `log_likelihood` (nats per row), `nfe`, `accepted` and `rejected` steps.
#[pyfunction]
#[pyo3(signature = (model, schedule, x0, *, labels=None, prediction="epsilon", sigma_min=None, sigma_max=None, data_variance=None, rtol=1e-5, atol=1e-5, dequantize=false, seed=0, timestep_mode="interpolate", sigma_data=EDM_SIGMA_DATA, delta=1e-3, return_info=false))]
#[allow(clippy::too_many_arguments)]
fn ode_bits_per_dim<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyAny>,
    schedule: Option<PyRef<'py, PySchedule>>,
    x0: &Bound<'py, PyAny>,
    labels: Option<&Bound<'py, PyAny>>,
    prediction: &str,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    data_variance: Option<f64>,
    rtol: f64,
    atol: f64,
    dequantize: bool,
    seed: u64,
    timestep_mode: &str,
    sigma_data: f64,
    delta: f64,
    return_info: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let xa = f32_array(x0, "x0")?;
    let shape = xa.shape().to_vec();
    let batch = batch_of(&shape, "x0")?;
    let xv = xa.readonly().as_slice()?.to_vec();
    if batch == 0 || xv.is_empty() {
        return Err(PyValueError::new_err(
            "x0 must hold at least one non-empty row",
        ));
    }
    if xv.iter().any(|v| !v.is_finite()) {
        return Err(PyValueError::new_err("x0 contains NaN or Inf"));
    }
    if !(delta.is_finite() && delta > 0.0) {
        return Err(PyValueError::new_err(format!(
            "delta must be positive, got {delta}"
        )));
    }
    let dim = xv.len() / batch;
    let x: Vec<f64> = if dequantize {
        if xv.iter().any(|v| !(-1.0..=1.0).contains(v)) {
            return Err(PyValueError::new_err(
                "dequantize=True needs 8-bit data scaled to [-1, 1]",
            ));
        }
        dequantized(&xv, seed)
    } else {
        xv.iter().map(|&v| v as f64).collect()
    };
    let sched = schedule.as_deref().map(|s| &s.inner);
    let mixture = model.cast::<PyGaussianMixture>().ok();
    let param = match (prediction, &mixture) {
        (_, Some(_)) => Parameterization::Denoised,
        ("edm", _) => Parameterization::Edm { sigma_data },
        ("denoised", _) => Parameterization::Denoised,
        (p, _) => Parameterization::Discrete(crate::diffusion::Prediction::parse(p)?),
    };
    let (lo, hi) = match (param, sched) {
        (Parameterization::Discrete(_), Some(s)) => {
            let sig = schedule_sigmas(s);
            (sig[0], sig[sig.len() - 1])
        }
        (Parameterization::Discrete(_), None) => return Err(PyValueError::new_err(
            "a model of a discrete schedule needs its schedule (or prediction='edm' / 'denoised')",
        )),
        _ => (EDM_SIGMA_MIN, EDM_SIGMA_MAX),
    };
    let config = OdeLikelihoodConfig {
        sigma_min: sigma_min.unwrap_or(lo),
        sigma_max: sigma_max.unwrap_or(hi),
        data_variance: data_variance.unwrap_or(match param {
            Parameterization::Edm { sigma_data } => sigma_data * sigma_data,
            _ => 1.0,
        }),
        rtol,
        atol,
    };
    config.check()?;
    let grid_sched = match param {
        Parameterization::Discrete(_) => sched,
        _ => None,
    };
    let grid = SigmaGrid::explicit(
        vec![config.sigma_max, config.sigma_min],
        grid_sched,
        TimestepMode::parse(timestep_mode)?,
        param,
    )?;
    let probes = rademacher(xv.len(), seed);
    let after = |_sigma: f64| -> crate::error::Result<()> {
        py.check_signals().map_err(super::callback_error)
    };
    let (ll, info) = if let Some(m) = mixture {
        let mix = m.get().inner.clone();
        if mix.dim != dim {
            return Err(PyValueError::new_err(format!(
                "the mixture has dimension {} but x0 rows have {dim} values",
                mix.dim
            )));
        }
        let mut flow = MixtureFlow { mixture: &mix };
        released(py, || {
            ode_log_likelihood(&mut flow, &x, batch, &config, interrupted)
        })?
    } else if let Some(m) = super::nn::model_of(model)? {
        m.check_input(&shape)?;
        let classes = m.config().num_classes();
        let labels = labels
            .map(|l| super::nn::labels_arg(l, batch, classes))
            .transpose()?;
        let mut flow = crate::nn::flow::ModelFlow {
            model: &m,
            grid: &grid,
            shape: shape.clone(),
            labels,
            probes,
        };
        released(py, || {
            ode_log_likelihood(
                &mut flow as &mut dyn FlowField,
                &x,
                batch,
                &config,
                interrupted,
            )
        })?
    } else {
        let mut d = denoiser_for(model, labels, None, GuidanceArgs::NONE, batch)?;
        let sh = shape.clone();
        let g = &grid;
        let mut denoise = |xs: &[f32], sigma: f64| g.denoise(d.as_mut(), xs, &sh, sigma);
        let mut flow = FiniteDifferenceFlow {
            denoise: &mut denoise,
            probes,
            delta,
            dim,
        };
        ode_log_likelihood(&mut flow, &x, batch, &config, after)?
    };
    let ln2 = std::f64::consts::LN_2;
    let offset = if dequantize { 128f64.ln() } else { 0.0 };
    let bpd: Vec<f64> = ll
        .iter()
        .map(|l| (-l / dim as f64 + offset) / ln2)
        .collect();
    let bpd = bpd.into_pyarray(py).into_any();
    if !return_info {
        return Ok(bpd);
    }
    let i = PyDict::new(py);
    let llarr: Bound<'py, PyArray1<f64>> = ll.into_pyarray(py);
    i.set_item("log_likelihood", llarr)?;
    i.set_item("nfe", info.nfe)?;
    i.set_item("accepted", info.accepted)?;
    i.set_item("rejected", info.rejected)?;
    Ok((bpd, i).into_pyobject(py)?.into_any())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ode_bits_per_dim, m)?)?;
    Ok(())
}
