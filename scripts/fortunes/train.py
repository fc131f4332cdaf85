"""Trains kvgpt's bundled demo model, models/fortunes-gpt2: a small GPT-2 (4 layers, n_embd 192,
n_positions 256, a byte-level BPE vocabulary of 4,096 tokens) on the English cookie files of
Debian's `fortunes` package (fortune-mod 1.99.1's data, BSD license), CPU only, fixed seed.

    python3 -m venv .venv-train && .venv-train/bin/pip install -r scripts/fortunes/requirements.txt
    .venv-train/bin/python scripts/fortunes/train.py            # about 25 minutes on 2 cores

It downloads the package with `apt-get download fortunes` (or takes --data DIR, a folder of
cookie files), splits the fortunes (one per `%` line) 95 / 5 into training and held-out sets
with the seed, trains the tokenizer with HF `tokenizers` on the training set, trains the model
with HF transformers' GPT2LMHeadModel (AdamW, warm-up then cosine decay, dropout 0.1, random
128-token windows of the training stream, each fortune followed by <|endoftext|>), and writes
an HF directory: config.json, model.safetensors (float16), tokenizer.json,
tokenizer_config.json, generation_config.json, heldout.txt, train-log.json, loss.png and the
data's copyright file. The model card (README.md there) is written by hand from train-log.json.
"""

import argparse
import json
import math
import os
import pathlib
import random
import shutil
import subprocess
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
EOT = "<|endoftext|>"
# The package's English cookie files; left out: art-by-characters (ascii-art), and the files
# that come from fortunes-zh when installed beside it (chinese, tang300, song100).
SKIP = {"ascii-art", "chinese", "tang300", "song100"}


def fetch_data(cache: pathlib.Path) -> pathlib.Path:
    """The cookie files of Debian's `fortunes` package, downloaded and unpacked once."""
    games = cache / "x" / "usr" / "share" / "games" / "fortunes"
    if games.is_dir():
        return games
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "fortunes"], cwd=cache, check=True)
    deb = next(cache.glob("fortunes_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(cache / "x")], check=True)
    return games


def read_fortunes(games: pathlib.Path) -> list[str]:
    out = []
    for f in sorted(games.iterdir()):
        if f.suffix or f.name in SKIP or not f.is_file():
            continue
        u8 = f.with_name(f.name + ".u8")
        text = (u8 if u8.exists() else f).read_bytes().decode("utf-8", errors="replace")
        for entry in text.split("\n%\n"):
            entry = entry.strip("\n%").rstrip()
            if entry.strip():
                out.append(entry)
    # The same fortune in two files counts once.
    return list(dict.fromkeys(out))


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=pathlib.Path, help="a folder of cookie files (default: Debian's fortunes package)")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "models" / "fortunes-gpt2")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)

    games = args.data or fetch_data(ROOT / ".cache" / "fortunes")
    fortunes = read_fortunes(games)
    rng.shuffle(fortunes)
    n_held = len(fortunes) // 20
    held, train = fortunes[:n_held], fortunes[n_held:]
    print(f"{len(fortunes)} fortunes: {len(train)} to train on, {len(held)} held out", flush=True)

    tok = train_tokenizer(train, 4096)
    eot = tok.token_to_id(EOT)
    stream = []
    for t in train:
        stream.extend(tok.encode(t).ids)
        stream.append(eot)
    held_text = EOT.join(held) + EOT
    held_ids = tok.encode(held_text).ids
    data = torch.tensor(stream, dtype=torch.long)
    held_data = torch.tensor(held_ids, dtype=torch.long)
    print(f"training stream {len(stream)} tokens, held-out {len(held_ids)}", flush=True)

    config = GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=256, n_embd=192, n_layer=4, n_head=6,
        bos_token_id=eot, eos_token_id=eot, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
    )
    model = GPT2LMHeadModel(config)
    params = sum(t.numel() for t in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 100

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        q = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 * args.lr + 0.9 * args.lr * 0.5 * (1 + math.cos(math.pi * q))

    def batch(source: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(source) - args.block - 1, (args.batch,), generator=g)
        return torch.stack([source[s : s + args.block] for s in starts.tolist()])

    @torch.no_grad()
    def held_loss() -> float:
        # Side-by-side windows over the whole held-out stream, as kvgpt perplexity reads it.
        model.eval()
        total, n = 0.0, 0
        for s in range(0, len(held_data) - 1, 256):
            x = held_data[s : s + 256].unsqueeze(0)
            if x.size(1) < 2:
                break
            loss = model(x, labels=x).loss.item()
            total += loss * (x.size(1) - 1)
            n += x.size(1) - 1
        model.train()
        return total / n

    g = torch.Generator().manual_seed(args.seed)
    log = {"steps": [], "train_loss": [], "held_steps": [], "held_loss": []}
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = batch(data, g)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["steps"].append(step)
        log["train_loss"].append(loss.item())
        if step % 100 == 0 or step == args.steps - 1:
            h = held_loss()
            log["held_steps"].append(step)
            log["held_loss"].append(h)
            print(f"step {step}: train {loss.item():.3f}, held-out {h:.3f} (perplexity {math.exp(h):.1f}), {time.perf_counter() - t0:.0f} s", flush=True)
    minutes = (time.perf_counter() - t0) / 60

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.half().save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2TokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
        "add_prefix_space": False, "model_max_length": config.n_positions,
    }, indent=2) + "\n")
    # Sampling defaults that read well for short fortunes.
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": eot, "eos_token_id": eot, "do_sample": True, "temperature": 0.6, "top_k": 40,
        "top_p": 0.95, "repetition_penalty": 1.1, "max_new_tokens": 60,
    }, indent=2) + "\n")
    (out / "heldout.txt").write_text(held_text, encoding="utf-8")
    copyright = games.parent.parent / "doc" / "fortunes" / "copyright"
    if copyright.exists():
        shutil.copy(copyright, out / "DATA-COPYRIGHT")
    log.update({
        "fortunes": len(fortunes), "train_fortunes": len(train), "held_fortunes": len(held), "train_tokens": len(stream),
        "held_tokens": len(held_ids), "parameters": params, "steps_run": args.steps, "batch": args.batch, "block": args.block,
        "lr": args.lr, "seed": args.seed, "threads": args.threads, "minutes": minutes,
        "torch": torch.__version__, "final_held_loss": log["held_loss"][-1],
    })
    (out / "train-log.json").write_text(json.dumps(log) + "\n")
    plot(log, out / "loss.png")
    print(f"wrote {out} ({minutes:.1f} min)", flush=True)


def plot(log: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    k = 20  # the training loss, averaged over 20 steps
    steps, losses = log["steps"], log["train_loss"]
    smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
    ax.plot(steps, smooth, label="training batches (mean of 20 steps)")
    ax.plot(log["held_steps"], log["held_loss"], "o-", label="held-out fortunes")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title("fortunes-gpt2: loss while training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
