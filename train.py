"""
StreamingVLM's SFT (arXiv 2510.09608, section 2.2): full attention on short overlapped chunks that mimic the
streaming cache.

With no arguments this trains the tiny VLM from scratch on the synthetic sports stream (world.py) and writes
out/tiny: config.json + model.safetensors + tokenizer.json (loadable by VLM.from_pretrained and transformers),
stream.json (the layout it was trained with: windows, fps, frame pixels, system prompt) and the train state for
--resume (train_state.json + optimizer.safetensors: no pickle, so loading a checkpoint can never run code).

  python train.py                          # 2-core CPU: ~9 min, names the events at the right second (no score)
  python train.py --preset gpu             # one GPU: 6,000 steps of 24 s chunks, then 250 of 192 s chunks in
                                           # 8 s segments on the cache streaming leaves (reuse.py); ~8 min on an
                                           # H100: events named, the score kept on few streams (README)
  python train.py --init DIR --data x.jsonl  # fine-tune a Qwen2.5-VL checkpoint with StreamingVLM's recipe
  torchrun --nproc_per_node=N train.py     # DDP (small models) or --fsdp (FSDP2 fully_shard, large ones)

Settings: every default is in TrainConfig below. --preset picks one of PRESETS, --init lays StreamingVLM's
fine-tune recipe (INIT_RECIPE) over it (a checkpoint made here keeps the frames of its stream.json), a flag wins over
all; the run prints each value and where it came from.

A step's loss is the mean over all its supervised tokens (every rank and micro-batch), so it does not depend on
how the step is split across processes; its chunks are a function of (step, micro-batch, rank), so a resumed run
continues the uninterrupted one exactly.

A checkpoint is whole or absent (checkpoint.py): it is written into a hidden folder beside --out and swapped in
by two renames; a save killed half-way leaves the previous checkpoint, and the next start cleans up after it. A
non-finite loss or gradient stops the run before the update, so the last checkpoint is never overwritten with
NaN weights. Every --eval-every steps the run validates on fixed chunks (validate.py) and saves; Ctrl-C saves after
the step in progress and stops, and --resume goes on from there. On a GPU the host never waits for a step (a tiny
model's step is mostly kernel launches): it queues the next one while the GPU runs it, and reads its loss then.
"""
import argparse
import contextlib
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields

import torch
from tqdm import tqdm

import checkpoint as ckpt
from cli import (Parser, adam_betas, at_least, between, check_device, checked, device_name, rate_or_range,
                 seconds_range, stop_on_ctrl_c)
from data import DataError, make_tokenizer, micro_batches, phase_at
from layout import FRAME_PIXELS, LIMITS
from model import VLM, tiny_config
from parallel import all_sum, distribute, finish, setup
from processor import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, Tokenizer, read_json
from records import JsonlSamples
from reuse import new_tokens, segment_cuts, supervised_tokens
from safeio import RunLock
from validate import Validator, loss_sum, training_kernels
from world import WorldConfig

# -----------------------------------------------------------------------------
# settings: every default in one place


def knob(default, help, parse):
    """A TrainConfig field: its default, its --help text, and the argparse type that parses and range-checks it
    (None: an on/off flag)."""
    return field(default=default, metadata=dict(help=help, parse=parse))


POSITIVE = checked(float, lambda v: v > 0, "> 0")
FRACTION = checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")
PIXELS = between(784, LIMITS["max_pixels"])  # layout.LIMITS: at most a frame of 16384 patches


