"""
StreamingVLM's SFT (arXiv 2510.09608, section 2.2): full attention on short overlapped chunks that mimic the
streaming cache.

With no arguments this trains the tiny VLM from scratch on the synthetic sports stream (world.py) and writes
out/tiny: config.json + model.safetensors + tokenizer.json (loadable by VLM.from_pretrained and transformers),
stream.json (the window sizes it was trained for) and train_state.pt (optimizer and step, for --resume).

  python train.py                          # CPU: a short run (< 10 min on 2 cores) with a clearly falling loss
  python train.py --preset gpu             # one H100, 6,000 steps at ~4 a second (~25 min): events and the score
  python train.py --init DIR --data x.jsonl  # fine-tune a Qwen2.5-VL checkpoint, vision tower frozen
  torchrun --nproc_per_node=N train.py     # DDP (small models) or --fsdp (FSDP2 fully_shard, large ones)

Each optimizer step sees batch_size x grad_accum x world_size chunks; the loss is the mean over all supervised
tokens of the step (all ranks and micro-batches together), so the result does not depend on how a step is
split across processes.
"""
import argparse
import contextlib
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import IGNORE, collate, jsonl_samples, make_tokenizer, synthetic_sample
from model import PRESETS, VLM, mrope_positions, pick_device_dtype
from processor import Tokenizer
from stream import SILENCE

PRESET_ARGS = {  # --preset: defaults that suit a machine; any flag given explicitly wins
    "cpu": dict(steps=150, batch_size=2, grad_accum=1, lr=2e-3, text_sink=64, text_window=128, eval_every=50,
                curriculum=0, time_curriculum=0, event_rate=None, goal_rate=None, question_rate=0.25),
    # the GPU preset trains on a busier world (more events; each stream draws its goal rate between one goal in
    # 100 s and one in 7 s, so goal sentences are often a few tokens apart and copying the last score is easy to
    # discover) and starts with short chunks: a model from scratch must first discover that the reply
    # depends on *this* second's 4 vision tokens, which is a 24-way needle in a 24 s chunk (see the README)
    "gpu": dict(steps=6000, batch_size=32, grad_accum=1, lr=1e-3, text_sink=64, text_window=512, eval_every=250,
                curriculum=300, time_curriculum=1000, event_rate=0.3, goal_rate=(0.01, 0.15), stream_seconds=7200,
                question_rate=0.5),
}


