"""HF transformers' batched generation on the GPU, issue 11's workload, beside kvgpt in the same
call (bench/gpu/run.sh): GPT2LMHeadModel with GPT-2 small's config and seeded random weights in
f16, a batch of B prompts of 128 random tokens (no padding needed: equal lengths), 128 new
tokens, greedy, EOS ignored (min_new_tokens), for B = 1, 8, 32, 64, 128, 256, with the
dynamic cache (the default) and cache_implementation="static". Generated tokens/s = B x 128 /
wall time of `generate` (median of 2 after a warm-up). Writes one JSON object to argv[1].
"""

import json
import statistics
import sys
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

OUT = sys.argv[1] if len(sys.argv) > 1 else "hf-throughput.json"
BATCHES = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "1,8,32,64,128,256").split(",")]
PROMPT, NEW = 128, 128
dev = torch.device("cuda")


def prompts(b):
    g = torch.Generator().manual_seed(b)
    return torch.randint(0, 50257, (b, PROMPT), generator=g).to(dev)


def timed(model, ids, new=NEW, **kw):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=50256, **kw)
    torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new
    return time.perf_counter() - t0


def main():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).to(dev, torch.float16).eval()
    result = {"tool": "hf-transformers", "torch": torch.__version__, "transformers": transformers.__version__,
              "gpu": torch.cuda.get_device_properties(0).name, "promptTokens": PROMPT, "newTokens": NEW, "runs": []}
    for label, kw in [("dynamic", {}), ("static", {"cache_implementation": "static"})]:
        for b in BATCHES:
            ids = prompts(b)
            timed(model, ids[:, :16], 8, **kw)  # warm-up at this batch size
            secs = [timed(model, ids, **kw) for _ in range(2)]
            s = statistics.median(secs)
            row = {"cache": label, "batch": b, "seconds": secs, "tokensPerSecond": b * NEW / s}
            result["runs"].append(row)
            print(f"HF {label} cache, batch {b}: {row['tokensPerSecond']:.0f} generated tokens/s ({s:.2f} s)", flush=True)
    with open(OUT, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
