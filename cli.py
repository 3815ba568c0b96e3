"""
The command line every script shares: a user's mistake costs one line, not a traceback and not a run.

- Parser: argparse whose errors are one line ("eval.py: error: argument --seconds: must be >= 1, got 0 (see
  --help)"), without the usage block that would bury it.
- checked / at_least / device_name / HELD_OUT_SEED: argparse types that parse and range-check a value, so a bad
  number is refused before anything loads.
- unwritable / output_problem / file_problem: whether an output path can be written and is none of the run's inputs
  (inputs_of; safeio.clash: not an input after symlinks and hard links, not inside an input folder, not the shipped
  model's), asked before the work that fills it (a typo in --out should not surface at the first checkpoint, an
  hour into a run).
- SHIPPED / default_model: the checkpoint that ships in this repository (checkpoints/tiny), found from the code's
  own folder, so `python /path/to/eval.py` works from anywhere, and `python train.py` is refused to write over it.
- Results / table / hardware: results written as they come in (a JSON line each, flushed) and whole at the end
  (a temporary file, then a rename), the printed tables, the machine named beside every number.
- stop_on_ctrl_c: Ctrl-C finishes the step in progress instead of losing the work since the last save.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import re
import signal
import sys
import tempfile
import time

import torch

from safeio import clash, replace_file, write_atomic
from world import SPLIT_SIZE

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "tiny")


class Parser(argparse.ArgumentParser):
    """The scripts' parser: a mistake is one line, and an empty path (`--data ""`, from a shell variable never set)
    is a mistake, not the flag left out."""
    PATHS = ("out", "init", "data", "video_root", "video", "vtt", "jsonl", "model", "json", "activations", "authors")

    def error(self, message):
        """Bad input: one line, without the long usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        for name in self.PATHS:
            value = getattr(parsed, name, None)
            if value == "" or isinstance(value, list) and "" in value:
                self.error(f"--{name.replace('_', '-')}: an empty path")
        return parsed, rest


def checked(kind, ok, what):
    """An argparse type: kind(text), finite, and satisfying `ok`; else a one-line error saying it must be `what`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text[:40]!r}")
        if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text if len(text) < 60 else text[:40] + '...'}")
        return value
    return parse


def at_least(lo, kind=int):
    return checked(kind, lambda v: v >= lo, f">= {lo}")


def between(lo, hi, kind=int, what=""):
    """A number in [lo, hi] (the upper bound keeps a flag from allocating without end); the error says which
    bound was crossed, and `what` names where the limit is kept."""
    low, high = at_least(lo, kind), checked(kind, lambda v: v <= hi, f"at most {hi:,}{what}")

    def parse(text):
        low(text)  # raises with the lower bound's message
        return high(text)
    return parse


# --seed of a held-out stream (eval.py, tools/demo.py, tools/swap_kv.py): an index into the eval split, world.split_seed
HELD_OUT_SEED = checked(int, lambda v: 0 <= v < SPLIT_SIZE, f"in [0, {SPLIT_SIZE})")


def device_name(text):
    try:
        kind = torch.device(text).type
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}")
    if kind not in ("cpu", "cuda", "mps"):   # meta, xla, hpu, ...: devices this code does not run on
        raise argparse.ArgumentTypeError(f"{text!r}: runs here on cpu, cuda[:N] or mps")
    return text


def check_device(ap, device):
    """A --device this machine cannot use (no CUDA, no such GPU, no MPS): one line, model.check_device's reason."""
    if device:
        from model import check_device as usable   # here, not above: model imports layout, which imports this module
        try:
            usable(device)
        except ValueError as e:
            ap.error(f"--{e}")