@dataclass
class TrainConfig:
    """What a run computes; PRESETS below change some of these defaults."""
    # optimisation
    steps: int = knob(150, "optimizer steps (the learning-rate schedule spans them)", at_least(1))
    batch_size: int = knob(2, "chunks per micro-batch per process", between(1, 4096))
    grad_accum: int = knob(1, "micro-batches per optimizer step", between(1, 4096))
    lr: float = knob(2e-3, "peak learning rate", POSITIVE)
    warmup: float = knob(0.03, "warm-up fraction of the steps (linear, then cosine)",
                         checked(float, lambda v: 0 <= v < 1, "in [0, 1)"))
    min_lr: float = knob(0.1, "the cosine ends at this fraction of --lr", FRACTION)
    betas: tuple = knob((0.9, 0.95), "AdamW betas B1,B2", adam_betas)
    weight_decay: float = knob(0.0, "AdamW weight decay", at_least(0.0, float))
    grad_clip: float = knob(1.0, "clip the gradient norm to this", POSITIVE)
    freeze_vision: bool = knob(False, "freeze the vision tower, merger included", None)
    # a model from scratch (model.tiny_config); --init and --resume take theirs from the checkpoint
    layers: int = knob(4, "decoder layers of a model from scratch", between(1, 1024))
    width: int = knob(256, "decoder width of a model from scratch (a multiple of 64)", between(64, 1 << 16))
    # data
    chunk_seconds: int = knob(24, "seconds per training chunk", between(1, 3600))
    overlap: int = knob(12, "seconds that consecutive chunks of a stream share (< --chunk-seconds)", at_least(0))
    vision_window: int = knob(16, "seconds of vision the streaming cache keeps (the served checkpoint's stream.json "
                              "gets the smaller of this and --chunk-seconds)", between(1, 3600))
    segment_seconds: int = knob(0, "cut each chunk into segments of N seconds, forwarded in turn, each on the cache "
                                "that streaming leaves when its first second arrives: older rounds out of the vision "
                                "window, their replies in the previous text with the K/V of their own round (0: one "
                                "forward a chunk, the authors' layout)", between(0, 3600))
    preroll: int = knob(0, "seconds streamed before each training chunk, in segments, without loss or gradient, so "
                        "that its previous text ends in replies with the K/V of their own rounds, as at inference "
                        "(needs --segment-seconds; best a multiple of it; a stream's first N seconds are then never "
                        "supervised)", between(0, 3600))
    segment_steps: int = knob(0, "train the last N of --steps on the cache streaming leaves, after the chunks: in "
                              "--segment-seconds segments of --segment-chunk-seconds chunks (overlap half), "
                              "--segment-batch-size of them, at --segment-lr with a warm-up and cosine of their own "
                              "(0: every step as --segment-seconds says)", at_least(0))
    segment_chunk_seconds: int = knob(192, "chunk length in the --segment-steps", between(2, 3600))
    segment_batch_size: int = knob(64, "chunks per micro-batch per process in the --segment-steps", between(1, 4096))
    segment_lr: float = knob(1e-4, "peak learning rate of the --segment-steps", POSITIVE)
    segment_goal_rate: float = knob(None, "synthetic world's goal rate (or LO:HI) in the --segment-steps (none: "
                                    "--goal-rate's); sparser goals leave the last score further back", rate_or_range)
    segment_event_rate: float = knob(None, "synthetic world's P(shot/save/foul/corner) a second in the "
                                     "--segment-steps (none: --event-rate's); fewer events keep an old goal "
                                     "sentence longer inside the previous text's window", FRACTION)
    stream_seconds: int = knob(3600, "chunks start anywhere in streams this long (>= --chunk-seconds; a stream "
                               "with goal rate r is cut to data.GOALS_PER_STREAM / r seconds)", between(1, 10**7))
    curriculum: int = knob(0, "steps over which the chunk length ramps from 2 s up to --chunk-seconds (with "
                           "--long-seconds: the lengths from 60 s; 0: none)",
                           at_least(0))
    time_curriculum: int = knob(0, "steps over which chunk starts widen from a stream's first minute to all of "
                                "--stream-seconds (0: none)", at_least(0))
    event_rate: float = knob(None, "synthetic world: P(shot/save/foul/corner) a second (none: world.py's "
                             f"{WorldConfig.event_rate})", FRACTION)
    goal_rate: float = knob(None, "synthetic world: P(goal) a second, or LO:HI for a rate drawn per stream "
                            f"(none: world.py's {WorldConfig.goal_rate:.4f})", rate_or_range)
    question_rate: float = knob(0.25, "fraction of training chunks that end with a question about the whole "
                                "stream (world.QUESTIONS)", FRACTION)
    long_seconds: tuple = knob(None, "LO:HI: train on whole streams from their first second instead, LO-HI seconds "
                               "(~29 tokens a second) in one forward, each ending in --long-questions questions "
                               "answered anywhere in it (world.long_questions); --curriculum grows both ends "
                               "from 60 s; the chunk flags, --time-curriculum and --question-rate do not apply (none: "
                               "chunks)", seconds_range)
    long_questions: int = knob(4, "questions ending each --long-seconds stream, at most (world.long_questions: "
                               "the whole-stretch ones, one timed question a goal, no repeats)", between(1, 64))
    said_at: bool = knob(False, "with --long-seconds: also ask what was said at a second (world.SAID_AT), of goals "
                         "and, in the room left, of the other events: many lookups by label a stream", None)
    text_sink: int = knob(64, "previous-text head tokens kept (the streaming default is 512)", between(0, 32768))
    text_window: int = knob(128, "previous-text tail tokens kept (the streaming default is 512)", between(0, 32768))
    frame_size: int = knob(56, "synthetic frame side in pixels (a multiple of 28)", between(56, 4096))
    min_pixels: int = knob(FRAME_PIXELS[0], "a frame's fewest pixels after resizing (smart_resize)", PIXELS)
    max_pixels: int = knob(FRAME_PIXELS[1], "a frame's most pixels after resizing (smart_resize)", PIXELS)
    # bookkeeping: these change nothing a step computes, so a resumed run may change them
    eval_every: int = knob(50, "validation and a checkpoint every N steps", at_least(1))
    eval_chunks: int = knob(8, "validation chunks", between(1, 100_000))
    workers: int = knob(min(16, (os.cpu_count() or 2) - 1), "DataLoader processes that render and tokenize chunks "
                        "(CPUs - 1, at most 16: on a GPU the synthetic chunks, not the model, set the pace)",
                        between(0, 256))
    seed: int = knob(0, "seed of a fresh model's weights", between(0, 2**63 - 1))


