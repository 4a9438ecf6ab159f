//! The two residual sublayers of a DiT block (Peebles & Xie 2023), each one candle custom op
//! with its own backward:
//!
//!   y = x + gate ⊙ L₂(mid(L₁(LN(x) · (1 + scale) + shift)))
//!
//! where shift, scale and gate are chunks of the block's adaLN-Zero modulation m [B, C·D], and
//! either mid is multi-head self-attention with L₁ the stacked q/k/v projection and L₂ the
//! output projection, or mid is GELU(tanh) with L₁, L₂ the MLP's two layers.
//!
//! Why one op: candle's backward pass materialises the gradient of every intermediate tensor
//! as a zero-filled tensor plus a sum (`GradStore::or_insert`, then `add`), two extra passes
//! over memory per intermediate. A sublayer has four intermediates of [B, N, D] to [B, N, 4D]
//! (the normalised tokens, L₁'s output, mid's output, L₂'s output), which cost a DiT as much as
//! its matrix products. Here they live in the op, kept from the forward pass for the backward
//! (only when a gradient is wanted), and their gradients in plain buffers; the graph sees x, m
//! and the sublayer's four weights packed into one tensor.
//!
//! The pieces are the kernels of [`super::ada_norm`], [`super::linear`], [`super::attention`]
//! and [`super::act`], so the op computes exactly their composition ([`sublayer_composed`],
//! which the tests compare it with, values and gradients, and which other devices and dtypes
//! run). Results are bit-identical for any thread count, as each piece's are.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use num_traits::Float as NumFloat;

use super::act::{gelu_tanh, gelu_tanh_backward, gelu_tanh_values};
use super::ada_norm::{
    gated_backward, gated_forward, gated_residual, modulated_layer_norm, norm_backward,
    norm_forward, Dims as NormDims, NormChunks,
};
use super::attention::{
    token_attention_backward, token_attention_forward, token_self_attention, Float, TokenDims,
};
use super::kernels::{contiguous, msg, use_kernel, Elem};
use super::linear::{self, linear, Dims as LinearDims};

type CResult<T> = candle_core::Result<T>;

/// What sits between the sublayer's two linear maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Middle {
    /// Multi-head self-attention over the tokens: L₁ maps D to 3D (q | k | v).
    Attention { heads: usize },
    /// GELU(tanh): L₁ maps D to the MLP's width.
    Gelu,
}

/// Which chunks of the modulation m the sublayer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunks {
    pub shift: usize,
    pub scale: usize,
    pub gate: usize,
}

/// The sublayer's weights: L₁'s weight as row blocks stacked in order (the q, k and v
/// projections, or the one MLP layer) and its bias likewise, then L₂'s weight and bias.
pub struct Weights<'a> {
    pub w1: &'a [&'a Tensor],
    pub b1: &'a [&'a Tensor],
    pub w2: &'a Tensor,
    pub b2: &'a Tensor,
}

#[derive(Clone, Copy, Debug)]
struct Geometry {
    norm: NormDims,
    chunks: NormChunks,
    gate: usize,
    /// L₁: D -> width; L₂: mid's width -> D.
    l1: LinearDims,
    l2: LinearDims,
    mid: Middle,
}

impl Geometry {
    fn tokens(&self) -> TokenDims {
        let heads = match self.mid {
            Middle::Attention { heads } => heads,
            Middle::Gelu => 1,
        };
        TokenDims {
            b: self.norm.b,
            n: self.norm.n,
            heads,
            hd: self.norm.d / heads,
        }
    }

    fn attention_scale(&self) -> f64 {
        1.0 / (self.tokens().hd as f64).sqrt()
    }

    /// (W₁, b₁, W₂, b₂) of the packed weights.
    fn split<'a, T>(&self, w: &'a [T]) -> [&'a [T]; 4] {
        let (w1, rest) = w.split_at(self.l1.dout * self.l1.din);
        let (b1, rest) = rest.split_at(self.l1.dout);
        let (w2, b2) = rest.split_at(self.l2.dout * self.l2.din);
        [w1, b1, w2, b2]
    }

    fn packed_len(&self) -> usize {
        (self.l1.din + 1) * self.l1.dout + (self.l2.din + 1) * self.l2.dout
    }
}