def shown(path):
    """A path as a user would type it: relative to the working directory when it is under it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def default_model():
    """The shipped checkpoint when this repository has one, else what `python train.py` writes (out/tiny)."""
    return shown(SHIPPED) if os.path.isdir(SHIPPED) else "out/tiny"


def touches_shipped(path):
    """Whether `path` is the repository's checkpoints/ folder, anything in it, or a folder that holds it (a run
    writing there could replace or move the shipped model)."""
    home, real = os.path.realpath(os.path.dirname(SHIPPED)), os.path.realpath(path)
    return os.path.commonpath([real, home]) in (home, real)


def is_live(path):
    """A URL or a device (a camera): PyAV decides whether it is there, and frames arrive as they are made. Here, not
    in video.py which reads them, so that inputs_of can ask it (video.py imports layout.py, which imports this file)."""
    return bool(re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path)) or path.startswith("/dev/")


def inputs_of(args, *flags):
    """The input paths of a run: the values of `flags` (attribute names of args) that are set, e.g.
    inputs_of(args, "video", "model"); a live source (is_live: a URL, a camera) is no path."""
    paths = [getattr(args, f, None) for f in flags]
    return [p for p in paths if p and not is_live(p)]


def output_problem(folder, inputs=(), holds=True, results=False):
    """Why a run must not write into `folder`, or None: it is or holds checkpoints/ (the shipped model's home, which
    runs never write into), it is, is inside or (holds=True: a folder the run replaces) holds one of `inputs`, it
    cannot be written, or (results=True: a folder that gets results files, such as eval's stream.json) it holds a
    checkpoint, whose files those would replace."""
    if touches_shipped(folder):
        return f"{folder} is or holds checkpoints/, home of the shipped model, which runs never write into"
    if problem := clash(folder, inputs, holds):
        return problem
    if results and os.path.isfile(os.path.join(folder, "config.json")):
        return f"{folder} holds a checkpoint (config.json), whose files results written there could replace"
    return unwritable(folder)


def file_problem(path, inputs=()):
    """Why a run must not write the file `path`, or None: it is an input (after symlinks and hard links), lies
    inside an input folder or checkpoints/, or cannot be written."""
    return clash(path, inputs) or unwritable(path, folder=False)


def unwritable(path, folder=True):
    """Why `path` (a folder, or with folder=False a file) cannot be written, or None. Creates nothing: a refused
    run leaves no trace. It writes and removes a probe file in the nearest folder that exists on the way."""
    if not path or (not folder and path.endswith(os.sep)):
        return f"{path!r}: not a {'folder' if folder else 'file'} name"
    if folder and os.path.exists(path) and not os.path.isdir(path):
        return f"{path}: exists and is not a folder"
    if not folder and os.path.isdir(path):
        return f"{path}: is a folder, not a file"
    # a file is written beside its path and renamed onto it: never in the system's folders (/dev/stdout would be
    # replaced, not written to), never onto a device or a pipe (links followed)
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if not folder and (parent == "/dev" or parent.split(os.sep)[1:2] in (["proc"], ["sys"])   # (/dev/shm is fine)
                       or os.path.exists(path) and not os.path.isfile(path)):
        return f"{path}: is a device, a pipe or a link to one; outputs are files (renamed into place, not streamed)"
    if not folder and os.path.isfile(path):
        return None if os.access(path, os.W_OK) else f"{path}: exists and is read-only"
    where = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(where):  # the folders a write would make: check the one they would be made in
        if os.path.lexists(where):
            return f"{path}: cannot write there ({where} is a broken symlink)"
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        return f"{path}: cannot write there ({where} is a file, not a folder)"
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        return f"{path}: cannot write there ({e.strerror or e})"
    return None


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


def seconds_range(text):
    """'1800' -> (1800, 1800); '600:2200' -> (600, 2200): whole seconds, LO <= HI."""
    lo, colon, hi = text.partition(":")
    try:
        span = (int(lo), int(hi if colon else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or LO:HI, got {text!r}")
    if not 2 <= span[0] <= span[1] <= 100_000:
        raise argparse.ArgumentTypeError(f"seconds must be in [2, 100000] with LO <= HI, got {text!r}")
    return span


def adam_betas(text):
    """'0.9,0.999' -> (0.9, 0.999)"""
    try:
        betas = tuple(float(b) for b in text.split(","))
    except ValueError:
        betas = ()
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise argparse.ArgumentTypeError(f"expected B1,B2 with each in [0, 1), got {text!r}")
    return betas


# -----------------------------------------------------------------------------
# Results and interruptions


def hardware():
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{dev}, torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}"


def table(rows, cols=None):
    cols = cols or list(dict.fromkeys(c for r in rows for c in r))
    show = lambda v: "-" if v is None else f"{v}"
    widths = [max(len(c), *(len(show(r.get(c))) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(show(r.get(c)).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


class Results:
    """What a task measures, kept as it goes: log(**row) appends a JSON line to OUT/NAME.jsonl and flushes it (an
    interrupted run keeps every line written); save(summary) writes OUT/NAME.json whole (a temporary file, then a
    rename: a reader never sees half a file)."""

    def __init__(self, out, name):
        # (the commands check their --out with their inputs first; this stops any that did not, in one line)
        if problem := (output_problem(out, holds=False, results=True) or file_problem(os.path.join(out, name + ".json"))
                       or file_problem(os.path.join(out, name + ".jsonl"))):
            sys.exit(f"error: {problem}")
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, name)
        self.lines = replace_file(self.path + ".jsonl")  # a new file: a symlink planted there is replaced, not followed
        self.last = None  # the last row logged (where an interrupted run stopped)

    @classmethod
    def at(cls, path):
        """Results for a --json FILE.json flag: the summary there, the lines in FILE.jsonl."""
        stem = cls.files_at(path)[0][:-5]
        return cls(os.path.dirname(os.path.abspath(stem)), os.path.basename(stem))

    @staticmethod
    def files_at(path):
        """The files Results.at(path) writes: FILE.json and FILE.jsonl."""
        stem = path[:-5] if path.endswith(".json") else path
        return stem + ".json", stem + ".jsonl"

    def log(self, **row):
        self.last = row
        self.lines.write(json.dumps(row) + "\n")
        self.lines.flush()

    def save(self, summary):
        with write_atomic(self.path + ".json") as f:
            json.dump(summary, f, indent=1)
        self.lines.close()
        print(f"wrote {self.path}.json (and {os.path.basename(self.path)}.jsonl, written as it went)")


@contextlib.contextmanager
def stop_on_ctrl_c(enabled):
    """Ctrl-C (SIGINT) finishes the step in progress, saves and stops, instead of losing the steps since the last
    checkpoint (a second Ctrl-C stops at once). One process in its main thread only: under torchrun every rank
    would have to agree. The handler only raises a flag; the loop reads it between steps. A SIGINT within two
    seconds of the first is the same one sent twice, not a second Ctrl-C: GNU `timeout -s INT` signals the process and
    then its process group, and under load the two can reach the handler one by one (`timeout --foreground` sends
    one)."""
    stop = []

    def handler(signum, frame):
        if stop and time.monotonic() - stop[0] > 2:
            raise KeyboardInterrupt
        stop.append(time.monotonic())
    previous = signal.signal(signal.SIGINT, handler) if enabled else None
    try:
        yield stop
    finally:
        if enabled:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