def rate_or_range(text):
    """'0.02' -> 0.02; '0.005:0.05' -> (0.005, 0.05)"""
    lo, colon, hi = text.partition(":")
    try:
        rates = (float(lo), float(hi)) if colon else (float(lo),)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate or LO:HI, got {text!r}")
    if not all(0 < r < 1 for r in rates) or rates != tuple(sorted(rates)):
        raise argparse.ArgumentTypeError(f"rates must be in (0, 1) with LO <= HI, got {text!r}")
    return rates if colon else rates[0]


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESET_ARGS), default=None,
                    help="defaults for a machine (default: gpu when CUDA is available, else cpu)")
    ap.add_argument("--out", default="out/tiny", help="checkpoint folder")
    ap.add_argument("--init", default=None, help="fine-tune this Qwen2.5-VL checkpoint (vision tower frozen)")
    ap.add_argument("--data", default=None, help="a JSONL file of real videos (data.py); default: synthetic")
    ap.add_argument("--resume", action="store_true", help="continue from --out/train_state.pt")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="end this run after this step, with a checkpoint (the schedule still spans --steps)")
    # optimisation
    ap.add_argument("--steps", type=int, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, help="chunks per micro-batch per process")
    ap.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    ap.add_argument("--lr", type=float, help="peak learning rate (the paper: 1e-5 for --init)")
    ap.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of the steps (cosine after)")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    # data
    ap.add_argument("--chunk-seconds", type=int, default=24)
    ap.add_argument("--overlap", type=int, default=12)
    ap.add_argument("--stream-seconds", type=int, help="chunks start anywhere in streams this long (3600; a "
                    "stream with goal rate r is cut to data.GOALS_PER_STREAM / r seconds)")
    ap.add_argument("--curriculum", type=int, help="steps over which the chunk length ramps from 2 s up to "
                                                   "--chunk-seconds (0 = none)")
    ap.add_argument("--time-curriculum", type=int, default=None,
                    help="steps over which chunk start times widen from a stream's first minute to all of "
                    "--stream-seconds: early chunks hold few goal sentences before them, so the model first learns "
                    "to copy the one score there, then to find the latest of many (0 = none)")
    ap.add_argument("--event-rate", type=float, help="synthetic world: P(shot/save/foul/corner) a second "
                                                     "(default: world.py's 0.12)")
    ap.add_argument("--goal-rate", type=rate_or_range, help="synthetic world: P(goal) a second (default: 1/150), "
                                                         "or LO:HI for a rate drawn per stream")
    ap.add_argument("--question-rate", type=float, help="fraction of training chunks that end with a question "
                    "about the whole stream (world.QUESTIONS; eval.py's flexprefill task asks them)")
    ap.add_argument("--text-sink", type=int, help="previous-text head tokens (inference default 512)")
    ap.add_argument("--text-window", type=int, help="previous-text tail tokens (inference default 512)")
    ap.add_argument("--frame-size", type=int, default=56, help="synthetic frame side in pixels (multiple of 28)")
    # system
    ap.add_argument("--eval-every", type=int, help="validation loss every N steps (and a checkpoint)")
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--workers", type=int, default=min(8, (os.cpu_count() or 2) - 1),
                    help="DataLoader processes that render and tokenize chunks")
    ap.add_argument("--device", default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the language model")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP under torchrun")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    for k, v in PRESET_ARGS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.stream_seconds = args.stream_seconds or 3600
    if args.overlap >= args.chunk_seconds or args.chunk_seconds < 1:
        ap.error(f"--overlap ({args.overlap}) must be smaller than --chunk-seconds ({args.chunk_seconds})")
    if args.frame_size % 28:
        ap.error(f"--frame-size must be a multiple of 28, got {args.frame_size}")
    if args.steps < 1 or args.batch_size < 1 or args.grad_accum < 1:
        ap.error("--steps, --batch-size and --grad-accum must be positive")
    goal_hi = max(args.goal_rate) if isinstance(args.goal_rate, tuple) else (args.goal_rate or 1 / 150)
    if not 0 <= (args.event_rate if args.event_rate is not None else 0.12) <= 1 - goal_hi:
        ap.error(f"need 0 <= --event-rate <= 1 - the highest --goal-rate ({goal_hi:g})")
    return args