/// The intermediates the backward pass reads: the modulated norm h, L₁'s output u, mid's
/// output v and L₂'s output f.
struct Saved<T>([Vec<T>; 4]);

fn forward<T: Elem + NumFloat + Float>(
    g: &Geometry,
    x: &[T],
    m: &[T],
    w: &[T],
) -> (Vec<T>, Saved<T>) {
    let [w1, b1, w2, b2] = g.split(w);
    let h = norm_forward(&g.norm, &g.chunks, x, m);
    let u = linear::forward(&g.l1, &h, w1, b1);
    let v = match g.mid {
        Middle::Attention { .. } => token_attention_forward(&g.tokens(), g.attention_scale(), &u),
        Middle::Gelu => gelu_tanh_values(&u),
    };
    let f = linear::forward(&g.l2, &v, w2, b2);
    let y = gated_forward(&g.norm, g.gate, x, m, &f);
    (y, Saved([h, u, v, f]))
}

/// Packed [gx | gm | gw] (gw in the weights' packed layout).
fn backward<T: Elem + NumFloat + Float>(
    g: &Geometry,
    x: &[T],
    m: &[T],
    w: &[T],
    saved: Option<Saved<T>>,
    gy: &[T],
) -> Vec<T> {
    let [w1, _, w2, _] = g.split(w);
    let Saved([h, u, v, f]) = match saved {
        Some(s) => s,
        None => forward(g, x, m, w).1,
    };
    let len = g.norm.len();
    // y = x + gate ⊙ f: [gf | gm] with gm in the gate's chunk.
    let gated = gated_backward(&g.norm, g.gate, m, &f, gy);
    let (gf, gm_gate) = gated.split_at(len);
    let gv = linear::input_grad(&g.l2, gf, w2);
    let gw2 = linear::weight_grad(&g.l2, &v, gf);
    drop(v);
    let gu = match g.mid {
        Middle::Attention { .. } => {
            token_attention_backward(&g.tokens(), g.attention_scale(), &u, &gv)
        }
        Middle::Gelu => gelu_tanh_backward(&u, &gv),
    };
    drop(gv);
    let gh = linear::input_grad(&g.l1, &gu, w1);
    let gw1 = linear::weight_grad(&g.l1, &h, &gu);
    // [gx_norm | gm] with gm in the shift and scale chunks.
    let normed = norm_backward(&g.norm, &g.chunks, x, m, &gh);
    let (gx_norm, gm_norm) = normed.split_at(len);
    let mut out = Vec::with_capacity(len + gm_norm.len() + gw1.len() + gw2.len());
    out.extend(gy.iter().zip(gx_norm).map(|(&a, &b)| a + b));
    out.extend(gm_gate.iter().zip(gm_norm).map(|(&a, &b)| a + b));
    out.extend_from_slice(&gw1);
    out.extend_from_slice(&gw2);
    out
}

/// The forward op (x, m, packed weights) -> y.
struct SublayerOp {
    g: Geometry,
    /// Keep the intermediates for a backward pass (some operand wants a gradient).
    save: bool,
    saved: Mutex<Option<CpuStorageSaved>>,
}

/// [`Saved`] of either element type.
enum CpuStorageSaved {
    F32(Saved<f32>),
    F64(Saved<f64>),
}

/// The backward op (x, m, packed weights) -> [gx | gm | gw], with the output gradient and the
/// forward pass's intermediates carried in the op (a custom op takes at most three operands).
struct SublayerBackward {
    g: Geometry,
    grad: Tensor,
    saved: Mutex<Option<CpuStorageSaved>>,
}

fn operand<'a, T: candle_core::WithDType>((s, l): (&'a CpuStorage, &Layout)) -> CResult<&'a [T]> {
    contiguous(s.as_slice::<T>()?, l)
}