BOOKKEEPING = ("eval_every", "eval_chunks", "workers")

PRESETS = {
    # a CPU learns the events in minutes with a smaller decoder on short chunks: 4 s chunks (the streaming cache then
    # keeps 4 s of vision, as checkpoint.stream_layout says), no previous text and no questions (the score needs both
    # and hours of compute: this preset leaves it unlearnt), events in 55% of the seconds
    "cpu": TrainConfig(steps=2800, batch_size=8, lr=3e-3, layers=2, width=128, chunk_seconds=4, overlap=2,
                       text_sink=0, text_window=0, event_rate=0.5, goal_rate=0.05, question_rate=0.0,
                       eval_every=400, eval_chunks=32),
    # a busier world (goal rates drawn per stream in 0.01-0.15: goal sentences close together make copying the last
    # score easy to discover) and both curricula (a reply depends on *this* second's 4 vision tokens of 24 s); then a
    # fine-tune in segments, so that the score is read from K/V made as streaming makes them (reuse.py): 6,000
    # steps of chunks (the shipped model's base; 2,400 read half as many score numbers), 250 of segments (192 s
    # chunks of 24 segments, 64 a step). One H100: ~8 min; the score kept on 13 and 1 of 30 held-out streams (seeds
    # 0, 1): its 192 s segments hold few goals far apart (tools/goal_gaps.py; docs/RESULTS.md)
    "gpu": TrainConfig(steps=6250, batch_size=32, lr=1e-3, text_window=512, eval_every=500, curriculum=300,
                       time_curriculum=1000, event_rate=0.3, goal_rate=(0.01, 0.15), stream_seconds=7200,
                       question_rate=0.5, segment_steps=250, segment_seconds=8, segment_lr=2e-4),
}

