//! A linear layer, nn.Linear's y = x W^T + b over the rows of a step, with its weight in the
//! dtype chosen at load.

use crate::cpu::matvec::{matvec_cpu, RowPlan};
use crate::cpu::ops::is_cpu_f32;
use crate::cpu::packed::{PackedLinear, Packing};
use crate::error::{Error, Result};
use crate::model::loader::WeightDType;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Tensor;

/// A linear layer with nn.Linear's (out, in) weight. On the CPU, f32 weights go through
/// `matvec` (its kernel for a few rows, gemm with the bias fused for more) and f16/bf16/q8_0
/// through `packed` (f32 activations); elsewhere q8_0 runs candle's quantized matmul and the
/// rest candle's matmul.
pub struct Linear {
    w: Weight,
    b: Option<Tensor>,
}

enum Weight {
    Dense(Tensor),
    /// q8_0 off the CPU (candle's kernels).
    Q8_0(QMatMul),
    /// q8_0, f16 or bf16 on the CPU, with f32 activations; the bias lives inside.
    Packed(PackedLinear),
}

impl Linear {
    /// `w` is (out, in) in f32; it is converted to `dtype` here, once.
    pub fn new(w: Tensor, b: Option<Tensor>, dtype: WeightDType) -> Result<Self> {
        let k = w.dim(1)?;
        if dtype == WeightDType::Q8_0 && k % GgmlDType::Q8_0.block_size() != 0 {
            return Err(Error::WeightsMismatch(format!(
                "q8_0 needs input sizes divisible by {}; this model has a layer with {k} inputs (use f32, f16 or bf16)",
                GgmlDType::Q8_0.block_size()
            )));
        }
        if w.device().is_cpu() {
            let packing = match dtype {
                WeightDType::F32 => None,
                WeightDType::F16 => Some(Packing::F16),
                WeightDType::Bf16 => Some(Packing::Bf16),
                WeightDType::Q8_0 => Some(Packing::Q8_0),
            };
            if let Some(packing) = packing {
                return Ok(Self { w: Weight::Packed(PackedLinear::new(&w, b.as_ref(), packing)?), b: None });
            }
        }
        let act = dtype.activations(w.device());
        let w = match dtype {
            WeightDType::Q8_0 => Weight::Q8_0(QMatMul::from_qtensor(QTensor::quantize(&w.contiguous()?, GgmlDType::Q8_0)?)?),
            _ => Weight::Dense(w.to_dtype(act)?.contiguous()?),
        };
        let b = b.map(|b| b.to_dtype(act)).transpose()?;
        Ok(Self { w, b })
    }

    /// Bytes of weights (and bias) one product reads.
    pub fn bytes(&self) -> usize {
        let b = self.b.as_ref().map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes());
        b + match &self.w {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Q8_0(QMatMul::QTensor(w)) => w.storage_size_in_bytes(),
            Weight::Q8_0(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Packed(w) => w.bytes(),
        }
    }

    /// W (out, in) and the bias, where W is a plain tensor (f32, f16, bf16 off the CPU's packed
    /// forms): what kvgpt's CUDA decode step reads.
    pub fn dense(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        match &self.w {
            Weight::Dense(w) => Some((w, self.b.as_ref())),
            _ => None,
        }
    }

    /// Rows `ids` of a packed W as f32 (N, in): a tied lm_head used as the embedding table.
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        match &self.w {
            Weight::Packed(w) => Ok(w.rows(ids)?),
            _ => Err(Error::InvalidInput("only packed weights give rows as a lookup table".into())),
        }
    }

    /// x (N, in) -> (N, out). On the CPU the rows are grouped by `plan` (see `RowPlan`);
    /// elsewhere it is one product over all rows.
    pub fn forward(&self, x: &Tensor, plan: &RowPlan) -> Result<Tensor> {
        let y = match &self.w {
            Weight::Dense(w) if is_cpu_f32(x) => return Ok(matvec_cpu(x, w, self.b.as_ref(), Some(plan))?),
            Weight::Packed(w) => return Ok(w.forward(x, Some(plan))?),
            // (N, k) @ (k, out): one plain matmul, no broadcast copy of W.
            Weight::Dense(w) => x.contiguous()?.matmul(&w.t()?)?,
            Weight::Q8_0(w) => x.contiguous()?.apply(w)?,
        };
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}