impl CustomOp3 for SublayerOp {
    fn name(&self) -> &'static str {
        "ferrodiff-dit-sublayer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (a, b, c) = ((s1, l1), (s2, l2), (s3, l3));
        let (y, saved) = match s1 {
            CpuStorage::F32(_) => {
                let (y, s) = forward::<f32>(&self.g, operand(a)?, operand(b)?, operand(c)?);
                (f32::storage(y), CpuStorageSaved::F32(s))
            }
            CpuStorage::F64(_) => {
                let (y, s) = forward::<f64>(&self.g, operand(a)?, operand(b)?, operand(c)?);
                (f64::storage(y), CpuStorageSaved::F64(s))
            }
            _ => return Err(msg("dit sublayer: the CPU kernel takes f32 or f64")),
        };
        if self.save {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        }
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        m: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.g;
        let back = SublayerBackward {
            g,
            grad: gy.contiguous()?,
            saved: Mutex::new(self.saved.lock().unwrap_or_else(|e| e.into_inner()).take()),
        };
        let packed = x.apply_op3_no_bwd(m, w, &back)?;
        let (len, nm) = (g.norm.len(), g.norm.modulation());
        let part =
            |track: bool, start: usize, n: usize, like: &Tensor| -> CResult<Option<Tensor>> {
                track
                    .then(|| packed.narrow(0, start, n)?.reshape(like.shape()))
                    .transpose()
            };
        Ok((
            part(x.track_op(), 0, len, x)?,
            part(m.track_op(), len, nm, m)?,
            part(w.track_op(), len + nm, g.packed_len(), w)?,
        ))
    }
}

impl CustomOp3 for SublayerBackward {
    fn name(&self) -> &'static str {
        "ferrodiff-dit-sublayer-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (a, b, c) = ((s1, l1), (s2, l2), (s3, l3));
        // Read under the gradient's storage lock, a shared (read) lock like the ones candle
        // holds on the operands meanwhile; nothing writes to a gradient during the backward.
        let (storage, layout) = self.grad.storage_and_layout();
        let candle_core::Storage::Cpu(gs) = &*storage else {
            return Err(msg("dit sublayer: the output gradient is not on the CPU"));
        };
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let out = match (s1, saved) {
            (CpuStorage::F32(_), saved) => {
                let saved = match saved {
                    Some(CpuStorageSaved::F32(s)) => Some(s),
                    _ => None,
                };
                let gy = operand((gs, layout))?;
                f32::storage(backward(
                    &self.g,
                    operand(a)?,
                    operand(b)?,
                    operand(c)?,
                    saved,
                    gy,
                ))
            }
            (CpuStorage::F64(_), saved) => {
                let saved = match saved {
                    Some(CpuStorageSaved::F64(s)) => Some(s),
                    _ => None,
                };
                let gy = operand((gs, layout))?;
                f64::storage(backward(
                    &self.g,
                    operand(a)?,
                    operand(b)?,
                    operand(c)?,
                    saved,
                    gy,
                ))
            }
            _ => return Err(msg("dit sublayer: the CPU kernel takes f32 or f64")),
        };
        let n = self.g.norm.len() + self.g.norm.modulation() + self.g.packed_len();
        Ok((out, Shape::from(n)))
    }
}

/// L₁'s weight [width, D] and bias [width] from their row blocks.
fn stacked(w1: &[&Tensor], b1: &[&Tensor]) -> CResult<(Tensor, Tensor)> {
    Ok((Tensor::cat(w1, 0)?, Tensor::cat(b1, 0)?))
}

