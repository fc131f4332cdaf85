use candle_core::{Device, Tensor};
use std::time::Instant;
fn bench(name: &str, f: impl Fn() -> Tensor) {
    f();
    let n = 10;
    let t = Instant::now();
    for _ in 0..n { std::hint::black_box(f()); }
    println!("{name}: {:.2} ms", t.elapsed().as_secs_f64() * 1e3 / n as f64);
}
fn main() {
    let d = Device::Cpu;
    let h = Tensor::randn(0f32, 1., (1, 512, 3072), &d).unwrap();
    let att = Tensor::randn(0f32, 1., (1, 12, 512, 512), &d).unwrap();
    let mask = Tensor::zeros((512, 512), candle_core::DType::F32, &d).unwrap();
    let x = Tensor::randn(0f32, 1., (1, 512, 768), &d).unwrap();
    let w = Tensor::ones(768, candle_core::DType::F32, &d).unwrap();
    let b = Tensor::zeros(768, candle_core::DType::F32, &d).unwrap();
    let q = Tensor::randn(0f32, 1., (1, 12, 512, 64), &d).unwrap();
    let qkv = Tensor::randn(0f32, 1., (1, 512, 2304), &d).unwrap();
    bench("gelu (1,512,3072)", || h.gelu().unwrap());
    bench("kvgpt gelu", || kvgpt::cpu::ops::gelu_tanh(&h).unwrap());
    let cfg = kvgpt::Gpt2Config::gpt2_small();
    let cache = kvgpt::KvCache::new(&cfg, 512, candle_core::DType::F32, &d).unwrap();
    let qkv2 = qkv.squeeze(0).unwrap();
    let rows = [kvgpt::model::attention::SeqRows { row0: 0, t: 512, pos: 0, cache: &cache }];
    bench("kvgpt attention (12 heads, 512 queries)", || kvgpt::cpu::attention::attend_batch(&qkv2, &rows, 0, 12, 0.125).unwrap());
    bench("candle q k^T, causal softmax, @ v", || {
        let att = kvgpt::model::attention::causal_softmax(&q.matmul(&q.t().unwrap()).unwrap(), 0.125, 0, None).unwrap();
        att.matmul(&q).unwrap()
    });
    bench("softmax (1,12,512,512)", || candle_nn::ops::softmax_last_dim(&att).unwrap());
    bench("mask add", || att.broadcast_add(&mask).unwrap());
    bench("scale mul", || (&att * 0.125).unwrap());
    bench("layer_norm (1,512,768)", || candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap());
    bench("q @ k^T", || q.matmul(&q.t().unwrap()).unwrap());
    bench("att @ v", || att.matmul(&q).unwrap());
    bench("split q contiguous", || qkv.narrow(2, 0, 768).unwrap().reshape((1, 512, 12, 64)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap());
    bench("y transpose back", || q.transpose(1, 2).unwrap().reshape((1, 512, 768)).unwrap());
    bench("residual add", || (&x + &x).unwrap());
    for (name, n_in, n_out) in [("c_attn", 768, 2304), ("attn.c_proj", 768, 768), ("c_fc", 768, 3072), ("mlp.c_proj", 3072, 768)] {
        let w = Tensor::randn(0f32, 0.02, (n_out, n_in), &d).unwrap(); // (out, in) as the model keeps it
        let bias = Tensor::zeros(n_out, candle_core::DType::F32, &d).unwrap();
        let x = Tensor::randn(0f32, 1., (512, n_in), &d).unwrap();
        bench(&format!("{name} x @ W^T (512 rows)"), || x.matmul(&w.t().unwrap()).unwrap());
        bench(&format!("{name} + bias"), || x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap());
        let wt = w.t().unwrap().contiguous().unwrap(); // (in, out): HF Conv1D's layout
        bench(&format!("{name} x @ W (in, out) layout"), || x.matmul(&wt).unwrap());
    }
}
