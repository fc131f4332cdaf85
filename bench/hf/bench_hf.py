"""The seed article's experiment with HF transformers, for `kvgpt bench --compare`.

GPT2LMHeadModel of GPT-2 small's config with seeded random weights, float32, CPU, greedy
`generate` from a 5-token prompt forced to total length L (min_new_tokens = max_new_tokens,
no EOS stop), use_cache on and off. Writes the JSON shape of `kvgpt bench` (kvgpt-bench.json).

    pip install -r bench/hf/requirements.txt
    python bench/hf/bench_hf.py --lengths 10,110,310 --threads 2 --out bench-hf.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

ARTICLE_LENGTHS = "10,110,310,510,710,910"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default=ARTICLE_LENGTHS, help="total lengths L, comma-separated")
    p.add_argument("--cache", choices=["on", "off", "both"], default="both")
    p.add_argument("--repetitions", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-tokens", type=int, default=5)
    p.add_argument("--out", default="bench-hf.json")
    return p.parse_args()


def main():
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import psutil
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = GPT2Config()  # GPT-2 small: 12 layers, 12 heads, 768, 1024 positions, vocab 50257
    model = GPT2LMHeadModel(config).eval()
    vocab = config.vocab_size
    prompt = torch.tensor([[(i * 4099 + 13) % vocab for i in range(args.prompt_tokens)]])
    lengths = [int(x) for x in args.lengths.split(",")]
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.cache]
    proc = psutil.Process()
    runs = []
    for cache in modes:
        for length in lengths:
            new = length - args.prompt_tokens
            seconds = []
            for _ in range(args.repetitions):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = model.generate(
                        prompt,
                        attention_mask=torch.ones_like(prompt),
                        do_sample=False,
                        max_new_tokens=new,
                        min_new_tokens=new,
                        use_cache=cache,
                        pad_token_id=config.eos_token_id,
                    )
                seconds.append(time.perf_counter() - t0)
                assert out.shape[1] == length, out.shape
            med = statistics.median_low(seconds)
            rss = proc.memory_info().rss
            runs.append({
                "length": length,
                "cache": cache,
                "newTokens": new,
                "seconds": seconds,
                "medianSeconds": med,
                "msPerToken": med * 1000 / new,
                "lastStepMs": 0,
                "peakRssMB": peak_rss_mb(rss),
                "rssGrowthMB": 0,
                "jsHeapGrowthMB": 0,
                "cacheBytes": 2 * config.n_layer * config.n_embd * length * 4 if cache else 0,
                "cacheBytesFormula": 2 * config.n_layer * config.n_embd * length * 4 if cache else 0,
            })
            print(f"L={length} cache={'on' if cache else 'off'}: {med:.2f} s", file=sys.stderr)
    result = {
        "tool": "hf-transformers",
        "date": datetime.now(timezone.utc).isoformat(),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "memGiB": round(psutil.virtual_memory().total / 2**30),
            "runtime": f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        },
        "model": f"GPT2LMHeadModel, GPT-2 small config, random weights (seed {args.seed})",
        "config": {k: getattr(config, k) for k in ["n_layer", "n_head", "n_embd", "n_positions", "vocab_size"]},
        "device": "cpu",
        "dtype": "f32",
        "threads": args.threads,
        "promptTokens": args.prompt_tokens,
        "runs": runs,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)


def peak_rss_mb(current_rss):
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:
        return current_rss / 2**20


if __name__ == "__main__":
    main()