INIT_SOURCE = "--init recipe (StreamingVLM SFT)"
INIT_RECIPE = dict(  # mit-han-lab/streaming-vlm scripts/sft_stage_*.sh and train.py: HF Trainer with AdamW
    lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0,  # --learning_rate 1e-5; Trainer's AdamW defaults
    warmup=0.03, min_lr=0.0, grad_clip=1.0,         # --warmup_ratio 0.03, cosine to 0; Trainer's max_grad_norm
    freeze_vision=True,                             # train.py: model.visual.requires_grad_(False)
    chunk_seconds=24, overlap=12,                   # their SFT windows: 24 s chunks overlapping by 12 s
    text_sink=512, text_window=512,                 # text_sink=512, TEXT_SLIDING_WINDOW=512 (at 2 fps: layout.FPS)
    min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS,  # Qwen2.5-VL's video frame limits (processor.py)
    segment_seconds=0, segment_steps=0)             # plain chunks, as theirs (the gpu preset's segment phase: off)

PEAK_FLOPS = 989e12  # H100 SXM dense bf16, for the MFU readout


def show(value, name=""):
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return (":" if name.endswith(("goal_rate", "long_seconds")) else ",").join(f"{v:g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def preset_values(name):
    """'cpu 0.002, gpu 0.001, --init 1e-05' (or 'default 24' when all agree): shown in --help."""
    values = {p: getattr(c, name) for p, c in PRESETS.items()}
    if name in INIT_RECIPE:
        values["--init"] = INIT_RECIPE[name]
    if len({show(v, name) for v in values.values()}) == 1:
        return f"default {show(values['cpu'], name)}"
    return ", ".join(f"{k} {show(v, name)}" for k, v in values.items())


# -----------------------------------------------------------------------------
# command line


def build_parser():
    ap = Parser(prog="train.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a column of defaults (gpu when CUDA is available, "
                    "else cpu); [...] in each flag's help shows its values")
    ap.add_argument("--out", default="out/tiny", help="checkpoint folder (default out/tiny)")
    ap.add_argument("--init", help="fine-tune this Qwen2.5-VL checkpoint folder with StreamingVLM's SFT recipe "
                    "(the --init values below)")
    ap.add_argument("--data", help="a JSONL of videos with timed words: StreamingVLM's Inf-Stream-Train (LiveCC) "
                    "format, or ours (records.py); default: the synthetic world")
    ap.add_argument("--video-root", help="the folder relative video paths in --data are under (default: its own)")
    ap.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    ap.add_argument("--overwrite", action="store_true", help="start afresh although --out holds a checkpoint "
                    "(it stays until the first save replaces it)")
    ap.add_argument("--stop-at", type=at_least(1), help="end this run after this step, with a checkpoint (the "
                    "schedule still spans --steps)")
    for f in fields(TrainConfig):
        flag, help = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} [{preset_values(f.name)}]"
        if f.metadata["parse"] is None:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            ap.add_argument(flag, type=f.metadata["parse"], help=help)
    ap.add_argument("--device", type=device_name, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the language model")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP under torchrun")
    return ap


def init_frames(ap, path):
    """The frames a checkpoint train.py made on the synthetic world was trained on (its stream.json's frame_size,
    min_pixels, max_pixels): a fine-tune of it keeps them, where the recipe's Qwen video limits would upscale a
    56-pixel frame ~30 times (~120 vision tokens a second instead of 4). {} for any other checkpoint."""
    stream_json = os.path.join(path, "stream.json")
    try:
        settings = read_json(stream_json) if os.path.isfile(stream_json) else {}
    except (OSError, ValueError) as e:
        ap.error(f"--init {path}: {e}")
    if "frame_size" not in settings:
        return {}
    knobs = {f.name: f.metadata["parse"] for f in fields(TrainConfig)}
    try:  # each value through its flag's parser: the same types and bounds as when it is given on the command line
        return {k: knobs[k](str(settings[k])) for k in ("frame_size", "min_pixels", "max_pixels") if k in settings}
    except argparse.ArgumentTypeError as e:
        ap.error(f"--init {stream_json}: {e}")


