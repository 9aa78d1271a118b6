"""Train the bundled default model: a small GPT-2 on the King James Bible, on a CPU.

The whole pipeline, reproducible from a seed:
  1. corpus   - dump the KJV with Debian's `bible` command (package bible-kjv), strip
                the verse references, join verses into one paragraph per chapter;
  2. tokens   - GPT-2's own BPE (vocab.json/merges.txt of --tokenizer), one
                <|endoftext|> after each book; the last 2% of tokens are held out;
  3. training - random windows of n_positions tokens, AdamW, linear warmup then cosine
                decay, gradient clipping, full softmax over the 50257-token vocabulary;
  4. output   - `save_checkpoint` in float16 next to vocab.json/merges.txt, so
                `gptserve` serves it offline; a resumable state goes to --work-dir.

    python scripts/train_default_model.py --steps 1000 --time-budget-min 45 \
        --threads 1 --work-dir runs/default_model

The bundled draft model (speculative decoding's `--speculative-method draft` default) is
the same pipeline with a smaller shape, distilled from the bundled model: its loss is the
KL divergence from the teacher's next-token distribution, so that its greedy token agrees
with the teacher's as often as it can (the acceptance rate of its proposals):

    python scripts/train_default_model.py --n-embd 64 --n-layer 2 --n-head 2 \
        --teacher gptserve/weights/default_model --output gptserve/weights/default_draft \
        --steps 600 --lr 3e-3 --threads 2 --work-dir runs/default_draft
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptserve.config import ModelConfig
from gptserve.model.attention import DenseAttention
from gptserve.model.gpt2 import GPT2
from gptserve.model.tokenizer import Tokenizer
from gptserve.weights.loader import DEFAULT_MODEL_DIR, load_model, save_checkpoint

VERSE = re.compile(r"^(?P<book>\d?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")
ALL_VERSES = "Gen1:1-Rev22:21"


@dataclass
class TrainConfig:
    n_embd: int = 160
    n_layer: int = 6
    n_head: int = 5
    n_positions: int = 512
    batch_size: int = 4  # sequences of n_positions tokens per step
    steps: int = 1000
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_fraction: float = 0.02
    eval_interval: int = 50
    eval_batches: int = 8  # val windows per interim eval; the final eval uses all of val
    seed: int = 1337


# --- 1. corpus -------------------------------------------------------------------------


def bible_version() -> str:
    """The installed bible-kjv-text package version, for the model card."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "bible-kjv-text"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def extract_books() -> list[str]:
    """The KJV as plain prose: one string per book, a paragraph per chapter."""
    # -f turns pretty-printing off: one verse per line, "Ge1:1 In the beginning ..."
    raw = subprocess.run(["bible", "-f", ALL_VERSES], capture_output=True, text=True, check=True).stdout
    books: list[list[list[str]]] = []  # book -> chapter -> verses
    last: tuple[str, str] | None = None
    for line in raw.splitlines():
        m = VERSE.match(line)
        if m is None:
            raise ValueError(f"unexpected line from `bible`: {line[:80]!r}")
        book, chapter = m["book"], m["chapter"]
        if last is None or book != last[0]:
            books.append([])
        if last != (book, chapter):
            books[-1].append([])
        books[-1][-1].append(m["text"].strip())
        last = (book, chapter)
    if len(books) != 66:
        raise ValueError(f"expected 66 books from `bible`, got {len(books)}")
    return ["\n\n".join(" ".join(verses) for verses in chapters) for chapters in books]


# --- 2. tokens -------------------------------------------------------------------------


