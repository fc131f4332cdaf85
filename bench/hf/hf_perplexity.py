"""HF transformers' side of bench/vs-hf-perplexity.bench.js: the perplexity of a text file with
the loop of HF's perplexity guide ("Perplexity of fixed-length models"), under
torch.inference_mode(): float32 on the CPU with --threads threads by default; --device cuda and
--dtype float16 for a GPU (bench/gpu/score.sh).

    hf_perplexity.py make-model DIR     GPT-2 small's config with seeded random weights, written
                                        by save_pretrained, plus the GPT-2 tokenizer files
    hf_perplexity.py run DIR FILE --max-length N --stride S
                                        one JSON line: nll (each window's loss weighted by the
                                        labels it averaged over, as kvgpt computes it),
                                        guide_nll (the guide's own weighting), perplexity,
                                        tokens, scored, windows, seconds (tokenizing excluded)
"""

import argparse
import json
import math
import os
import shutil
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["make-model", "run"])
    p.add_argument("dir")
    p.add_argument("file", nargs="?")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.set_num_threads(args.threads)
    if args.cmd == "make-model":
        torch.manual_seed(args.seed)
        GPT2LMHeadModel(GPT2Config()).eval().save_pretrained(args.dir)
        tok = os.path.join(os.path.dirname(__file__), "..", "..", "test", "fixtures", "gpt2-tokenizer")
        for f in ("tokenizer.json", "vocab.json", "merges.txt"):
            shutil.copy(os.path.join(tok, f), args.dir)
        return
    model = GPT2LMHeadModel.from_pretrained(args.dir, dtype=getattr(torch, args.dtype)).eval().to(args.device)
    tokenizer = GPT2TokenizerFast.from_pretrained(args.dir)
    with open(args.file, encoding="utf-8") as f:
        ids = tokenizer(f.read(), return_tensors="pt").input_ids.to(args.device)
    max_length, stride = args.max_length, args.stride or args.max_length
    seq_len = ids.size(1)
    nll_sum, n_tokens, guide_sum, guide_n, windows = 0.0, 0, 0.0, 0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        prev_end_loc = 0
        for begin_loc in range(0, seq_len, stride):
            end_loc = min(begin_loc + max_length, seq_len)
            trg_len = end_loc - prev_end_loc
            input_ids = ids[:, begin_loc:end_loc]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            loss = model(input_ids, labels=target_ids).loss.item()
            guide_n_w = (target_ids != -100).sum().item() - 1
            guide_sum += loss * guide_n_w
            guide_n += guide_n_w
            averaged = (target_ids[:, 1:] != -100).sum().item()
            if averaged > 0:
                windows += 1
                nll_sum += loss * averaged
                n_tokens += averaged
            prev_end_loc = end_loc
            if end_loc == seq_len:
                break
    seconds = time.perf_counter() - t0
    nll = nll_sum / n_tokens
    guide = guide_sum / guide_n if guide_n else float("nan")
    out = dict(device=args.device, dtype=args.dtype, nll=nll, guide_nll=guide if math.isfinite(guide) else None, perplexity=math.exp(nll), tokens=seq_len,
               scored=n_tokens, windows=windows, seconds=seconds, torch=torch.__version__, threads=torch.get_num_threads())
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
