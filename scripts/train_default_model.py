"""Train the bundled default model: a small GPT-2 on public-domain prose and API tasks.

The whole pipeline, reproducible from a seed (the data: scripts/default_model_data.py):
  1. corpus   - the King James Bible (`bible -f`, Debian's bible-kjv) and The Devil's
                Dictionary (Debian's dict-devil), written to --corpus-dir once; a machine
                without the packages trains from a copy of that folder;
  2. tokens   - GPT-2's own BPE. Prose: every book followed by <|endoftext|>, the last 2%
                of the Bible's tokens (the end of Revelation) held out. Tasks (chat, Bible
                questions, JSON, tools, agent-length prompts): examples rendered with the
                server's default chat template, answer and <|endoftext|> after the prompt,
                --task-tokens of each from the training generators and a held-out set from
                the evaluation generators (values never used in training);
  3. training - each row of a batch is a random window of n_positions tokens from one
                stream, the stream drawn by MIX; AdamW, linear warmup then cosine decay,
                gradient clipping, residual dropout, full softmax over the 50257 tokens;
                bfloat16 autocast on a GPU, float32 on the CPU;
  4. output   - `save_checkpoint` in float16 next to vocab.json/merges.txt, so `gptserve`
                serves it offline; a resumable state and metrics.json go to --work-dir.

On a CPU (the 3-hour budget):
    python scripts/train_default_model.py --time-budget-min 170 --threads 2 --work-dir runs/default_model
On one GPU (the 10-minute budget):
    python scripts/train_default_model.py --device cuda --batch-size 32 --steps 4000 \
        --time-budget-min 6.5 --corpus-dir runs/corpus --work-dir runs/default_model

The bundled draft model (speculative decoding's `--speculative-method draft` default) is
the same pipeline with a smaller shape, distilled from the bundled model: its loss is the
KL divergence from the teacher's next-token distribution, so that its greedy token agrees
with the teacher's as often as it can (the acceptance rate of its proposals):

    python scripts/train_default_model.py --n-embd 64 --n-layer 2 --n-head 2 \
        --teacher gptserve/weights/default_model --output gptserve/weights/default_draft \
        --steps 600 --lr 3e-3 --work-dir runs/default_draft
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import default_model_data as data  # noqa: E402

from gptserve.config import ModelConfig  # noqa: E402
from gptserve.model.attention import DenseAttention  # noqa: E402
from gptserve.model.gpt2 import GPT2  # noqa: E402
from gptserve.model.tokenizer import Tokenizer  # noqa: E402
from gptserve.weights.loader import DEFAULT_MODEL_DIR, load_model, save_checkpoint  # noqa: E402

# share of the batch rows drawn from each stream
MIX = {"prose": 0.1, "chat": 0.16, "qa": 0.14, "json": 0.2, "tools": 0.2, "agent": 0.2}
OLD_VAL_WINDOW = 512  # the previous model's context: its held-out loss was measured on these windows


@dataclass
class TrainConfig:
    n_embd: int = 320
    n_layer: int = 8
    n_head: int = 5
    n_positions: int = 1024
    batch_size: int = 4  # rows of n_positions tokens per step
    steps: int = 3000
    lr: float = 1.5e-3
    min_lr: float = 1.5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.1
    val_fraction: float = 0.02
    task_tokens: int = 4_000_000  # training tokens generated per task
    eval_interval: int = 100
    eval_batches: int = 8  # val windows per stream per interim eval
    seed: int = 1337


# --- 1-2. corpus and tokens ----------------------------------------------------------------


def prose_tokens(corpus_dir: Path, tokenizer: Tokenizer, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token streams of the prose. val is the previous model's held-out split
    (the last 2% of the Bible); The Devil's Dictionary all goes to train."""
    bible: list[int] = []
    for text in data.bible_books(data.read_verses(corpus_dir)):
        bible.extend(tokenizer.encode(text))
        bible.append(tokenizer.eos_token_id)
    n_val = int(len(bible) * val_fraction)
    devil: list[int] = []
    for word, definition in data.devil_entries(corpus_dir):
        devil.extend(tokenizer.encode(f"{word.capitalize()}: {definition}\n"))
    devil.append(tokenizer.eos_token_id)
    return np.array(bible[:-n_val] + devil, dtype=np.uint16), np.array(bible[-n_val:], dtype=np.uint16)