def tokenize(books: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    """All books as one stream of token ids, each book followed by <|endoftext|>."""
    ids: list[int] = []
    for text in books:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def split(tokens: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = int(len(tokens) * val_fraction)
    return tokens[:-n_val], tokens[-n_val:]


def random_windows(tokens: torch.Tensor, batch_size: int, length: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) inputs and their next-token targets from random offsets."""
    starts = torch.randint(0, len(tokens) - length - 1, (batch_size,), generator=gen)
    rows = torch.stack([tokens[s:s + length + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def consecutive_windows(tokens: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every full non-overlapping window of `length` tokens, (W, T) inputs and targets."""
    n = (len(tokens) - 1) // length
    x = tokens[:n * length].view(n, length)
    y = tokens[1:n * length + 1].view(n, length)
    return x, y


# --- 3. training -----------------------------------------------------------------------


def build_model(tc: TrainConfig) -> GPT2:
    cfg = ModelConfig(vocab_size=50257, n_positions=tc.n_positions, n_embd=tc.n_embd,
                      n_layer=tc.n_layer, n_head=tc.n_head)
    model = GPT2(cfg)
    for name, p in model.named_parameters():  # GPT-2's init
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.dim() == 1:
            continue  # LayerNorm gains stay 1
        elif name.endswith("c_proj.weight"):  # residual projections, scaled by depth
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        else:
            nn.init.normal_(p, std=0.02)
    return model


def batch_logits(model: GPT2, x: torch.Tensor) -> torch.Tensor:
    """Next-token logits of every position of a (B, T) batch: (B*T, V)."""
    b, t = x.shape
    positions = torch.arange(t).repeat(b)
    return model.logits(model(x.flatten(), positions, DenseAttention(batch_size=b)))


def lm_loss(model: GPT2, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a (B, T) batch over the full vocabulary."""
    return F.cross_entropy(batch_logits(model, x), y.flatten())


def distill_loss(model: GPT2, teacher: GPT2, x: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || model) of the next-token distributions of a (B, T) batch."""
    with torch.no_grad():
        target = F.log_softmax(batch_logits(teacher, x), dim=-1)
    return F.kl_div(F.log_softmax(batch_logits(model, x), dim=-1), target, log_target=True,
                    reduction="batchmean")


@torch.no_grad()
def greedy_agreement(model: GPT2, teacher: GPT2, x: torch.Tensor, batch_size: int) -> float:
    """How often model's greedy next token is the teacher's: a draft's acceptance rate."""
    model.eval()
    same = total = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        same += int((batch_logits(model, xb).argmax(-1) == batch_logits(teacher, xb).argmax(-1)).sum())
        total += xb.numel()
    model.train()
    return same / total


@torch.no_grad()
def evaluate(model: GPT2, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        total += lm_loss(model, xb, yb).item() * yb.numel()
        count += yb.numel()
    model.train()
    return total / count


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: GPT2, tc: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases, LayerNorm gains
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def greedy_continuation(model: GPT2, tokenizer: Tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Prefill the prompt, then decode one token at a time with the same KV cache."""
    model.eval()
    ids = tokenizer.encode(prompt)
    attn = DenseAttention(batch_size=1)
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), attn)
    out: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(model.logits(hidden[-1:]).argmax(-1))
        out.append(next_id)
        if attn.length >= model.config.n_positions:
            break
        hidden = model(torch.tensor([next_id]), torch.tensor([attn.length]), attn)
    model.train()
    return tokenizer.decode(out)


def save_state(path: Path, model: GPT2, opt: torch.optim.Optimizer, step: int,
               gen: torch.Generator, elapsed: float, tokens_seen: int, history: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "generator": gen.get_state(), "elapsed": elapsed, "tokens_seen": tokens_seen,
                "history": history}, tmp)
    tmp.replace(path)  # a crash mid-write leaves the previous state intact


def parse_args() -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=DEFAULT_MODEL_DIR,
                   help="model folder to write (default: the bundled one)")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_MODEL_DIR,
                   help="folder with GPT-2's vocab.json and merges.txt; copied into --output")
    p.add_argument("--work-dir", type=Path, default=Path("runs/default_model"),
                   help="resumable training state and metrics.json")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps; sets the LR schedule")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="stop cleanly after this many minutes of training and still save")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--n-positions", type=int, default=d.n_positions)
    p.add_argument("--n-embd", type=int, default=d.n_embd)
    p.add_argument("--n-layer", type=int, default=d.n_layer)
    p.add_argument("--n-head", type=int, default=d.n_head)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--eval-interval", type=int, default=d.eval_interval)
    p.add_argument("--checkpoint-interval", type=int, default=100, help="steps between resumable saves")
    p.add_argument("--resume", action="store_true", help="continue from --work-dir/state.pt")
    p.add_argument("--no-save", action="store_true", help="train and report only (for timing runs)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="distil from this model (a draft model for speculative decoding)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tc = TrainConfig(n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                     n_positions=args.n_positions, batch_size=args.batch_size, steps=args.steps,
                     lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.warmup_steps,
                     eval_interval=args.eval_interval, seed=args.seed)

    tokenizer = Tokenizer.from_folder(args.tokenizer)
    books = extract_books()
    tokens = tokenize(books, tokenizer)
    train_tokens, val_tokens = split(tokens, tc.val_fraction)
    val_x, val_y = consecutive_windows(val_tokens, tc.n_positions)
    print(f"corpus: bible-kjv-text {bible_version()}, {len(books)} books, {sum(map(len, books)):,} chars, "
          f"{len(tokens):,} tokens ({len(train_tokens):,} train, {len(val_tokens):,} val)", flush=True)

    model = build_model(tc)
    teacher = load_model(args.teacher).eval() if args.teacher else None
    opt = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    print(f"model: n_embd={tc.n_embd} n_layer={tc.n_layer} n_head={tc.n_head} "
          f"n_positions={tc.n_positions}, {model.config.num_parameters():,} parameters", flush=True)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.work_dir / "state.pt"
    step, elapsed, tokens_seen, history = 0, 0.0, 0, []
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, elapsed = state["step"], state["elapsed"]
        tokens_seen, history = state["tokens_seen"], state["history"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min, {tokens_seen:,} tokens)", flush=True)

    budget_s = args.time_budget_min * 60 if args.time_budget_min else math.inf
    model.train()
    window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
    while step < tc.steps and elapsed < budget_s:
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = random_windows(train_tokens, tc.batch_size, tc.n_positions, gen)
        loss = distill_loss(model, teacher, x) if teacher is not None else lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        opt.step()
        step += 1
        step_time = time.perf_counter() - t0
        elapsed += step_time
        window_time += step_time
        tokens_seen += y.numel()
        window_loss += loss.item()
        window_steps += 1
        window_tokens += y.numel()

        if step % tc.eval_interval == 0 or step == tc.steps:
            val_loss = evaluate(model, val_x[:tc.eval_batches], val_y[:tc.eval_batches], tc.batch_size)
            train_loss = window_loss / window_steps  # mean over the steps since the last eval
            tok_s = window_tokens / window_time  # training steps only, evals excluded
            history.append({"step": step, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                            "tokens_seen": tokens_seen, "elapsed_s": elapsed})
            if teacher is not None:
                history[-1]["greedy_agreement"] = greedy_agreement(
                    model, teacher, val_x[:tc.eval_batches], tc.batch_size)
            print(f"step {step:5d} | train {train_loss:.3f} | val {val_loss:.3f} | lr {lr:.2e} | "
                  f"gnorm {grad_norm:.2f} | {tok_s:,.0f} tok/s | {tokens_seen:,} tokens | "
                  f"{elapsed / 60:.1f} min" + (f" | agree {history[-1]['greedy_agreement']:.3f}" if teacher else ""),
                  flush=True)
            window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
        if not args.no_save and step % args.checkpoint_interval == 0:
            save_state(state_path, model, opt, step, gen, elapsed, tokens_seen, history)

    stopped = "steps done" if step >= tc.steps else "time budget reached"
    print(f"stopped at step {step}/{tc.steps} ({stopped}), {elapsed / 60:.1f} min of training", flush=True)
    if args.no_save:
        return
    save_state(state_path, model, opt, step, gen, elapsed, tokens_seen, history)

    # --- 4. output: evaluate what is shipped, i.e. the float16 weights -----------------
    save_checkpoint(model, args.output, dtype=torch.float16)
    for name in ("vocab.json", "merges.txt"):
        if not (args.output / name).exists():
            shutil.copyfile(args.tokenizer / name, args.output / name)
    if teacher is not None:  # a draft guesses only tokens it has seen: its LM head can skip the rest
        (args.output / "draft_vocab.json").write_text(json.dumps(
            {"token_ids": sorted(set(tokens.tolist()))}, separators=(",", ":")) + "\n")
    shipped = load_model(args.output)  # fp16 on disk, fp32 in memory
    n_train_eval = len(val_x)  # as many windows as val, from the start of train
    train_x, train_y = consecutive_windows(train_tokens[: n_train_eval * tc.n_positions + 1], tc.n_positions)
    final = {
        "train_loss": evaluate(shipped, train_x, train_y, tc.batch_size),
        "val_loss": evaluate(shipped, val_x, val_y, tc.batch_size),
    }
    if teacher is not None:
        final["greedy_agreement_val"] = greedy_agreement(shipped, teacher, val_x, tc.batch_size)
    samples = {p: greedy_continuation(shipped, tokenizer, p, 60)
               for p in ("And the LORD said unto", "In the beginning", "Blessed are the")}
    size = (args.output / "model.safetensors").stat().st_size
    metrics = {"train_config": asdict(tc), "teacher": str(args.teacher) if teacher is not None else None, "steps_done": step, "stopped": stopped,
               "tokens_seen": tokens_seen, "train_wall_s": elapsed,
               "parameters": shipped.config.num_parameters(), "safetensors_bytes": size,
               "corpus_package": f"bible-kjv-text {bible_version()}", "corpus_tokens": len(tokens),
               "train_tokens": len(train_tokens), "val_tokens": len(val_tokens),
               "final_fp16": final, "samples": samples, "history": history}
    (args.work_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"saved {args.output} ({size / 1e6:.1f} MB); fp16 train loss {final['train_loss']:.3f}, "
          f"val loss {final['val_loss']:.3f}", flush=True)
    for prompt, text in samples.items():
        print(f"--- {prompt!r} -> {text!r}", flush=True)


if __name__ == "__main__":
    main()
