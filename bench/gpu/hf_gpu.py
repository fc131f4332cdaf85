"""HF transformers on the GPU, beside kvgpt in the same call (bench/gpu/run.sh), and the GPU's two
ceilings (METHOD.md): device-to-device copy bandwidth and a large bf16 matrix product.

GPT2LMHeadModel with GPT-2 small's config and seeded random weights, batch 1, greedy.
- decode: per-token latency at contexts 16/256/512/1000, eager with the default (dynamic)
  cache in f32/f16/bf16, and cache_implementation="static" in f16 and f32: from `generate` with
  a prompt of `context` tokens, (time(21 new) - time(1 new)) / 20;
- the article's table on the GPU: L = 10..910 from a 5-token prompt, use_cache on and off (f32
  eager, and f16 static for cache on).
Writes one JSON object to argv[1]. HF_PARTS (default eager,static,article) picks the parts:
issue 12's call (bench/gpu/issue12.sh) takes static alone, in f16, f32 and bf16.
"""

import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

OUT = sys.argv[1] if len(sys.argv) > 1 else "hf-gpu.json"
CONTEXTS = [16, 256, 512, 1000]
LENGTHS = [10, 110, 310, 510, 710, 910]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
dev = torch.device("cuda")


def ceilings():
    n = 1 << 30  # 1 GiB each way, far past the 60 MB L2
    a = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        s.record(); b.copy_(a); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    copy_tbs = 2 * n / statistics.median(times) / 1e12
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
    y = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
    for _ in range(3):
        x @ y
    times = []
    for _ in range(10):
        s.record(); x @ y; e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    tflops = 2 * m**3 / statistics.median(times) / 1e12
    print(f"ceilings: copy {copy_tbs:.2f} TB/s (read + write), bf16 matmul {tflops:.0f} TFLOP/s")
    return {"copyTBs": copy_tbs, "bf16MatmulTflops": tflops}


def model_in(dtype):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).to(dev, DTYPES[dtype]).eval()


def ids(n):
    return torch.tensor([[(i * 4099 + 13) % 50257 for i in range(n)]], device=dev)


def timed_generate(model, prompt, new, **kw):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=50256, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def decode(model, dtype, label, **kw):
    rows = []
    timed_generate(model, ids(8), 20, **kw)  # warm-up
    for ctx in CONTEXTS:
        per = []
        for _ in range(3):
            t1 = timed_generate(model, ids(ctx), 1, **kw)
            t21 = timed_generate(model, ids(ctx), 21, **kw)  # 1000 + 21 fits in 1024 positions
            per.append((t21 - t1) / 20 * 1e3)
        ms = statistics.median(per)
        rows.append({"impl": label, "dtype": dtype, "context": ctx, "perTokenMs": ms})
        print(f"HF {label} {dtype} ctx {ctx}: {ms:.3f} ms/token")
    return rows


def article(model, dtype, label, cache, **kw):
    rows = []
    timed_generate(model, ids(5), 5, use_cache=cache, **kw)
    for L in LENGTHS:
        s = timed_generate(model, ids(5), L - 5, use_cache=cache, **kw)
        rows.append({"impl": label, "dtype": dtype, "cache": cache, "length": L, "seconds": s})
        print(f"HF article {label} {dtype} cache {'on' if cache else 'off'} L={L}: {s:.3f} s ({s / (L - 5) * 1e3:.2f} ms/token)")
    return rows


def main():
    props = torch.cuda.get_device_properties(0)
    result = {"tool": "hf-transformers", "torch": torch.__version__, "transformers": transformers.__version__,
              "gpu": props.name, "sms": props.multi_processor_count, "ceilings": ceilings(),
              "decode": [], "article": []}
    parts = os.environ.get("HF_PARTS", "eager,static,article").split(",")
    for dtype in DTYPES:
        m = model_in(dtype)
        if "eager" in parts:
            result["decode"] += decode(m, dtype, "eager")
        if "static" in parts and (dtype in ("f16", "f32") or parts == ["static"]):
            result["decode"] += decode(m, dtype, "static", cache_implementation="static")
        del m
    if "article" in parts:
        m = model_in("f32")
        result["article"] += article(m, "f32", "eager", True)
        result["article"] += article(m, "f32", "eager", False)
        m = model_in("f16")
        result["article"] += article(m, "f16", "static", True, cache_implementation="static")
    with open(OUT, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
