"""
Training checkpoints that are whole or absent, with a train state that needs no pickle.

A checkpoint folder (train.py's --out) holds the model in the official Qwen2.5-VL layout (config.json,
model.safetensors and tokenizer.json, written by VLM.save_pretrained), stream.json (the token layout it was
trained with) and the train state for a resume: train_state.json (step, loss history, settings, the optimizer's
hyper-parameters) and optimizer.safetensors (its moment tensors). Nothing is pickled, so loading a checkpoint
from elsewhere cannot run code, as unpickling a torch.save file can.

A save writes every file into .tmp-NAME beside the folder NAME, then swaps it in with two renames (the old
folder to .old-NAME, the new one to NAME) and deletes the old one. Each rename is atomic, so a process killed at
any moment leaves the previous checkpoint or the new one, each whole. clean_leftovers, run at the next start and
before each save, puts the previous checkpoint back if the kill fell between the two renames, and deletes the
rest. (A folder swap rather than file-by-file renames: a model from one step beside the optimizer state of
another would resume into a run that never happened.)

Then train.py's side: what --out must hold for a fresh run (no checkpoint, unless --overwrite) or for --resume
(a readable train state), and a save of a whole run. The last section is the serving side (stream.py, eval.py,
serve.py, tools/): a checkpoint folder read with the stream.json it is served with, every failure one line.
"""
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flexprefill import enable_flexprefill
from layout import StreamLayout
from model import VLM, pick_device_dtype
from processor import Tokenizer, read_json
from quantize import ABOUT, fp8_problem, quantize_fp8
from safeio import keep_mode

STATE, OPTIMIZER = "train_state.json", "optimizer.safetensors"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "stream.json", STATE, OPTIMIZER)


def beside(out, kind):
    """The hidden folder beside `out` for a save in progress (kind 'tmp') or the checkpoint it replaces ('old')."""
    parent, name = os.path.split(os.path.abspath(out))
    return os.path.join(parent, f".{kind}-{name}")


def clean_leftovers(out):
    """Undo what a killed save left: if it died between the two renames of swap_in (`out` gone), the previous
    checkpoint goes back in place; then the half-written folder and the replaced one are deleted. A symlink
    planted at either name is removed, never followed (saves never made one)."""
    old, tmp = beside(out, "old"), beside(out, "tmp")
    if not os.path.exists(out) and os.path.isdir(old) and not os.path.islink(old):
        os.rename(old, out)
    for path in (tmp, old):
        if os.path.islink(path):
            os.unlink(path)
        shutil.rmtree(path, ignore_errors=True)


def holds_checkpoint(out):
    return any(os.path.exists(os.path.join(out, f)) for f in FILES)


def link_or_copy(src, dst):
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def swap_in(tmp, out):
    """Replace folder `out` by the complete folder `tmp`: rename the old one away, rename the new one in, delete
    the old. Other files a user keeps in `out` are hard-linked (or copied) into the new folder first."""
    old = beside(out, "old")
    if os.path.isdir(out):
        for entry in set(os.listdir(out)) - set(FILES):
            src, dst = os.path.join(out, entry), os.path.join(tmp, entry)
            if os.path.isdir(src) and not os.path.islink(src):
                shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
            else:
                link_or_copy(src, dst)
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def full(t):
    """A tensor whole: for an FSDP-sharded one a collective that every rank must join."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def optimizer_state(opt):
    """opt.state_dict() as (tensors for safetensors, named '{param index}.{name}'; JSON: the param groups and any
    non-tensor entries). Under FSDP every rank must call it (full)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for i, entries in sd["state"].items():
        for name, v in entries.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{name}"] = full(v).detach().cpu().contiguous()
            else:
                scalars[f"{i}.{name}"] = v
    return tensors, dict(param_groups=sd["param_groups"], scalars=scalars)