def get_args(argv=None):
    """Run options on the namespace; args.cfg the resolved TrainConfig, args.sources where each value came from
    ('preset cpu', the --init recipe, 'flag')."""
    ap = build_parser()
    args = ap.parse_args(argv)
    args.preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    values, args.sources = asdict(PRESETS[args.preset]), {}
    seen = init_frames(ap, args.init) if args.init else {}
    for f in fields(TrainConfig):
        args.sources[f.name] = f"preset {args.preset}"
        if args.init and f.name in INIT_RECIPE:
            values[f.name], args.sources[f.name] = INIT_RECIPE[f.name], INIT_SOURCE
        if f.name in seen:
            values[f.name], args.sources[f.name] = seen[f.name], f"--init {args.init}/stream.json"
        if getattr(args, f.name) is not None:
            values[f.name], args.sources[f.name] = getattr(args, f.name), "flag"
        delattr(args, f.name)  # one place for each value: args.cfg
    args.cfg = TrainConfig(**values)
    check_combinations(ap, args)
    return args


def check_segments(ap, args):
    """The segment flags (--segment-seconds, --segment-steps, --preroll, ...) against each other and the chunks."""
    c = args.cfg
    if c.segment_steps and not c.segment_seconds:
        ap.error(f"--segment-steps {c.segment_steps} trains in segments: it needs --segment-seconds")
    if c.segment_steps >= c.steps:
        ap.error(f"--segment-steps ({c.segment_steps}, {args.sources['segment_steps']}) must leave some of --steps "
                 f"({c.steps}) to the plain chunks (--segment-steps 0: none in segments)")
    lone = [f"--{k.replace('_', '-')}" for k in ("segment_chunk_seconds", "segment_batch_size", "segment_lr",
                                                 "segment_goal_rate", "segment_event_rate") if args.sources[k] == "flag"]
    if lone and not c.segment_steps:
        ap.error(f"{', '.join(lone)} set(s) the segment phase: it needs --segment-steps")
    if args.data and c.segment_steps:
        ap.error("--segment-steps: the segment phase's chunks are synthetic; with --data, --segment-seconds N "
                 "trains the whole run in segments (--segment-steps 0)")
    # the chunks that are cut into segments: every chunk, or with --segment-steps those of its own phase
    chunk, flag = ((c.segment_chunk_seconds, "--segment-chunk-seconds") if c.segment_steps else
                   (c.chunk_seconds, "--chunk-seconds"))
    cuts = segment_cuts([chunk], c.segment_seconds) if c.segment_seconds else []
    last = cuts[-1] if cuts else 0  # the last segment's first second: nothing has left the window before it
    if c.segment_seconds and last < c.vision_window:
        ap.error(f"--segment-seconds {c.segment_seconds} with {flag} {chunk} evicts nothing: the last segment "
                 f"starts at second {last}, before any round leaves the --vision-window ({c.vision_window})")
    if c.long_seconds and (c.segment_seconds or c.preroll):
        ap.error("--long-seconds trains whole streams in one forward: not with --segment-seconds or --preroll")
    if c.said_at and not c.long_seconds:
        ap.error("--said-at asks its questions at the end of --long-seconds streams: it needs --long-seconds")
    if c.preroll and not c.segment_seconds:
        ap.error("--preroll streams seconds before each chunk in segments: it needs --segment-seconds")
    for n, what in ((c.chunk_seconds, "--chunk-seconds"), (chunk + c.preroll, flag + " + --preroll" * bool(c.preroll))):
        if c.stream_seconds < n:
            ap.error(f"--stream-seconds ({c.stream_seconds}) must be at least {what} ({n})")