def lr_at(step, args):
    """Linear warm-up, then cosine to 10% of the peak."""
    warm = max(1, int(args.warmup * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    p = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def make_batch(tok, split, indices, args, step=None, question_rate=None):
    """Chunks number `indices` of a split (synthetic) or of the JSONL file, collated, with their positions.
    Training chunks end with a question at args.question_rate, validation ones at `question_rate` (default 0)."""
    if args.data:
        samples = [args.jsonl_cache[i % len(args.jsonl_cache)] for i in indices]
    else:
        world_cfg = dict(size=args.frame_size)
        if split == "train":  # validation always uses the default world, as eval.py does
            world_cfg.update({k: getattr(args, k) for k in ("event_rate", "goal_rate") if getattr(args, k) is not None})
        chunk, overlap, stream_seconds = args.chunk_seconds, args.overlap, args.stream_seconds
        if split == "train" and step is not None and step < args.curriculum:
            chunk = min(chunk, 2 + (chunk - 2) * step // args.curriculum)  # 2 s chunks first, growing linearly
            overlap = min(overlap, chunk // 2)
        if split == "train" and step is not None and step < args.time_curriculum:
            stream_seconds = min(stream_seconds, 60 + (stream_seconds - 60) * step // args.time_curriculum)
        if split == "train":
            question_rate = args.question_rate
        samples = [synthetic_sample(tok, split, i, chunk, overlap, stream_seconds, args.text_sink, args.text_window,
                                    world_cfg, question_rate or 0.0) for i in indices]
    return with_positions(collate(samples, tok.pad_id), args)


def with_positions(batch, args):
    """Add the M-RoPE position ids, made here (in the DataLoader workers) rather than in the forward, where the
    per-sample bookkeeping would hold up the GPU (args.model_cfg is set by main)."""
    if getattr(args, "model_cfg", None) is not None:
        batch["position_ids"], _ = mrope_positions(batch["input_ids"], args.model_cfg,
                                                   video_grid_thw=batch["video_grid_thw"],
                                                   attention_mask=batch["attention_mask"])
    return batch


def batch_for(step, micro, rank, world, args, tok):
    """The chunks of one micro-batch: a pure function of (step, micro-batch, rank), so a resumed run and a
    2-process run see exactly the samples of an uninterrupted 1-process run."""
    first = (step * args.grad_accum + micro) * args.batch_size * world + rank * args.batch_size
    return make_batch(tok, "train", range(first, first + args.batch_size), args, step)


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch number i = (step i // grad_accum, micro-batch i % grad_accum), built in DataLoader workers."""

    def __init__(self, first_step, args, tok, rank, world):
        self.first, self.args, self.tok, self.rank, self.world = first_step, args, tok, rank, world

    def __len__(self):
        return (self.args.steps - self.first) * self.args.grad_accum

    def __getitem__(self, i):
        step, micro = self.first + i // self.args.grad_accum, i % self.args.grad_accum
        return batch_for(step, micro, self.rank, self.world, self.args, self.tok)


def loss_sum(model, batch, device):
    """Sum of token cross-entropies over the supervised tokens, and their count."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    labels = batch.pop("labels")
    logits = model(**batch)
    targets = labels[:, 1:]  # position i predicts token i + 1
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((targets != IGNORE).sum())


def first_token_hits(model, batch, device, silence_id, number_ids=()):
    """How often the argmax is right at the first reply token of a second, for event seconds and for quiet ones
    (the event/silence decision the commentary metrics hinge on, which the mean loss hides), and at the score
    numbers of goal sentences (the one thing the frames never show). Returns
    (event right, events, quiet right, quiet seconds, score tokens right, score tokens)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch.pop("labels")
    targets = labels[:, 1:]
    pred = model(**batch)[:, :-1].argmax(-1)
    first = (targets != IGNORE) & (labels[:, :-1] == IGNORE)  # the first supervised token of each second
    right = pred[first] == targets[first]
    event = targets[first] != silence_id
    score = torch.isin(targets, torch.tensor(list(number_ids), dtype=torch.long, device=targets.device))
    return (int(right[event].sum()), int(event.sum()), int(right[~event].sum()), int((~event).sum()),
            int((pred[score] == targets[score]).sum()), int(score.sum()))


def answer_right(model, batch, device, im_start_id):
    """Whether a one-chunk batch that ends with a question gets its whole answer right (teacher-forced argmax at
    every answer token), or None if the chunk asks none (data.chunk_question found it unanswerable)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch.pop("labels")[0]
    ids = batch["input_ids"][0]
    turns = (ids == im_start_id).nonzero().flatten().tolist()
    user, header = turns[-2], turns[-1]  # the last user turn and the assistant header after it
    if (ids[user:header] == model.cfg.video_token_id).any():  # the last second's turn: no question was asked
        return None
    pos = (labels != IGNORE).nonzero().flatten()
    pos = pos[pos > header]
    pred = model(**batch)[0].argmax(-1)
    return bool((pred[pos - 1] == labels[pos]).all())


def save_checkpoint(raw, opt, step, history, args, tok_path, master):
    """The model in the official layout plus train_state.pt, each file written atomically. Under FSDP every
    rank takes part in gathering the full tensors; only the master writes."""
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in raw.state_dict().items()}
    if not master:
        return
    raw.tokenizer_path = tok_path
    raw.save_pretrained(args.out, state)
    with open(os.path.join(args.out, "stream.json.tmp"), "w") as f:
        json.dump(dict(text_sink=args.text_sink, text_window=args.text_window, vision_window=16,
                       frame_size=args.frame_size, train_event_rate=args.event_rate, train_goal_rate=args.goal_rate),
                  f)
    os.replace(os.path.join(args.out, "stream.json.tmp"), os.path.join(args.out, "stream.json"))
    tmp = os.path.join(args.out, "train_state.pt.tmp")
    torch.save(dict(optimizer=opt.state_dict(), step=step, history=history,
                    args={k: v for k, v in vars(args).items() if k not in ("jsonl_cache", "model_cfg")}), tmp)
    os.replace(tmp, os.path.join(args.out, "train_state.pt"))


def main(argv=None):
    args = get_args(argv)
    # ---- processes and device ----
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    master = rank == 0
    device, _ = pick_device_dtype(args.device, torch.float32, quiet=not master)
    amp = device.type == "cuda"  # bf16 autocast on GPU, fp32 master weights
    torch.manual_seed(args.seed)
    if master:
        print(f"preset {args.preset}: {args.steps} steps x {args.batch_size} chunks x {args.grad_accum} accum x "
              f"{world} processes, lr {args.lr}, text sink/window {args.text_sink}/{args.text_window}"
              f"{', bf16 autocast' if amp else ''}")
    # ---- tokenizer and model ----
    os.makedirs(args.out, exist_ok=True)
    tok_path = os.path.join(args.out, "tokenizer.json")
    if args.init:
        model = VLM.from_pretrained(args.init, device=device, dtype=torch.float32)
        tok = Tokenizer.from_file(args.init)
        tok_path = model.tokenizer_path
        for p in model.visual.parameters():  # the paper's recipe: the whole vision tower, merger included, frozen
            p.requires_grad_(False)
    elif args.resume:
        model = VLM.from_pretrained(args.out, device=device, dtype=torch.float32)
        tok = Tokenizer.from_file(args.out)
    else:
        tok = make_tokenizer()
        if master:
            tok.tok.save(tok_path + ".tmp")
            os.replace(tok_path + ".tmp", tok_path)
        cfg = PRESETS["tiny"](vocab_size=64 * math.ceil(len(tok) / 64))
        cfg.image_token_id, cfg.video_token_id = tok.image_pad_id, tok.video_pad_id
        cfg.vision_start_token_id, cfg.vision_end_token_id = tok.vision_start_id, tok.vision_end_id
        cfg.eos_token_id, cfg.bos_token_id = tok.im_end_id, tok.endoftext_id
        model = VLM(cfg).init_weights(seed=args.seed).to(device)
    if args.data:
        args.jsonl_cache = list(jsonl_samples(args.data, tok, args.chunk_seconds, args.text_sink, args.text_window))
    raw = model
    args.model_cfg = raw.cfg  # for the position ids made with each batch (with_positions)
    model.checkpointing = args.checkpointing
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if master:
        print(f"model: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained)")
    if ddp and args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    if args.compile:
        raw.model.compile()
    opt = torch.optim.AdamW([p for p in raw.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay, betas=(0.9, 0.95))
    step, history = 0, []
    if args.resume:
        state = torch.load(os.path.join(args.out, "train_state.pt"), map_location=device, weights_only=False)
        # the samples of a step depend on these: a resumed run must use the ones it started with
        data_args = ("preset", "steps", "batch_size", "grad_accum", "chunk_seconds", "overlap", "stream_seconds",
                     "curriculum", "time_curriculum", "event_rate", "goal_rate", "text_sink", "text_window", "frame_size", "data",
                     "seed", "lr", "warmup", "question_rate")
        saved = state.get("args", {})
        changed = [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(args, k)}" for k in data_args
                   if k in saved and saved[k] != getattr(args, k)]
        if changed:
            raise SystemExit(f"--resume with other settings than the run in {args.out} used: {', '.join(changed)}")
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        if master:
            print(f"resumed at step {step}")
    val = [make_batch(tok, "eval", [i], args) for i in range(args.eval_chunks)] if master else []
    val_q = ([make_batch(tok, "eval", [i], args, question_rate=1.0) for i in range(args.eval_chunks)]
             if master and not args.data and args.question_rate else [])
    silence_id = tok.encode(SILENCE)[0]
    number_ids = {ids[0] for n in range(100) if len(ids := tok.encode(f" {n}")) == 1}  # scores are single tokens
    if master and not number_ids:
        print("note: this tokenizer splits numbers, so validation counts no score numbers (0/0)")

    def validate():
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=amp):
            tot = [loss_sum(raw, b, device) for b in val]
            hits = [sum(x) for x in zip(*(first_token_hits(raw, b, device, silence_id, number_ids) for b in val))]
            answers = [answer_right(raw, b, device, tok.im_start_id) for b in val_q]
        model.train()
        asked = sum(a is not None for a in answers)
        return (f"val loss {sum(l.item() for l, _ in tot) / sum(n for _, n in tot):.4f}, first reply token right "
                f"on {hits[0]}/{hits[1]} event and {hits[2]}/{hits[3]} quiet seconds, score numbers right "
                f"{hits[4]}/{hits[5]}"
                + (f", questions answered {sum(a or 0 for a in answers)}/{asked}" if asked else ""))

    # ---- the loop ----
    flops_per_token = 6 * n_train  # matmul FLOPs of forward + backward (attention left out: short chunks)
    peak = 989e12 if amp else None  # H100 SXM dense bf16
    model.train()
    end = min(args.steps, args.stop_at or args.steps)
    bar = tqdm(range(step, end), initial=step, total=args.steps, disable=not master, desc="train")
    loader = iter(torch.utils.data.DataLoader(MicroBatches(step, args, tok, rank, world), batch_size=None,
                                              num_workers=args.workers, prefetch_factor=4 if args.workers else None,
                                              persistent_workers=False, pin_memory=device.type == "cuda"))
    for step in bar:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        batches = [next(loader) for _ in range(args.grad_accum)]
        # the step's loss is a mean over all its supervised tokens, on every rank and micro-batch
        count = torch.tensor(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches), device=device)
        if ddp:
            dist.all_reduce(count)
        total, tokens = 0.0, 0
        for m, b in enumerate(batches):
            # DDP: all-reduce the gradients only after the last micro-batch
            quiet = ddp and not args.fsdp and m < len(batches) - 1
            with model.no_sync() if quiet else contextlib.nullcontext(), torch.autocast("cuda", torch.bfloat16, enabled=amp):
                s, n = loss_sum(model, b, device)
                (s * world / count).backward()  # DDP averages gradients over ranks: * world undoes that
            total += s.item()
            tokens += b["attention_mask"].sum().item()
        norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = torch.tensor(total, device=device)
        if ddp:
            dist.all_reduce(loss)
        loss = loss.item() / count.item()
        history.append(loss)
        dt = time.perf_counter() - t0
        tps = tokens * world / dt
        mfu = f" mfu {100 * flops_per_token * tps / (peak * world):.1f}%" if peak else ""
        bar.set_postfix_str(f"loss {loss:.4f} lr {lr_at(step, args):.2e} {tps:,.0f} tok/s{mfu} |g| {norm:.2f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == end:
            if master:
                tqdm.write(f"step {step + 1}: train loss {loss:.4f}, {validate()}")
            save_checkpoint(raw, opt, step + 1, history, args, tok_path, master)
    if master:
        print(f"done: loss {history[0]:.3f} -> {history[-1]:.3f}; checkpoint in {args.out}")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