def _task_chunk(args: tuple) -> np.ndarray:
    """One worker's share of a task stream: examples until `tokens` tokens."""
    corpus_dir, tokenizer_dir, split, seed, task, tokens = args
    from gptserve.server.chat_template import ChatTemplate

    tokenizer = Tokenizer.from_folder(tokenizer_dir)
    template = ChatTemplate.load(None, data.ENDOFTEXT, data.ENDOFTEXT)
    gen = data.Generator(corpus_dir, split, seed)
    ids: list[int] = []
    while len(ids) < tokens:
        prompt, answer = data.render(template, gen.example(task))
        ids.extend(tokenizer.encode(prompt + answer))
        ids.append(tokenizer.eos_token_id)
    return np.array(ids, dtype=np.uint16)


def task_tokens(corpus_dir: Path, tokenizer_dir: Path, split: str, tokens: int, seed: int,
                workers: int) -> dict[str, np.ndarray]:
    """Each task's token stream for `split`, made by `workers` processes with their own seeds."""
    per = math.ceil(tokens / workers)
    jobs = [(corpus_dir, tokenizer_dir, split, seed * 1000 + w, task, per) for task in data.TASKS for w in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        chunks = list(pool.map(_task_chunk, jobs))
    return {task: np.concatenate(chunks[i * workers:(i + 1) * workers]) for i, task in enumerate(data.TASKS)}


def random_windows(stream: np.ndarray, rows: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, length + 1) windows from random offsets of one stream."""
    starts = torch.randint(0, len(stream) - length - 1, (rows,), generator=gen).tolist()
    return torch.from_numpy(np.stack([stream[s:s + length + 1] for s in starts]).astype(np.int64))


def mixed_batch(streams: dict[str, np.ndarray], rows: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """A batch whose rows come from the streams in MIX's proportions."""
    names = list(MIX)
    picks = torch.multinomial(torch.tensor([MIX[n] for n in names]), rows, replacement=True, generator=gen)
    parts = [random_windows(streams[n], int((picks == i).sum()), length, gen)
             for i, n in enumerate(names) if (picks == i).any()]
    return torch.cat(parts)


def consecutive_windows(stream: np.ndarray, length: int, limit: int | None = None) -> torch.Tensor:
    """Every full non-overlapping window of `length` tokens (+1 for the targets), (W, length + 1)."""
    n = (len(stream) - 1) // length
    if limit is not None:
        n = min(n, limit)
    t = torch.from_numpy(stream[:n * length + 1].astype(np.int64))
    return torch.stack([t[i * length:(i + 1) * length + 1] for i in range(n)])


# --- 3. training -------------------------------------------------------------------------


class CausalAttention:
    """Attention over whole (B, T) windows for training: SDPA, causal (flash on a GPU)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        n, h, d = q.shape
        b = self.batch_size
        q, k, v = (x.view(b, n // b, h, d).transpose(1, 2) for x in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return y.transpose(1, 2).reshape(n, h, d)


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


def add_dropout(model: GPT2, p: float) -> None:
    """GPT-2's residual dropout: on each attention and MLP output, in training mode only.
    Hooks, so the served model class stays inference-only."""
    if p <= 0:
        return
    for block in model.h:
        for module in (block.attn, block.mlp):
            module.register_forward_hook(lambda mod, args, out: F.dropout(out, p, mod.training))


def batch_logits(model: GPT2, x: torch.Tensor) -> torch.Tensor:
    """Next-token logits of every position of a (B, T) batch: (B*T, V)."""
    b, t = x.shape
    positions = torch.arange(t, device=x.device).repeat(b)
    return model.logits(model(x.flatten(), positions, CausalAttention(b)))


def lm_loss(model: GPT2, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of (B, T+1) rows over the full vocabulary."""
    return F.cross_entropy(batch_logits(model, rows[:, :-1]).float(), rows[:, 1:].flatten())


def distill_loss(model: GPT2, teacher: GPT2, rows: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || model) of the next-token distributions of (B, T+1) rows."""
    x = rows[:, :-1]
    with torch.no_grad():
        target = F.log_softmax(batch_logits(teacher, x).float(), dim=-1)
    return F.kl_div(F.log_softmax(batch_logits(model, x).float(), dim=-1), target, log_target=True,
                    reduction="batchmean")


@torch.no_grad()
def greedy_agreement(model: GPT2, teacher: GPT2, rows: torch.Tensor, batch_size: int, amp) -> float:
    """How often model's greedy next token is the teacher's: a draft's acceptance rate."""
    model.eval()
    same = total = 0
    for i in range(0, len(rows), batch_size):
        x = rows[i:i + batch_size, :-1]
        with amp():
            same += int((batch_logits(model, x).argmax(-1) == batch_logits(teacher, x).argmax(-1)).sum())
        total += x.numel()
    model.train()
    return same / total


@torch.no_grad()
def evaluate(model: GPT2, rows: torch.Tensor, batch_size: int, amp) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        with amp():
            total += lm_loss(model, batch).item() * (batch.numel() - len(batch))
        count += batch.numel() - len(batch)
    model.train()
    return total / count


def lr_at(step: int, tc: TrainConfig, time_progress: float = 0.0) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step, or at the end of
    the time budget where that comes first (`time_progress`: the share of it spent)."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = max((step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps), time_progress)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: GPT2, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases, LayerNorm gains
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


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
        if next_id == tokenizer.eos_token_id or attn.length >= model.config.n_positions:
            break
        out.append(next_id)
        hidden = model(torch.tensor([next_id]), torch.tensor([attn.length]), attn)
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
    p.add_argument("--corpus-dir", type=Path, default=None,
                   help="kjv.txt and devil.txt; written from the Debian packages when absent "
                        "(default: WORK_DIR/corpus)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/default_model"),
                   help="resumable training state and metrics.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps; sets the LR schedule")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="stop cleanly after this many minutes of training and still save")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--workers", type=int, default=2, help="processes that generate the task data")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--n-positions", type=int, default=d.n_positions,
                   help="context, and training window; with --init the window only (at most the model's context)")
    p.add_argument("--n-embd", type=int, default=d.n_embd)
    p.add_argument("--n-layer", type=int, default=d.n_layer)
    p.add_argument("--n-head", type=int, default=d.n_head)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--task-tokens", type=int, default=d.task_tokens, help="training tokens generated per task")
    p.add_argument("--eval-interval", type=int, default=d.eval_interval)
    p.add_argument("--checkpoint-interval", type=int, default=200, help="steps between resumable saves")
    p.add_argument("--resume", action="store_true", help="continue from --work-dir/state.pt")
    p.add_argument("--no-save", action="store_true", help="train and report only (for timing runs)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this model folder's weights (fine-tuning) instead of GPT-2's init")
    p.add_argument("--teacher", type=Path, default=None,
                   help="distil from this model (a draft model for speculative decoding)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    tc = TrainConfig(n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                     n_positions=args.n_positions, batch_size=args.batch_size, steps=args.steps,
                     lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.warmup_steps, dropout=args.dropout,
                     task_tokens=args.task_tokens, eval_interval=args.eval_interval, seed=args.seed)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext

    t_data = time.perf_counter()
    corpus_dir = args.corpus_dir or args.work_dir / "corpus"
    if not (corpus_dir / "kjv.txt").exists():
        data.extract_corpus(corpus_dir)
    tokenizer = Tokenizer.from_folder(args.tokenizer)
    prose_train, prose_val = prose_tokens(corpus_dir, tokenizer, tc.val_fraction)
    train = {"prose": prose_train, **task_tokens(corpus_dir, args.tokenizer, "train", tc.task_tokens, tc.seed,
                                                  args.workers)}
    held = task_tokens(corpus_dir, args.tokenizer, "eval", max(tc.task_tokens // 50, 50_000), tc.seed, args.workers)
    val = {"prose": consecutive_windows(prose_val, OLD_VAL_WINDOW),  # the previous model's held-out windows
           **{task: consecutive_windows(s, tc.n_positions, limit=16) for task, s in held.items()}}
    print(f"data ({time.perf_counter() - t_data:.0f} s): "
          + ", ".join(f"{k} {len(v):,}" for k, v in train.items()) + " training tokens; held out: prose "
          f"{len(prose_val):,} tokens, " + ", ".join(f"{k} {len(v)} windows" for k, v in val.items() if k != "prose"),
          flush=True)

    if args.init is not None:  # fine-tune: start from a saved model's weights, its shape
        model = load_model(args.init).float()
        tc.n_embd, tc.n_layer, tc.n_head = model.config.n_embd, model.config.n_layer, model.config.n_head
        model = model.to(device)
    else:
        model = build_model(tc).to(device)
    add_dropout(model, tc.dropout)
    teacher = load_model(args.teacher).to(device).eval() if args.teacher else None
    opt = make_optimizer(model, tc, device)
    gen = torch.Generator().manual_seed(tc.seed)
    print(f"model: n_embd={tc.n_embd} n_layer={tc.n_layer} n_head={tc.n_head} n_positions={tc.n_positions}, "
          f"{model.config.num_parameters():,} parameters, on {device}", flush=True)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.work_dir / "state.pt"
    step, elapsed, tokens_seen, history = 0, 0.0, 0, []
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, elapsed = state["step"], state["elapsed"]
        tokens_seen, history = state["tokens_seen"], state["history"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min, {tokens_seen:,} tokens)", flush=True)

    def interim_losses() -> dict[str, float]:
        return {name: evaluate(model, rows[:tc.eval_batches].to(device), tc.batch_size, amp)
                for name, rows in val.items()}

    budget_s = args.time_budget_min * 60 if args.time_budget_min else math.inf
    model.train()
    window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
    while step < tc.steps and elapsed < budget_s:
        t0 = time.perf_counter()
        lr = lr_at(step, tc, elapsed / budget_s)
        for group in opt.param_groups:
            group["lr"] = lr
        rows = mixed_batch(train, tc.batch_size, tc.n_positions, gen).to(device, non_blocking=True)
        with amp():
            loss = distill_loss(model, teacher, rows) if teacher is not None else lm_loss(model, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        opt.step()
        step += 1
        step_time = time.perf_counter() - t0  # the .item() in clip_grad_norm_'s float() synchronises
        elapsed += step_time
        window_time += step_time
        tokens_seen += rows.numel() - len(rows)
        window_loss += loss.item()
        window_steps += 1
        window_tokens += rows.numel() - len(rows)

        if step % tc.eval_interval == 0 or step == tc.steps:
            losses = interim_losses()
            train_loss = window_loss / window_steps  # mean over the steps since the last eval
            history.append({"step": step, "train_loss": train_loss, "val_loss": losses, "lr": lr,
                            "tokens_seen": tokens_seen, "elapsed_s": elapsed})
            if teacher is not None:
                history[-1]["greedy_agreement"] = greedy_agreement(
                    model, teacher, val["chat"][:tc.eval_batches].to(device), tc.batch_size, amp)
            print(f"step {step:5d} | train {train_loss:.3f} | val " + " ".join(f"{k} {v:.2f}" for k, v in losses.items())
                  + f" | lr {lr:.2e} | gnorm {grad_norm:.2f} | {window_tokens / window_time:,.0f} tok/s | "
                  f"{tokens_seen:,} tokens | {elapsed / 60:.1f} min"
                  + (f" | agree {history[-1]['greedy_agreement']:.3f}" if teacher else ""), flush=True)
            window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
        if not args.no_save and step % args.checkpoint_interval == 0:
            save_state(state_path, model, opt, step, gen, elapsed, tokens_seen, history)

    stopped = "steps done" if step >= tc.steps else "time budget reached"
    print(f"stopped at step {step}/{tc.steps} ({stopped}), {elapsed / 60:.1f} min of training", flush=True)
    if args.no_save:
        return
    save_state(state_path, model, opt, step, gen, elapsed, tokens_seen, history)

    # --- 4. output: evaluate what is shipped, i.e. the float16 weights -------------------
    save_checkpoint(model, args.output, dtype=torch.float16)
    for name in ("vocab.json", "merges.txt"):
        if not (args.output / name).exists():
            shutil.copyfile(args.tokenizer / name, args.output / name)
    if teacher is not None:  # a draft guesses only tokens it has seen: its LM head can skip the rest
        seen = set().union(*(np.unique(s).tolist() for s in train.values()))
        (args.output / "draft_vocab.json").write_text(json.dumps(
            {"token_ids": sorted(seen)}, separators=(",", ":")) + "\n")
    shipped = load_model(args.output).to(device)  # fp16 on disk, fp32 in memory
    final = {name: evaluate(shipped, rows.to(device), tc.batch_size, amp) for name, rows in val.items()}
    if teacher is not None:
        final["greedy_agreement_chat"] = greedy_agreement(shipped, teacher, val["chat"].to(device),
                                                          tc.batch_size, amp)
    shipped = shipped.cpu()
    samples = {p: greedy_continuation(shipped, tokenizer, p, 60) for p in SAMPLE_PROMPTS}
    size = (args.output / "model.safetensors").stat().st_size
    metrics = {"train_config": asdict(tc), "mix": MIX, "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "teacher": str(args.teacher) if teacher is not None else None, "steps_done": step,
               "stopped": stopped, "tokens_seen": tokens_seen, "train_wall_s": elapsed,
               "parameters": shipped.config.num_parameters(), "safetensors_bytes": size,
               "corpus_packages": data.package_versions(),
               "train_tokens": {k: len(v) for k, v in train.items()}, "prose_val_tokens": len(prose_val),
               "final_fp16_val_loss": final, "samples": samples, "history": history}
    (args.work_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"saved {args.output} ({size / 1e6:.1f} MB); fp16 held-out loss: "
          + ", ".join(f"{k} {v:.3f}" for k, v in final.items()), flush=True)
    for prompt, text in samples.items():
        print(f"--- {prompt!r} -> {text!r}", flush=True)


SAMPLE_PROMPTS = ["In the beginning", "User: Who created the heaven and the earth?\nAssistant:",
                  "User: What is the capital of France?\nAssistant:", "User: Hello!\nAssistant:"]


if __name__ == "__main__":
    main()