def check_combinations(ap, args):
    """Settings that are each in range but make no sense together."""
    c = args.cfg
    if c.overlap >= c.chunk_seconds:
        ap.error(f"--overlap ({c.overlap}) must be smaller than --chunk-seconds ({c.chunk_seconds})")
    check_segments(ap, args)
    if c.width % 64:
        ap.error(f"--width must be a multiple of 64 (heads of 64 dims), got {c.width}")
    if c.frame_size % 28:
        ap.error(f"--frame-size must be a multiple of 28, got {c.frame_size}")
    if c.min_pixels > c.max_pixels:
        ap.error(f"--min-pixels ({c.min_pixels}) must not exceed --max-pixels ({c.max_pixels})")
    for flags, phase in (("--event-rate and --goal-rate", c),  # the last step's phase: its own rates or the run's
                         ("the segment phase (--segment-event-rate, --segment-goal-rate, or the run's)",
                          phase_at(c.steps - 1, c)[1])):
        events = WorldConfig.event_rate if phase.event_rate is None else phase.event_rate
        rate = phase.goal_rate
        goal_hi = max(rate) if isinstance(rate, tuple) else (rate or WorldConfig.goal_rate)
        if events + goal_hi > 1:
            ap.error(f"{flags}: events ({events:g}) plus the highest goal rate ({goal_hi:g}) must not exceed 1")
    if args.stop_at is not None and args.stop_at > c.steps:
        ap.error(f"--stop-at ({args.stop_at}) is past the last step (--steps {c.steps})")
    if args.resume and args.overwrite:
        ap.error("--resume continues the checkpoint in --out, --overwrite replaces it: pass one")
    if problem := ckpt.out_unfit(args):  # now, not at the first save an hour into the run
        ap.error(f"--out {problem}")
    if args.data and not os.path.isfile(args.data):
        what = "a folder, not a JSONL file" if os.path.isdir(args.data) else "no such file"
        ap.error(f"--data {args.data}: {what}")
    if args.video_root and not os.path.isdir(args.video_root):
        ap.error(f"--video-root {args.video_root}: not a folder")
    synthetic = [f"--{k.replace('_', '-')}" for k in ("event_rate", "goal_rate", "question_rate", "curriculum",
                 "time_curriculum", "stream_seconds", "frame_size", "preroll", "segment_goal_rate",
                 "segment_event_rate", "long_seconds")
                 if args.sources[k] == "flag"]
    if args.data and synthetic:
        ap.error(f"{', '.join(synthetic)} only apply to the synthetic world, not to --data")
    for name in ("config.json", "tokenizer.json"):
        if args.init and not os.path.isfile(os.path.join(args.init, name)):
            ap.error(f"--init {args.init}: no {name} there (expected a Qwen2.5-VL checkpoint folder)")
    if not os.path.isdir(ckpt.beside(args.out, "old")) and ckpt.out_problem(args):  # else: after ckpt.prepare
        ap.error(ckpt.out_problem(args))
    if args.fsdp and c.segment_seconds:  # reuse.forward_segments calls the vision tower outside the sharded forward
        ap.error("--segment-seconds does not work with --fsdp (DDP or one process: yes)")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        ap.error("--fsdp shards over several processes: run it under torchrun --nproc_per_node=N")
    check_device(ap, args.device)


def print_config(args):
    print(f"settings ({args.preset} preset{', --init ' + args.init if args.init else ''}):")
    for f in fields(TrainConfig):
        print(f"  {f.name:<16} {show(getattr(args.cfg, f.name), f.name):<14} {args.sources[f.name]}")


def lr_at(step, cfg):
    """Linear warm-up over cfg.warmup of the steps of the phase (data.phase_at), then cosine down to cfg.min_lr of
    its peak."""
    start, cfg = phase_at(step, cfg)
    step -= start
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    p = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * p)))


# -----------------------------------------------------------------------------
# setup and build


def load_model(args, run):
    """(model, tokenizer, tokenizer.json text): the checkpoint in --out when resuming, else --init's weights, else
    a fresh tiny model on a new tokenizer; fp32 on the run's device, the vision tower frozen when configured."""
    source = args.out if args.resume else args.init
    if source:
        try:
            model = VLM.from_pretrained(source, device=run.device, dtype=torch.float32)
            tok = Tokenizer.from_file(source)
            ckpt.check_vocab(source, tok, model.cfg)
            with open(os.path.join(source, "tokenizer.json")) as f:
                tok_json = f.read()
        except (OSError, ValueError) as e:
            raise SystemExit(f"{'--out' if args.resume else '--init'} {source}: {e}")
    else:
        tok = make_tokenizer()
        tok_json = tok.tok.to_str(pretty=True)
        model = VLM(tiny_config(tok, args.cfg.layers, args.cfg.width)).init_weights(seed=args.cfg.seed).to(run.device)
    model.tokenizer_path = None  # checkpoint.save writes tokenizer.json from tok_json
    model.checkpointing = args.checkpointing
    if args.cfg.freeze_vision:
        model.visual.requires_grad_(False)
    if run.master:
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"model: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained), from "
              f"{source or 'scratch'}")
    return model, tok, tok_json