/// The sublayer x [B, N, D] -> [B, N, D] (see the module documentation), m [B, C·D] the
/// modulation with its chunks, `eps` the LayerNorm's ε. Differentiable in x, m and every
/// weight. CPU f32/f64 tensors run the fused op, others [`sublayer_composed`].
pub fn sublayer(
    x: &Tensor,
    m: &Tensor,
    chunks: Chunks,
    weights: &Weights,
    mid: Middle,
    eps: f64,
) -> CResult<Tensor> {
    const WHAT: &str = "dit sublayer";
    let norm = NormDims::new(
        WHAT,
        x.dims(),
        m.dims(),
        &[chunks.shift, chunks.scale, chunks.gate],
    )?;
    let d = norm.d;
    let rows = |ts: &[&Tensor]| -> CResult<usize> {
        let mut n = 0;
        for t in ts {
            n += t.dims().first().copied().unwrap_or(0);
        }
        Ok(n)
    };
    let width = rows(weights.w1)?;
    let mid_width = match mid {
        Middle::Attention { heads } => {
            if heads == 0 || !d.is_multiple_of(heads) || width != 3 * d {
                return Err(msg(format!(
                    "{WHAT}: attention needs L1 to map D = {d} to 3D with D divisible by {heads} heads, got width {width}"
                )));
            }
            d
        }
        Middle::Gelu => width,
    };
    let w1_ok = weights.w1.iter().all(|t| t.rank() == 2 && t.dims()[1] == d);
    if !w1_ok
        || rows(weights.b1)? != width
        || weights.b1.iter().any(|t| t.rank() != 1)
        || weights.w2.dims() != [d, mid_width]
        || weights.b2.dims() != [d]
    {
        return Err(msg(format!(
            "{WHAT}: the weights do not fit D = {d}: L1 {:?} / {:?}, L2 {:?} / {:?}",
            weights
                .w1
                .iter()
                .map(|t| t.dims().to_vec())
                .collect::<Vec<_>>(),
            weights
                .b1
                .iter()
                .map(|t| t.dims().to_vec())
                .collect::<Vec<_>>(),
            weights.w2.dims(),
            weights.b2.dims()
        )));
    }
    if !use_kernel(x) {
        return sublayer_composed(x, m, chunks, weights, mid, eps);
    }
    let rows_n = norm.b * norm.n;
    let g = Geometry {
        norm,
        chunks: NormChunks {
            shift: chunks.shift,
            scale: chunks.scale,
            eps,
        },
        gate: chunks.gate,
        l1: LinearDims {
            n: rows_n,
            din: d,
            dout: width,
        },
        l2: LinearDims {
            n: rows_n,
            din: mid_width,
            dout: d,
        },
        mid,
    };
    let mut parts: Vec<Tensor> = Vec::with_capacity(weights.w1.len() + weights.b1.len() + 2);
    for t in weights.w1 {
        parts.push(t.flatten_all()?);
    }
    parts.extend(weights.b1.iter().map(|t| (*t).clone()));
    parts.push(weights.w2.flatten_all()?);
    parts.push(weights.b2.clone());
    let packed = Tensor::cat(&parts, 0)?;
    let save = x.track_op() || m.track_op() || packed.track_op();
    x.contiguous()?.apply_op3(
        &m.contiguous()?,
        &packed,
        SublayerOp {
            g,
            save,
            saved: Mutex::new(None),
        },
    )
}

