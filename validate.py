"""
Validation during training, teacher-forced on fixed chunks: the mean loss over the supervised tokens, and three
readings the mean loss hides. The first reply token of each second decides between commentary and silence (what
the stream's event metrics hinge on); the score numbers in goal sentences are the one thing the frames never show
(the model must read them from the previous text); a question about the whole stream at the end of a chunk tests
whether that previous text is read at all.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.nn.attention import SDPBackend, sdpa_kernel

from data import IGNORE, make_batch, view_of, with_positions
from layout import SILENCE
from processor import patchify_video
from reuse import forward_segments, segment_counts


def training_kernels(amp):
    """The context a training or validation forward runs in: bf16 autocast on a GPU (amp), and SDPA's kernels in
    this order: FlashAttention (causal chunks), memory-efficient (segments' padding masks), math. Not cuDNN, which
    PyTorch tries first on an H100: it builds a plan for every new sequence length, and the lengths of training
    batches change every step."""
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cuda", torch.bfloat16, enabled=amp))
    stack.enter_context(sdpa_kernel(order, set_priority=True))
    return stack


HOST = ("attention_mask", "video_grid_thw")  # read by the host: VLM.forward's padding checks, the tower's plan


def to_device(batch, device):
    """A batch (and its "then" part) on `device`, uint8 "video_frames" patchified there (data.collate). The
    attention mask and the frame grids stay on the host (pinned, as the DataLoader leaves them), where VLM.forward
    and the vision tower read them: read on the GPU, they would wait for all its queued work. A packed batch
    (data.unpack: every tensor a view of batch["flat"]) goes over in one copy, each tensor a view of it there; that
    copy lives while any of them does (its uint8 frames too, after patchify_video: ~0.2 GB for 64 chunks of 192 s)."""
    flat = batch.get("flat")
    if flat is None:
        return moved(batch, lambda v: v.to(device, non_blocking=True))
    there = flat.to(device, non_blocking=True)  # the whole batch, (bytes,) uint8

    def move(v):  # the same bytes, in the copy on the device
        if v.numel() and v.is_contiguous() and v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr():
            return view_of(there, v.dtype, v.shape, v.data_ptr() - flat.data_ptr())
        return v.to(device, non_blocking=True)  # empty, or put in (or reshaped) after unpacking
    return moved(batch, move)


def moved(batch, move):
    out = {k: moved(v, move) if isinstance(v, dict) else v if k in HOST else move(v)
           for k, v in batch.items() if k != "flat"}
    if "video_frames" in out:
        out["pixel_values_videos"] = patchify_video(out.pop("video_frames"))
    return out


def outputs(model, batch, device):
    """[(logits, labels, input_ids)] of a batch: one forward; or, for chunks cut into segments (data.py's
    collate_chunks), one forward a segment, each on the cache the ones before it leave (reuse.py). Nothing here
    waits for the GPU, so the host queues a whole training step ahead of it."""
    raw = getattr(model, "module", model)  # DDP's wrapped model
    if "then" in batch:
        return forward_segments(model, to_device(batch, device), segment_counts(batch, raw.cfg))
    host, batch = batch, to_device(batch, device)
    labels = batch.pop("labels")
    if isinstance(raw, FSDPModule) or "pixel_values_videos" not in batch or not hasattr(raw, "visual"):  # (FSDP:
        # the tower runs inside its forward; tests pass stand-in models)
        return [(model(**batch), labels, batch["input_ids"])]
    # the tower ahead of the forward, its output checked against the pads counted on the host: VLM.embed then
    # skips its own check, which reads the ids back from the GPU
    pads = int((host["input_ids"] == raw.cfg.video_token_id).sum())
    embeds = raw.visual(batch.pop("pixel_values_videos"), batch["video_grid_thw"])
    if embeds.shape[0] != pads:
        raise ValueError(f"{pads} <|video_pad|> tokens in the batch but its frames give {embeds.shape[0]} features")
    return [(model(**batch, video_embeds=embeds), labels, batch["input_ids"])]


def loss_sum(model, batch, device):
    """Sum of token cross-entropies over the supervised tokens, and their count, both 0-d tensors on the device
    (no host sync per segment: a training step reads neither until all its segments are queued)."""
    loss = count = 0
    for logits, labels, _ in outputs(model, batch, device):
        targets = labels[:, 1:]  # position i predicts token i + 1
        loss = loss + F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                      reduction="sum")
        count = count + (targets != IGNORE).sum()
    return loss, count


def first_token_hits(model, batch, device, silence_id, number_ids=()):
    """How often the argmax is right at the first reply token of a second, for event seconds and for quiet ones
    (the event/silence decision the commentary metrics hinge on, which the mean loss hides), and at the score
    numbers of goal sentences (the one thing the frames never show). Returns
    (event right, events, quiet right, quiet seconds, score tokens right, score tokens)."""
    out = [0] * 6
    for logits, labels, _ in outputs(model, batch, device):
        targets = labels[:, 1:]
        pred = logits[:, :-1].argmax(-1)
        first = (targets != IGNORE) & (labels[:, :-1] == IGNORE)  # the first supervised token of each second
        right = pred[first] == targets[first]
        event = targets[first] != silence_id
        score = torch.isin(targets, torch.tensor(list(number_ids), dtype=torch.long, device=targets.device))
        counts = (right[event].sum(), event.sum(), right[~event].sum(), (~event).sum(),
                  (pred[score] == targets[score]).sum(), score.sum())
        out = [o + int(c) for o, c in zip(out, counts)]
    return tuple(out)


def answer_right(model, batch, device, im_start_id):
    """Whether a one-chunk batch that ends with a question gets its whole answer right (teacher-forced argmax at
    every answer token), or None if the chunk asks none (data.chunk_question found it unanswerable)."""
    logits, labels, ids = outputs(model, batch, device)[-1]  # a question ends the chunk: its last part
    labels, ids = labels[0], ids[0]
    turns = (ids == im_start_id).nonzero().flatten().tolist()
    user, header = turns[-2], turns[-1]  # the last user turn and the assistant header after it
    if (ids[user:header] == model.cfg.video_token_id).any():  # the last second's turn: no question was asked
        return None
    pos = (labels != IGNORE).nonzero().flatten()
    pos = pos[pos > header]
    pred = logits[0].argmax(-1)
    return bool((pred[pos - 1] == labels[pos]).all())


class Validator:
    """Fixed validation chunks, made once: of the default world (or the first --data chunks) and, when training
    asks questions, ones that end with a question. Calling it reports the loss and the hits that matter."""

    def __init__(self, tok, cfg, jsonl, model_cfg):
        batch = lambda i, rate: with_positions(make_batch(tok, "eval", [i], cfg, question_rate=rate, jsonl=jsonl),
                                               model_cfg)
        self.val = [batch(i, 0.0) for i in range(cfg.eval_chunks)]
        asks = cfg.question_rate or getattr(cfg, "long_seconds", None)  # --long-seconds: streams end in questions
        self.val_q = [batch(i, 1.0) for i in range(cfg.eval_chunks)] if jsonl is None and asks else []
        self.silence_id, self.im_start_id = tok.encode(SILENCE)[0], tok.im_start_id
        self.number_ids = {ids[0] for n in range(100) if len(ids := tok.encode(f" {n}")) == 1}  # one-token scores
        if not self.number_ids:
            print("note: this tokenizer splits numbers, so validation counts no score numbers (0/0)")

    def __call__(self, model, raw, run):
        model.eval()
        with torch.no_grad(), training_kernels(run.amp):
            tot = [loss_sum(raw, b, run.device) for b in self.val]
            hits = [sum(x) for x in zip(*(first_token_hits(raw, b, run.device, self.silence_id, self.number_ids)
                                          for b in self.val))]
            answers = [answer_right(raw, b, run.device, self.im_start_id) for b in self.val_q]
        model.train()
        asked = sum(a is not None for a in answers)
        return (f"val loss {sum(l.item() for l, _ in tot) / sum(int(n) for _, n in tot):.4f}, first reply token right "
                f"on {hits[0]}/{hits[1]} event and {hits[2]}/{hits[3]} quiet seconds, score numbers right "
                f"{hits[4]}/{hits[5]}"
                + (f", questions answered {sum(a or 0 for a in answers)}/{asked}" if asked else ""))