def load_optimizer(opt, out, meta):
    """The inverse of optimizer_state, from folder `out` (meta: the JSON half). Under FSDP each tensor is sharded
    like its parameter. Raises ValueError, in one line, for a truncated, foreign or mismatched file."""
    path = os.path.join(out, OPTIMIZER)
    params = [p for g in opt.param_groups for p in g["params"]]
    try:
        tensors = load_file(path)  # plain tensors: reading them runs no code
        state = {}
        for key, v in [*tensors.items(), *meta["scalars"].items()]:
            i, name = key.split(".", 1)
            p = params[int(i)]
            if torch.is_tensor(v) and hasattr(p, "device_mesh") and v.dim():
                from torch.distributed.tensor import distribute_tensor
                v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            state.setdefault(int(i), {})[name] = v
        groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
        opt.load_state_dict(dict(state=state, param_groups=groups))
    except Exception as e:  # safetensors, index and shape errors alike: name the file, not a traceback
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot load the optimizer state {path} ({type(e).__name__}: {first})") from None


def read_state(out):
    """The JSON half of the train state in folder `out`. Raises ValueError (one line) when there is none or it is
    not JSON; an older train_state.pt (a pickle) is named and never loaded."""
    path = os.path.join(out, STATE)
    if not os.path.isfile(path):
        old = os.path.isfile(os.path.join(out, "train_state.pt"))
        raise ValueError(f"no {STATE} in {out}" + (" (its train_state.pt is an older pickle format, never "
                                                  "loaded: unpickling can run code)" if old else ""))
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"cannot read {path} ({e or 'nested too deeply'})") from None
    # what a resume reads (save_run writes them): a state that lacks one would restart or crash the run
    kinds = dict(step=int, history=list, processes=int, config=dict)
    bad = [k for k, kind in kinds.items() if not isinstance(state, dict) or type(state.get(k)) is not kind]
    if not bad and (state["step"] < 0 or state["processes"] < 1
                    or not all(isinstance(x, (int, float)) for x in state["history"])):
        bad = ["step >= 0, processes >= 1, history of numbers"]
    if bad:
        raise ValueError(f"{path} is not a train state this code wrote (wants {', '.join(bad)}); a fresh run needs "
                         "--overwrite")
    return state


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def save(out, model, model_state, optimizer, tok_json, layout, notes, state):
    """Write a whole checkpoint into folder `out`, atomically: `model` (a VLM) with the full `model_state`,
    tokenizer.json from the text `tok_json`, stream.json from `layout` (a layout.StreamLayout) and the dict
    `notes`, the train state from `state` (JSON) and `optimizer` (optimizer_state's pair)."""
    clean_leftovers(out)
    tmp = beside(out, "tmp")
    try:
        os.makedirs(tmp)
        keep_mode(out, tmp)  # the new folder replaces `out`: a private (0700) --out stays private
        model.tokenizer_path = None  # tokenizer.json comes from tok_json
        model.save_pretrained(tmp, model_state)
        with open(os.path.join(tmp, "tokenizer.json"), "w") as f:
            f.write(tok_json)
        layout.save(tmp, **notes)
        tensors, meta = optimizer
        save_file(tensors, os.path.join(tmp, OPTIMIZER))
        write_json(os.path.join(tmp, STATE), {**state, "optimizer": meta})
        # safetensors writes 0600 (a private temp file, renamed); give it the mode open() gave the train state
        os.chmod(os.path.join(tmp, OPTIMIZER), os.stat(os.path.join(tmp, STATE)).st_mode & 0o777)
    except (OSError, SafetensorError) as e:   # a full disk, a folder gone: one line, the last checkpoint kept
        shutil.rmtree(tmp, ignore_errors=True)
        what = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise SystemExit(f"cannot save the checkpoint beside {out} ({what}); {out} is as it was")
    swap_in(tmp, out)


# -----------------------------------------------------------------------------
# train.py's runs: args (out, resume, overwrite, init, data, cfg) and run (master, ddp, world) as train.py has them


def stream_layout(cfg):
    """The layout a run trains with (its stream.json), for the streaming loop to reproduce: the previous-text cut
    and the frame pixels of the chunks; the system prompt and fps as layout.py has them. The vision window is
    --vision-window (16 s, the streaming default) unless the chunks are shorter: a model never trained on more
    seconds of rounds than a chunk holds breaks down on longer ones (a tiny model of 4 s chunks: event F1 ~0.2-0.5
    with a 16 s window, ~0.97 with 4 s, on held-out streams). A run on segments (--segment-seconds N) is served
    evicting every N s, as its segments did, so that it streams on the kind of K/V it was trained on."""
    return StreamLayout(text_sink=cfg.text_sink, text_window=cfg.text_window, min_pixels=cfg.min_pixels,
                        max_pixels=cfg.max_pixels, vision_window=min(cfg.vision_window, cfg.chunk_seconds),
                        evict_every=cfg.segment_seconds or 1)


