//! The trainable parameters of a network: named candle `Var`s, initialised from the
//! counter-based generator so a model built with the same seed has the same weights on any
//! machine and thread count, whatever order its layers are built in.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};

use crate::error::Result;
use crate::kernels::rng::{fill_normal, philox4x32_10};
use crate::shape_error;

/// How a parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// U(-bound, bound): PyTorch's default for linear and conv layers uses 1/√fan_in.
    Uniform(f64),
    /// N(0, std²).
    Normal(f64),
}

/// 64-bit FNV-1a of a parameter name: the generator stream of its initial values.
fn name_stream(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `n` uniforms in [0, 1) for (seed, stream): Philox4x32-10 with the element counter in the
/// first two words and the stream in the last two.
pub fn uniforms(seed: u64, stream: u64, n: usize) -> Vec<f32> {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut out = Vec::with_capacity(n);
    let mut block = 0u64;
    while out.len() < n {
        let r = philox4x32_10(
            [
                block as u32,
                (block >> 32) as u32,
                stream as u32,
                (stream >> 32) as u32,
            ],
            key,
        );
        for w in r {
            if out.len() < n {
                // 24 random bits: exactly representable in f32, strictly below 1.
                out.push((w >> 8) as f32 * (1.0 / 16_777_216.0));
            }
        }
        block += 1;
    }
    out
}

fn initial_values(seed: u64, name: &str, n: usize, init: Init) -> Vec<f32> {
    match init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Uniform(bound) => uniforms(seed, name_stream(name), n)
            .into_iter()
            .map(|u| ((2.0 * u as f64 - 1.0) * bound) as f32)
            .collect(),
        Init::Normal(std) => {
            let mut v = vec![0f32; n];
            fill_normal(seed, name_stream(name), 0, &mut v);
            v.iter_mut().for_each(|x| *x = (*x as f64 * std) as f32);
            v
        }
    }
}

/// Named parameters, shared by clones (layers hold the `Var`s themselves).
#[derive(Clone)]
pub struct ParamStore {
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
    seed: u64,
    device: Device,
    dtype: DType,
}

impl ParamStore {
    /// Parameters in `dtype` (f32 normally; f64 for exact gradient checks).
    pub fn new(seed: u64, device: Device, dtype: DType) -> Self {
        ParamStore {
            vars: Arc::new(Mutex::new(BTreeMap::new())),
            seed,
            device,
            dtype,
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn root(&self) -> Path<'_> {
        Path {
            store: self,
            prefix: String::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Var>> {
        // A panic while holding the lock cannot leave the map half-updated (inserts are atomic).
        self.vars.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get_or_init(&self, name: String, shape: &[usize], init: Init) -> Result<Var> {
        let mut vars = self.lock();
        if let Some(v) = vars.get(&name) {
            if v.dims() != shape {
                shape_error!(
                    "parameter {name} exists with shape {:?}, requested {shape:?}",
                    v.dims()
                );
            }
            return Ok(v.clone());
        }
        let n = shape.iter().product();
        let t = Tensor::from_vec(
            initial_values(self.seed, &name, n, init),
            shape,
            &self.device,
        )?
        .to_dtype(self.dtype)?;
        let v = Var::from_tensor(&t)?;
        vars.insert(name, v.clone());
        Ok(v)
    }

    /// The parameters sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn vars(&self) -> Vec<Var> {
        self.lock().values().cloned().collect()
    }

    pub fn num_parameters(&self) -> usize {
        self.lock().values().map(|v| v.elem_count()).sum()
    }

    /// The current values by name (copies that later training does not change).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.lock()
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect()
    }

    /// Overwrites every parameter from `tensors`, which must hold exactly these names and
    /// shapes (a checkpoint of another configuration is an error naming the first mismatch).
    pub fn load(&self, tensors: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        let vars = self.lock();
        for (name, var) in vars.iter() {
            let t = tensors.get(name).ok_or_else(|| {
                crate::Error::Shape(format!(
                    "{what} has no parameter {name}: it was saved from another model configuration"
                ))
            })?;
            if t.dims() != var.dims() {
                shape_error!(
                    "{what}: parameter {name} has shape {:?} but the model expects {:?} \
                     (another model configuration)",
                    t.dims(),
                    var.dims()
                );
            }
        }
        if let Some(extra) = tensors.keys().find(|k| !vars.contains_key(*k)) {
            shape_error!(
                "{what} has parameter {extra}, which this model does not: it was saved from \
                 another model configuration"
            );
        }
        for (name, var) in vars.iter() {
            let t = &tensors[name];
            var.set(&t.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        }
        Ok(())
    }
}

impl ParamStore {
    /// Overwrites the parameters that `tensors` holds (shapes must match) and leaves the others
    /// as they are; returns (this store's names `tensors` lacks, names of `tensors` it lacks).
    pub fn load_matching(
        &self,
        tensors: &HashMap<String, Tensor>,
        what: &str,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let vars = self.lock();
        let mut missing = Vec::new();
        for (name, var) in vars.iter() {
            match tensors.get(name) {
                None => missing.push(name.clone()),
                Some(t) if t.dims() != var.dims() => shape_error!(
                    "{what}: parameter {name} has shape {:?} but the model expects {:?}",
                    t.dims(),
                    var.dims()
                ),
                Some(t) => var.set(&t.to_dtype(self.dtype)?.to_device(&self.device)?)?,
            }
        }
        let mut unexpected: Vec<String> = tensors
            .keys()
            .filter(|k| !vars.contains_key(*k))
            .cloned()
            .collect();
        unexpected.sort();
        Ok((missing, unexpected))
    }
}

/// A name prefix inside a [`ParamStore`], like candle's `VarBuilder::pp`.
pub struct Path<'a> {
    store: &'a ParamStore,
    prefix: String,
}

impl<'a> Path<'a> {
    pub fn pp(&self, name: impl std::fmt::Display) -> Path<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Path {
            store: self.store,
            prefix,
        }
    }

    pub fn var(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let full = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Ok(self
            .store
            .get_or_init(full, shape, init)?
            .as_tensor()
            .clone())
    }

    pub fn device(&self) -> &Device {
        &self.store.device
    }

    pub fn dtype(&self) -> DType {
        self.store.dtype
    }
}