def make_optimizer(raw, cfg):
    """AdamW, fused: one kernel for the whole update, which a non-finite step skips on the device (train_step)."""
    return torch.optim.AdamW([p for p in raw.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas,
                             weight_decay=cfg.weight_decay, fused=True)


# -----------------------------------------------------------------------------
# the loop


def train_step(step, model, raw, opt, batches, args, run):
    """One optimizer step over this process's micro-batches, queued: (loss, gradient norm), 0-d tensors not yet
    read, and the tokens forwarded. The loss is the mean over all supervised tokens of the step (every rank and
    micro-batch). Nothing here waits for the GPU, so the host queues the next step while the GPU runs this one; a
    non-finite loss or norm never reaches the weights: fused AdamW skips the update on the device where found_inf
    is set (the flag torch.amp.GradScaler sets), and read_step stops the run."""
    cfg = args.cfg
    start, phase = phase_at(step, cfg)
    if step == start and start:
        opt.state.clear()  # a second phase starts as a fine-tune does: fresh AdamW moments (made at its first step)
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    count = sum(supervised_tokens(b) for b in batches)  # counted on the host
    if run.ddp:
        count = all_sum(torch.tensor(count, device=run.device), run)
    total, tokens = 0, 0
    for m, b in enumerate(batches):
        quiet = run.ddp and not args.fsdp and m < len(batches) - 1  # DDP: all-reduce after the last micro-batch
        with model.no_sync() if quiet else contextlib.nullcontext(), training_kernels(run.amp):
            s, _ = loss_sum(model, b, run.device)
            (s * run.world / count).backward()  # DDP averages gradients over ranks: * world undoes that
        total = total + s.detach()
        tokens += new_tokens(b)
    if phase.freeze_vision:  # the segment phase keeps the vision tower as the chunks left it; its gradients,
        for p in raw.visual.parameters():  # made all the same (DDP expects every parameter's), are dropped
            p.grad = None
    norm = ckpt.full(torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)).detach()
    loss = all_sum(total, run) / count
    opt.found_inf = (~(loss.isfinite() & norm.isfinite())).float()  # 1: this step's update is skipped
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, norm, tokens


def read_step(step, loss, norm, saved, args):
    """A queued step's loss and gradient norm, read (waiting for the GPU to finish that step); a non-finite one
    stops the run with one line, before any checkpoint: its update was skipped (train_step)."""
    loss, norm = torch.stack([loss.float(), norm.float()]).tolist()
    if not (math.isfinite(loss) and math.isfinite(norm)):
        kept = f"the checkpoint of step {saved} in {args.out} is kept" if saved else "no checkpoint was written"
        raise SystemExit(f"step {step + 1}: non-finite loss {loss}, gradient norm {norm}; stopped before its update; "
                         f"{kept}")
    return loss, norm