def data_contents(path):
    """What --resume compares of a --data file besides its path: its size and a hash of its first and last MiB (the
    whole file can be gigabytes; an edited or replaced file almost always changes one of the three)."""
    size, h = os.path.getsize(path), hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{size} bytes, sha256 of its ends {h.hexdigest()[:16]}"


def save_run(model, opt, step, history, args, run, tok_json, phase=None):
    """A run's checkpoint after `step`, swapped into args.out whole (save), its stream.json the layout of the
    settings `phase` the step trained with (default args.cfg; data.phase_at). Under FSDP every rank takes part in
    gathering the full tensors; only the master writes."""
    model_state = {k: full(v) for k, v in model.state_dict().items()}
    optimizer = optimizer_state(opt)
    if run.master:
        state = dict(step=step, history=history, processes=run.world, config=asdict(args.cfg),
                     init=args.init and os.path.abspath(args.init), data=args.data and os.path.abspath(args.data),
                     data_contents=args.data and data_contents(args.data),
                     video_root=args.video_root and os.path.abspath(args.video_root))
        trained = phase or args.cfg  # the settings of this step's phase: its layout, its synthetic world
        notes = dict(frame_size=trained.frame_size, train_event_rate=trained.event_rate,
                     train_goal_rate=trained.goal_rate)
        save(args.out, model, model_state, optimizer, tok_json, stream_layout(trained), notes, state)


def out_unfit(args):
    """Why a run must not write args.out, or None: a save is written beside --out, then renamed into it, so --out
    and its folder must be writable; and --out must not be, hold or sit inside an input (the data, its seeks file,
    the videos, the --init weights) or the shipped checkpoint."""
    from cli import inputs_of, output_problem, unwritable
    from records import seeks_path
    inputs = inputs_of(args, "data", "video_root") + ([args.init] if args.init and not args.resume else []) + (
        [seeks_path(args.data)] if args.data else [])
    if os.path.islink(args.out):  # a save renames a new folder onto it: the link would go, its target stay as it was
        return f"{args.out} is a link: a save swaps a new folder in at that name; give the folder itself"
    for path in (beside(args.out, "tmp"), beside(args.out, "old")):  # a save's own names (clean_leftovers)
        if os.path.lexists(path) and not os.path.islink(path) and not os.path.isdir(path):
            return f"{args.out}: {path} is in the way of a save (a file saves never make); move it"
    return output_problem(args.out, inputs) or unwritable(os.path.dirname(os.path.abspath(args.out)))


def out_problem(args):
    """Why args.out does not suit the run, or None: a checkpoint that a fresh run would replace unasked, or no
    readable train state for --resume."""
    if args.resume:
        try:
            read_state(args.out)
        except ValueError as e:
            return f"--resume: {e}"
    elif not args.overwrite and holds_checkpoint(args.out):
        return f"--out {args.out} holds a checkpoint: pass --resume to continue it or --overwrite to replace it"
    return None


def prepare(args, run):
    """Before a run loads or writes anything: repair what a killed save left (the master), check args.out again
    (one-line SystemExit), and return the train state to resume, or None."""
    if run.master:
        clean_leftovers(args.out)
    if run.ddp:
        dist.barrier()
    if out_problem(args):
        raise SystemExit(out_problem(args))
    return read_state(args.out) if args.resume else None


