"""HF transformers' side of the benny suite bench/vs-hf.bench.js, as a long-lived worker.

GPT2LMHeadModel of GPT-2 small's config with seeded random weights, float32, CPU, in eval
mode under torch.inference_mode(). Reads one command a line on stdin, answers one JSON line on
stdout, so that the suite times HF's calls in the same process run, case after case, as
kvgpt's:

    ping                  -> {"ok": true}   (the pipe's round trip, to subtract by eye)
    prefill N             -> a forward pass over N prompt tokens, a fresh cache, logits of the
                             last position only (logits_to_keep=1, as kvgpt computes them)
    prepare CTX           -> fills a DynamicCache with CTX tokens (outside any timed call)
    step CTX              -> one one-token forward over the prepared cache of CTX tokens + argmax,
                             then crops the cache back to CTX: every call is the same step
    batch B P N           -> `generate` on a batch of B prompts of P random tokens (equal
                             lengths: no padding), N new tokens, greedy, EOS ignored
                             (min_new_tokens), the default (dynamic) cache: issue 11's workload

Each answer carries "ms", the time inside Python, so the suite can report both.
Run by the suite as: $KVGPT_HF_PYTHON bench/hf/hf_worker.py --threads 2
"""

import argparse
import json
import os
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = GPT2Config()
    model = GPT2LMHeadModel(config).eval()
    vocab = config.vocab_size
    ids = lambda n: torch.tensor([[(i * 4099 + 13) % vocab for i in range(n)]])  # noqa: E731
    caches = {}

    def answer(**kw):
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    answer(ready=True, torch=torch.__version__, threads=torch.get_num_threads())
    with torch.inference_mode():
        for line in sys.stdin:
            cmd, *rest = line.split()
            n = int(rest[0]) if rest else 0
            if cmd == "batch":
                b, p_len, new = (int(x) for x in rest)
                g = torch.Generator().manual_seed(b)
                prompts = torch.randint(0, vocab, (b, p_len), generator=g)
            t = time.perf_counter()
            if cmd == "ping":
                pass
            elif cmd == "prefill":
                model(input_ids=ids(n), past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            elif cmd == "prepare":
                cache = DynamicCache()
                model(input_ids=ids(n), past_key_values=cache, use_cache=True, logits_to_keep=1)
                caches[n] = cache
            elif cmd == "batch":
                out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, pad_token_id=50256)
                assert out.shape == (b, p_len + new)
            elif cmd == "step":
                cache = caches[n]
                out = model(input_ids=torch.tensor([[464]]), past_key_values=cache, use_cache=True)
                out.logits[0, -1].argmax().item()
                cache.crop(n)
            else:
                answer(error=f"unknown command {cmd}")
                continue
            answer(ok=True, ms=(time.perf_counter() - t) * 1e3)


if __name__ == "__main__":
    main()