/// [`sublayer`] composed from the separate kernels (each of which falls back to candle's ops
/// off the CPU): what the fused op computes, and its tests' reference.
pub fn sublayer_composed(
    x: &Tensor,
    m: &Tensor,
    chunks: Chunks,
    weights: &Weights,
    mid: Middle,
    eps: f64,
) -> CResult<Tensor> {
    let (w1, b1) = stacked(weights.w1, weights.b1)?;
    let h = modulated_layer_norm(x, m, chunks.shift, chunks.scale, eps)?;
    let u = linear(&h, &w1, &b1)?;
    let v = match mid {
        Middle::Attention { heads } => token_self_attention(&u, heads)?,
        Middle::Gelu => gelu_tanh(&u)?,
    };
    let f = linear(&v, weights.w2, weights.b2)?;
    gated_residual(x, m, chunks.gate, &f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{assert_same_for_any_thread_count, filled_scaled as filled, flat};
    use candle_core::{DType, Var};

    /// x [b, n, d], m [b, 6d], and the weights of an attention (width 3d) or MLP (width 3d/2 +
    /// 1) sublayer, all as variables, in `dtype`.
    fn setup(b: usize, n: usize, d: usize, mid: Middle, dtype: DType) -> Vec<Var> {
        let width = match mid {
            Middle::Attention { .. } => 3 * d,
            Middle::Gelu => 3 * d / 2 + 1,
        };
        let mid_width = if width == 3 * d { d } else { width };
        let shapes: Vec<Vec<usize>> = vec![
            vec![b, n, d],
            vec![b, 6 * d],
            vec![width / 3, d],
            vec![width - 2 * (width / 3), d],
            vec![width / 3, d],
            vec![width / 3],
            vec![width - 2 * (width / 3)],
            vec![width / 3],
            vec![d, mid_width],
            vec![d],
        ];
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let amp = if i == 0 { 2.0 } else { 0.4 };
                Var::from_tensor(&filled(s, 3 * i + b + n, dtype, amp)).unwrap()
            })
            .collect()
    }

    const CHUNKS: Chunks = Chunks {
        shift: 3,
        scale: 4,
        gate: 5,
    };

    /// Output and the gradients of Σ probe · f(...) for every variable.
    fn run(
        f: fn(&Tensor, &Tensor, Chunks, &Weights, Middle, f64) -> CResult<Tensor>,
        vars: &[Var],
        mid: Middle,
    ) -> Vec<Tensor> {
        let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let weights = Weights {
            w1: &t[2..5],
            b1: &t[5..8],
            w2: t[8],
            b2: t[9],
        };
        let y = f(t[0], t[1], CHUNKS, &weights, mid, 1e-6).unwrap();
        let probe = filled(y.dims(), 5, y.dtype(), 1.0);
        let grads = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut out = vec![y];
        out.extend(t.iter().map(|v| grads.get(v).unwrap().clone()));
        out
    }

    #[test]
    fn the_fused_sublayer_equals_the_composition_of_the_kernels() {
        for (b, n, d) in [(1, 1, 4), (3, 5, 8), (2, 16, 32), (4, 49, 12)] {
            for mid in [Middle::Attention { heads: 2 }, Middle::Gelu] {
                for dtype in [DType::F64, DType::F32] {
                    let vars = setup(b, n, d, mid, dtype);
                    let fused = run(sublayer, &vars, mid);
                    let composed = run(sublayer_composed, &vars, mid);
                    let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                    for (i, (a, c)) in fused.iter().zip(&composed).enumerate() {
                        assert_eq!(a.dims(), c.dims());
                        let e = crate::nn::test_util::max_rel(a, c, 1e-12);
                        assert!(
                            e < tol,
                            "{b} {n} {d} {mid:?} {dtype:?}: output {i} differs by {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gradients_are_right_without_the_saved_intermediates_and_for_any_thread_count() {
        let mid = Middle::Attention { heads: 2 };
        let vars = setup(5, 20, 16, mid, DType::F32);
        assert_same_for_any_thread_count(|| {
            let ts = run(sublayer, &vars, mid);
            flat::<f32>(&ts.iter().collect::<Vec<_>>())
        });
        // With nothing saved (the op built as for inference), the backward recomputes.
        let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let g = Geometry {
            norm: NormDims::new("t", t[0].dims(), t[1].dims(), &[3, 4, 5]).unwrap(),
            chunks: NormChunks {
                shift: 3,
                scale: 4,
                eps: 1e-6,
            },
            gate: 5,
            l1: LinearDims {
                n: 100,
                din: 16,
                dout: 48,
            },
            l2: LinearDims {
                n: 100,
                din: 16,
                dout: 16,
            },
            mid,
        };
        let packed: Vec<f32> = {
            let mut v = Vec::new();
            for w in &t[2..] {
                v.extend(w.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            v
        };
        let x: Vec<f32> = t[0].flatten_all().unwrap().to_vec1().unwrap();
        let m: Vec<f32> = t[1].flatten_all().unwrap().to_vec1().unwrap();
        let gy = vec![0.5f32; x.len()];
        let (_, saved) = forward(&g, &x, &m, &packed);
        assert_eq!(
            backward(&g, &x, &m, &packed, Some(saved), &gy),
            backward(&g, &x, &m, &packed, None, &gy)
        );
    }

    #[test]
    fn mismatched_weights_are_errors() {
        let vars = setup(2, 3, 8, Middle::Gelu, DType::F32);
        let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let bad = Weights {
            w1: &t[2..5],
            b1: &t[5..7],
            w2: t[8],
            b2: t[9],
        };
        assert!(sublayer(t[0], t[1], CHUNKS, &bad, Middle::Gelu, 1e-6).is_err());
        let good = Weights {
            w1: &t[2..5],
            b1: &t[5..8],
            w2: t[8],
            b2: t[9],
        };
        // 13 wide: not 3D for an attention.
        assert!(sublayer(
            t[0],
            t[1],
            CHUNKS,
            &good,
            Middle::Attention { heads: 2 },
            1e-6
        )
        .is_err());
        let far = Chunks { gate: 6, ..CHUNKS };
        assert!(sublayer(t[0], t[1], far, &good, Middle::Gelu, 1e-6).is_err());
    }
}