def check_resume(state, config, bookkeeping, args, world, show=str, defaults=None):
    """A resumed run must compute what the interrupted one would have: every setting a step depends on (the
    optimisation, the data, the model's source, the processes) must be the one the run started with. `config`
    is the run's settings as a dict; `bookkeeping` names the ones that may change (how often to validate, ...);
    `defaults` the values of settings newer than a saved run (it ran without them, as with their default). A
    setting the run used that has since been removed is refused; one it left off (0, none) is not."""
    now = json.loads(json.dumps(config))  # tuples as lists, as the saved ones
    old = {**json.loads(json.dumps(defaults or {})), **state.get("config", {})}
    try:
        changed = [f"--{k.replace('_', '-')} {show(old.get(k), k)} -> {show(v, k)}"
                   for k, v in now.items() if k not in bookkeeping and old.get(k) != v]
        changed += [f"--{k} {state[k]} -> {mine}" for k in ("init", "data")
                    if state[k] != (mine := getattr(args, k) and os.path.abspath(getattr(args, k)))]
        # (a state saved before these were kept has neither: its run is taken at its word)
        if "video_root" in state and state["video_root"] != (mine := args.video_root and
                                                             os.path.abspath(args.video_root)):
            changed.append(f"--video-root {state['video_root']} -> {mine}")
        if state.get("data_contents") and args.data and state["data_contents"] != (mine := data_contents(args.data)):
            changed.append(f"--data {args.data}'s contents ({state['data_contents']} -> {mine})")
        if state["processes"] != world:
            changed.append(f"processes {state['processes']} -> {world}")
        gone = [f"--{k.replace('_', '-')} {show(v, k)}" for k, v in state["config"].items()
                if k not in now and v not in (0, None, False)]  # a setting since removed, used: it cannot continue
    except (KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"--resume: {args.out}/{STATE} is not a train state of this train.py ({e!r})")
    if changed:
        raise SystemExit(f"--resume with other settings than the run in {args.out} used: {', '.join(changed)}")
    if gone:
        raise SystemExit(f"--resume: the run in {args.out} used {', '.join(gone)}, which this train.py no longer has")
    if args.stop_at is not None and args.stop_at <= state["step"]:
        raise SystemExit(f"--stop-at {args.stop_at}: the checkpoint in {args.out} is already at step {state['step']}")

# -----------------------------------------------------------------------------
# Serving: a checkpoint folder and the layout it is served with


def checkpoint_settings(path):
    """The layout a checkpoint folder was trained with (stream.json, written by train.py: the windows, ...), or {}
    with a notice; checked before anything heavy loads. Exits with how to make a checkpoint when there is none."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        hint = " (pass the folder, not a file in it)" if os.path.isfile(path) else ""
        sys.exit(f"no checkpoint at {path}{hint}: make one with `python train.py` (or pass --model DIR)")
    stream_json = os.path.join(path, "stream.json")
    if not os.path.isfile(stream_json):
        print(f"{path} has no stream.json: serving with the default layout (layout.py; `python layout.py {path}` "
              "writes one)")
        return {}
    try:
        settings = read_json(stream_json)
        StreamLayout.from_dict(settings, stream_json)  # fails here, naming the file, if its values do not fit
    except (OSError, ValueError, TypeError) as e:
        sys.exit(f"error: {e}")
    return settings


def check_vocab(path, tok, cfg):
    """A ValueError naming the folder when its tokenizer holds ids past the model's embedding table (they would index
    out of it) or the config's vision placeholders are not the tokenizer's."""
    if len(tok) > cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer.json has {len(tok):,} tokens, more than config.json's vocab_size "
                         f"{cfg.vocab_size:,}")
    if (cfg.image_token_id, cfg.video_token_id) != (tok.image_pad_id, tok.video_pad_id):
        raise ValueError(f"{path}: config.json's image/video token ids ({cfg.image_token_id}, {cfg.video_token_id}) "
                         f"are not the tokenizer's <|image_pad|>/<|video_pad|> ({tok.image_pad_id}, "
                         f"{tok.video_pad_id})")


def load_checkpoint(path, device=None, flexprefill=False, settings=None, fp8=False):
    """(model, tokenizer, settings) from a checkpoint folder; settings as checkpoint_settings reads them (or as
    given, when the caller has read them already). fp8: every Linear in FP8 (quantize.py), where it runs."""
    settings = checkpoint_settings(path) if settings is None else settings
    try:  # a bad file or device is the user's to fix: one line that names it, no traceback
        device, dtype = pick_device_dtype(device)
        model = VLM.from_pretrained(path, device=device, dtype=dtype)
        tok = Tokenizer.from_file(path)
        check_vocab(path, tok, model.cfg)
    except (OSError, ValueError, TypeError) as e:
        sys.exit(f"error: {e}")
    if flexprefill:
        enable_flexprefill(model)
    if fp8:
        if problem := fp8_problem(model.device):
            sys.exit(f"error: {problem}")
        quantize_fp8(model)
        print(ABOUT)
    return model, tok, settings