def train_loop(model, raw, opt, tok, tok_json, jsonl, args, run, step, history):
    """Steps from `step` to --stop-at (or --steps), with validation and a checkpoint every --eval-every steps and
    at the end. Returns the loss history. The host reads each step's numbers once the next step is queued."""
    cfg, saved, queued = args.cfg, step, None
    start, phase = phase_at(step, cfg)  # a phase's Validator (data.phase_at): this one's now (a bad record fails now)
    validators = {start: Validator(tok, phase, jsonl, raw.cfg)} if run.master else {}
    end = min(cfg.steps, args.stop_at or cfg.steps)
    loader = micro_batches(tok, cfg, raw.cfg, jsonl, step, run.rank, run.world, pin_memory=run.amp)
    flops_per_token = 6 * sum(p.numel() for p in raw.parameters() if p.requires_grad)  # matmuls, fwd + bwd
    bar = tqdm(range(step, end), initial=step, total=cfg.steps, disable=not run.master, desc="train")
    model.train()

    def report(queued):  # read a queued step into the history and the bar
        step, loss, norm, tokens, began, waited = queued
        loss, norm = read_step(step, loss, norm, saved, args)
        history.append(loss)
        took = time.perf_counter() - began  # its start to its reading: the GPU's pace once the host is ahead
        tps = tokens * run.world / took
        mfu = f" mfu {100 * flops_per_token * tps / (PEAK_FLOPS * run.world):.1f}%" if run.amp else ""
        bar.set_postfix_str(f"loss {loss:.4f} lr {lr_at(step, cfg):.2e} {tps:,.0f} tok/s{mfu} |g| {norm:.2f} "
                            f"data wait {100 * waited / took:.0f}%")
        return loss

    with stop_on_ctrl_c(not run.ddp and threading.current_thread() is threading.main_thread()) as stop:
        for step in bar:
            t0 = time.perf_counter()
            batches = [next(loader) for _ in range(cfg.grad_accum)]
            waited = time.perf_counter() - t0  # for the DataLoader workers: the synthetic chunks are made on the CPU
            before, queued = queued, (step, *train_step(step, model, raw, opt, batches, args, run), t0, waited)
            if before:
                report(before)
            start, phase = phase_at(step, cfg)
            due = (step + 1) % cfg.eval_every == 0 or step + 1 in (end, start + phase.steps)  # and a phase's last
            if not (due or stop):
                continue
            loss, queued = report(queued), None
            if due and run.master:
                if start not in validators:
                    validators[start] = Validator(tok, phase, jsonl, raw.cfg)
                tqdm.write(f"step {step + 1}: train loss {loss:.4f}, {validators[start](model, raw, run)}")
            if stop:
                tqdm.write(f"Ctrl-C: saving step {step + 1} (Ctrl-C again stops at once, without saving)")
            ckpt.save_run(raw, opt, step + 1, history, args, run, tok_json, phase)
            saved = step + 1
            if stop and step + 1 < end:
                raise SystemExit(f"stopped by Ctrl-C after step {saved}: the checkpoint is in {args.out}; "
                                 "--resume continues the run exactly")
    return history


def main(argv=None):
    args = get_args(argv)
    with RunLock(args.out, enabled=os.environ.get("RANK", "0") == "0"):  # one run a time; torchrun: the master's
        return train(args)


def train(args):
    began, run = time.perf_counter(), setup(args.device)
    if run.amp:  # this process only queues the GPU's work; its few host ops on small tensors (counts, padding
        torch.set_num_threads(1)  # checks) would otherwise wait for OpenMP threads the DataLoader workers keep busy
    torch.manual_seed(args.cfg.seed)
    if run.master:
        print_config(args)
    state = ckpt.prepare(args, run)
    if state:
        ckpt.check_resume(state, asdict(args.cfg), BOOKKEEPING, args, run.world, show, asdict(TrainConfig()))
    raw, tok, tok_json = load_model(args, run)
    model = distribute(raw, run, args.fsdp, args.compile)
    opt = make_optimizer(raw, args.cfg)
    step, history = 0, []
    if state:
        try:
            ckpt.load_optimizer(opt, args.out, state.get("optimizer", {}))
            for g in opt.param_groups:  # a checkpoint's groups may say foreach (written before AdamW was fused)
                g.update(fused=True, foreach=None)
        except ValueError as e:
            raise SystemExit(f"--resume: {e}")
        step, history = state["step"], state["history"]
        if run.master:
            print(f"resumed at step {step}")
    try:  # a bad --data record, found now or while its chunk is built (a damaged video): one line, no traceback
        jsonl = JsonlSamples(args.data, tok, args.cfg, args.video_root) if args.data else None
        history = train_loop(model, raw, opt, tok, tok_json, jsonl, args, run, step, history)
    except DataError as e:
        raise SystemExit(str(e))
    if run.master:
        print(f"done: loss {history[0]:.3f} -> {history[-1]:.3f}; checkpoint in {args.out}; this part took "
              f"{time.perf_counter() - began:.0f} s")
        if not args.data:  # teacher-forced validation reads fresh K/V where streaming reads reused ones (reuse.py)
            print(f"validation is teacher-forced; whether the score holds while streaming: python eval.py --model "
                  f"{args.out} --policies streaming --seconds 1800 --seed 200 --streams 30 --batch")
    finish(run)
    return history


if __name__ == "__main__":
    main()
