"""
The command line every script shares: a user's mistake costs one line, not a traceback and not a run.

- Parser: argparse whose errors are one line ("eval.py: error: --seconds must be >= 1, got 0 (see --help)"),
  without the usage block that would bury it.
- checked / at_least / device_name / HELD_OUT_SEED: argparse types that parse and range-check a value, so a bad
  number is refused before anything loads.
- unwritable / output_problem: whether an output path can be written (and, for a run's folder, is not the shipped
  model's), asked before the work that fills it (a typo in --out should not surface at the first checkpoint, an
  hour into a run).
- SHIPPED / default_model: the checkpoint that ships in this repository (checkpoints/tiny), found from the code's
  own folder, so `python /path/to/eval.py` works from anywhere, and `python train.py` is refused to write over it.
"""
import argparse
import math
import os
import tempfile

import torch

from world import SPLIT_SIZE

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "tiny")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad input: one line, without the long usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def checked(kind, ok, what):
    """An argparse type: kind(text), finite, and satisfying `ok`; else a one-line error saying it must be `what`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}")
        if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


def at_least(lo, kind=int):
    return checked(kind, lambda v: v >= lo, f">= {lo}")


# --seed of a held-out stream (eval.py, tools/demo.py, tools/swap_kv.py): an index into the eval split, world.split_seed
HELD_OUT_SEED = checked(int, lambda v: 0 <= v < SPLIT_SIZE, f"in [0, {SPLIT_SIZE})")


def device_name(text):
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}")
    return text


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


def output_problem(folder):
    """Why a run must not write into `folder`, or None: it is or holds checkpoints/ (the shipped model's home, which
    runs never write into), or it cannot be written."""
    if touches_shipped(folder):
        return f"{folder} is or holds checkpoints/, home of the shipped model, which runs never write into"
    return unwritable(folder)


def unwritable(path, folder=True):
    """Why `path` (a folder, or with folder=False a file) cannot be written, or None. Creates nothing: a refused
    run leaves no trace. It writes and removes a probe file in the nearest folder that exists on the way."""
    if not path or (not folder and path.endswith(os.sep)):
        return f"{path!r}: not a {'folder' if folder else 'file'} name"
    if folder and os.path.exists(path) and not os.path.isdir(path):
        return f"{path}: exists and is not a folder"
    if not folder and os.path.isdir(path):
        return f"{path}: is a folder, not a file"
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
