"""HF transformers' reference for the bundled model models/fortunes-gpt2, in the format of the
test fixtures (test/fixtures/README.md), written to test/fixtures/fortunes-gpt2/:

    .venv-train/bin/python scripts/fortunes/make_reference.py

reference.json: for each prompt, `input_ids` (GPT2TokenizerFast over the model's tokenizer.json),
`greedy_new_ids` (40 greedy tokens by a plain argmax loop over the KV cache: EOS is not a stop
and not masked, as kvgpt's ignoreEos), `greedy_step_max_logit`, `loss` and `perplexity`
(labels = input_ids), `greedy_text`. reference.safetensors: `prompt{i}.logits_last`,
`prompt0.logits_all`, `prompt{i}.step0.logits`, `prompt{i}.step39.logits`. The model is loaded
in float32 (its float16 weights widened, as kvgpt does), on the CPU.
"""

import json
import math
import pathlib

import torch
import transformers
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "fortunes-gpt2"
OUT = ROOT / "test" / "fixtures" / "fortunes-gpt2"
PROMPTS = [
    "The secret of life is",
    "A programmer is",
    "Q: Why did the chicken cross the road?\nA:",
    "Never trust a",
    "You will",
]
N_NEW = 40


def main() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(MODEL, dtype=torch.float32).eval()
    tok = GPT2TokenizerFast.from_pretrained(MODEL)
    tensors = {}
    prompts = []
    with torch.inference_mode():
        for i, text in enumerate(PROMPTS):
            ids = tok(text, return_tensors="pt").input_ids
            out = model(ids, labels=ids, use_cache=True)
            tensors[f"prompt{i}.logits_last"] = out.logits[0, -1].contiguous()
            if i == 0:
                tensors["prompt0.logits_all"] = out.logits[0].contiguous()
            past, logits = out.past_key_values, out.logits[:, -1]
            new, maxes = [], []
            for s in range(N_NEW):
                if s == 0:
                    tensors[f"prompt{i}.step0.logits"] = logits[0].contiguous()
                if s == N_NEW - 1:
                    tensors[f"prompt{i}.step{s}.logits"] = logits[0].contiguous()
                maxes.append(logits.max().item())
                nxt = logits.argmax(-1)
                new.append(nxt.item())
                step = model(nxt.view(1, 1), past_key_values=past, use_cache=True)
                past, logits = step.past_key_values, step.logits[:, -1]
            # The same ids without the cache: the whole sequence again at each step.
            seq = ids
            for s in range(N_NEW):
                nxt = model(seq).logits[:, -1].argmax(-1)
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
            assert seq[0, ids.size(1):].tolist() == new, f"prompt {i}: greedy ids differ with the cache on and off"
            loss = out.loss.item()
            prompts.append({
                "prompt": text,
                "input_ids": ids[0].tolist(),
                "greedy_new_ids": new,
                "greedy_step_max_logit": maxes,
                "loss": loss,
                "perplexity": math.exp(loss),
                "greedy_text": tok.decode(ids[0].tolist() + new),
            })
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone() for k, v in tensors.items()}, OUT / "reference.safetensors")
    (OUT / "reference.json").write_text(json.dumps({
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "model": "models/fortunes-gpt2",
        "dtype": "float32",
        "n_new": N_NEW,
        "note": "greedy ids by an argmax loop over the KV cache (EOS neither a stop nor masked), checked against the loop without a cache",
        "prompts": prompts,
    }, indent=1) + "\n")
    for p in prompts:
        print(repr(p["greedy_text"]))


if __name__ == "__main__":
    main()
