"""
Qwen2.5-VL input processing: pixels -> patch rows, chat messages -> prompt string -> token ids.

The ideas, in the order the data flows:

1. smart_resize picks an output size whose sides are multiples of 28 (= 14 px patch * 2x2 merge), keeps the
   aspect ratio as well as it can, and keeps the pixel count inside [min_pixels, max_pixels]. Every image thus
   becomes a whole number of 2x2 patch blocks, and each block becomes one LLM token.
2. Images are resized with PIL bicubic and normalized with the CLIP mean/std in float32. An image is treated as a
   2-frame clip (the frame duplicated), because the vision tower's patch embedding is a Conv3d with a temporal
   kernel of 2. A video's frames are paired (0,1), (2,3), ...; an odd count repeats the last frame.
3. Patchify: each 2 x 3 x 14 x 14 tube becomes one row of 1176 numbers. Rows come in *merge-block order* (the 4
   patches of every 2x2 block are adjacent), so the merger later fuses 4 consecutive rows into one token.
4. The chat layout (Qwen2-VL chat_template) puts one <|image_pad|> per image; the processor then repeats the k-th
   <|image_pad|> grid_t*grid_h*grid_w/4 times, so the text holds one placeholder id per merged vision token.
   Special tokens are atomic "added tokens" of tokenizer.json; no BOS is prepended.

References: the Qwen2.5-VL report (arXiv 2502.13923), the published checkpoints' tokenizer.json and
preprocessor_config.json, and qwen-vl-utils. Parity target (tests/test_processor.py) is transformers 4.57's
slow `Qwen2VLImageProcessor` (PIL resize). The torchvision "fast" processor (resize on uint8
tensors with antialias, fused (x - 255*mean)/(255*std)) gives pixels that differ by a few LSB; we do not use it
because torchvision is not a dependency here. RGBA images are composited over white, like qwen-vl-utils (which
produced the model's training inputs) and HF's video path; HF 4.57's image path instead drops alpha.
"""

import ctypes
import functools
import json
import math
import os

import tokenizers
import torch
from einops import rearrange
from PIL import Image
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: one LLM token covers FACTOR x FACTOR pixels
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28  # published preprocessor_config.json: 3136, 12845056
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28  # HF video defaults / qwen-vl-utils
MAX_JSON_BYTES = 16 << 20  # read_json: config.json and stream.json are a few KB

# Qwen2.5 added tokens, in id order starting at 151643 (as in the published tokenizer.json). The first 14 are
# "special" (skipped by decode(skip_special=True)); tool-call and fill-in-the-middle tokens are ordinary ones.
QWEN_FIRST_SPECIAL_ID = 151643
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN_OTHER_ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
DEFAULT_SYSTEM = "You are a helpful assistant."

# -----------------------------------------------------------------------------
# pixels


class FrameError(ValueError):
    """Frames the processor cannot take (an empty side, a side 200 times the other, a second whose frames differ
    in size): the video's fault, not the caller's, so readers of files can name the file and go on."""


def smart_resize(height, width, factor=FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """(h, w) -> (h', w'), both multiples of factor, h'*w' within [min_pixels, max_pixels]."""
    if height <= 0 or width <= 0:
        raise FrameError(f"image has an empty side: {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise FrameError(f"aspect ratio must be at most 200, got {max(height, width) / min(height, width)}")
    # Python's round is half-to-even; rounding half-up changes the grid at exact .5 boundaries
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb_image(x):
    """PIL image (any mode: 16-bit grey, palette, CMYK, grey/RGB with alpha, ...), or a uint8 tensor/array
    (H,W,3|4) or (H,W) -> PIL RGB image; alpha is composited over white."""
    if hasattr(x, "__array_interface__") and not isinstance(x, Image.Image):
        x = torch.as_tensor(x)  # a numpy array (numpy is installed if the caller made one)
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8 or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (3, 4)):
            raise TypeError(f"expected a uint8 tensor of shape (H,W,3), got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous().cpu()
        mode = "L" if x.ndim == 2 else ("RGB" if x.shape[2] == 3 else "RGBA")
        # copy the raw bytes straight into PIL: no numpy dependency (torch tensors lack the buffer protocol)
        x = Image.frombytes(mode, (x.shape[1], x.shape[0]), ctypes.string_at(x.data_ptr(), x.numel()))
    if not isinstance(x, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 (H,W,3) tensor, got {type(x).__name__}")
    if x.mode == "I" or x.mode.startswith("I;16"):
        # 16-bit grey (a 16-bit PNG opens as I;16 or I): PIL's own conversion clips at 255, so anything above
        # 1/256 of full scale would come out white. Scale 0..65535 to 0..255 (x/257, rounded) first.
        x = x.convert("I").point(lambda v: v * (1 / 257) + 0.5).convert("L")
    if x.mode in ("RGBA", "LA", "PA") or (x.mode == "P" and "transparency" in x.info):
        x = x.convert("RGBA")
        out = Image.new("RGB", x.size, (255, 255, 255))
        out.paste(x, mask=x.getchannel("A"))  # same blend as qwen-vl-utils' to_rgb
        return out
    return x if x.mode == "RGB" else x.convert("RGB")


def _resize_to_uint8(img, height, width):
    """PIL RGB image -> resized (height, width) uint8 tensor [H, W, 3]."""
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)  # PIL size is (w, h)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)


@functools.cache
def normalization(device):
    """IMAGE_MEAN and IMAGE_STD as float32 tensors on `device`, made once: a copy to a GPU made at every call
    would wait for its queue (training patchifies on the GPU while earlier steps run)."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device) for v in (IMAGE_MEAN, IMAGE_STD))


def _patchify(frames):
    """uint8 frames [F, H, W, 3] (F even) -> float32 patch rows [F/2 * H/14 * W/14, 1176] in merge-block order,
    on the frames' device (the same IEEE operations, so the same bits, on a GPU)."""
    # Rescale then normalize exactly as the HF slow processor does, so the bits match: x*(1/255) in float64,
    # cast to float32, then (x - mean) / std in float32. (The fused (x-255m)/(255s) of the fast path can differ
    # in the last ulp.)
    x = (frames.to(torch.float64) * (1 / 255)).to(torch.float32)
    mean, std = normalization(x.device)
    x = (x - mean) / std
    # Row r = ((t*hb_n + hb)*wb_n + wb)*4 + mh*2 + mw; column = ((c*2 + tp)*14 + py)*14 + px.
    # The source pixel of (t, tp, hb, mh, py, wb, mw, px) is frame 2t+tp, y=(2hb+mh)*14+py, x=(2wb+mw)*14+px.
    return rearrange(
        x, "(t tp) (hb mh py) (wb mw px) c -> (t hb wb mh mw) (c tp py px)",
        tp=TEMPORAL_PATCH_SIZE, mh=MERGE_SIZE, mw=MERGE_SIZE, py=PATCH_SIZE, px=PATCH_SIZE,
    ).contiguous()


def preprocess_images(images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """One image or a list -> (pixel_values f32 [sum t*h*w, 1176], image_grid_thw int64 [n, 3])."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    rows, grids = [], []
    for image in images:
        img = to_rgb_image(image)
        h, w = smart_resize(img.height, img.width, FACTOR, min_pixels, max_pixels)
        frame = _resize_to_uint8(img, h, w)
        # an image is a 2-frame clip of itself, so the Conv3d temporal kernel sees the same frame twice
        rows.append(_patchify(frame.unsqueeze(0).expand(TEMPORAL_PATCH_SIZE, -1, -1, -1)))
        grids.append([1, h // PATCH_SIZE, w // PATCH_SIZE])
    if not rows:
        return torch.zeros(0, 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE**2), torch.zeros(0, 3, dtype=torch.long)
    return torch.cat(rows), torch.tensor(grids, dtype=torch.long)


def resize_video(frames, fps=2.0, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS):
    """The CPU half of preprocess_video: frames resized (PIL bicubic) to uint8 [F', h, w, 3], F' even, with the
    grid (1, 3) and seconds per temporal patch (1,). A streaming loop can run it for the next second on a thread
    (PIL releases the GIL) while the GPU works on this one."""
    if isinstance(frames, torch.Tensor) and frames.ndim == 4:
        frames = list(frames.unbind(0))
    if isinstance(frames, (Image.Image, torch.Tensor)) or not hasattr(frames, "__len__"):
        raise TypeError(f"a video is a list of frames or a uint8 tensor [F,H,W,3], got {type(frames).__name__}")
    if len(frames) == 0:
        raise FrameError("empty video: no frames")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    imgs = [to_rgb_image(f) for f in frames]
    if len({im.size for im in imgs}) != 1:
        raise FrameError(f"video frames differ in size: {sorted({im.size for im in imgs})} (W, H)")
    h, w = smart_resize(imgs[0].height, imgs[0].width, FACTOR, min_pixels, max_pixels)
    clip = torch.stack([_resize_to_uint8(im, h, w) for im in imgs])  # [F, h, w, 3] uint8
    if len(imgs) % TEMPORAL_PATCH_SIZE:  # pair frames (2k, 2k+1); an odd count repeats the last frame
        clip = torch.cat([clip, clip[-1:].expand(TEMPORAL_PATCH_SIZE - len(imgs) % TEMPORAL_PATCH_SIZE, -1, -1, -1)])
    grid = torch.tensor([[clip.shape[0] // TEMPORAL_PATCH_SIZE, h // PATCH_SIZE, w // PATCH_SIZE]])
    # one temporal patch spans 2 sampled frames, i.e. 2/fps seconds; M-RoPE uses it to place time positions
    return clip, grid, torch.tensor([TEMPORAL_PATCH_SIZE / fps], dtype=torch.float32)


def preprocess_video(frames, fps=2.0, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS, device=None):
    """
    One video (a list of PIL frames, or a uint8 tensor [F, H, W, 3]) sampled at `fps` ->
    (pixel_values_videos f32 [t*h*w, 1176], video_grid_thw int64 [1, 3], second_per_grid_ts f32 [1]).
    device: where the pixel values are made (the resize stays on the CPU; the uint8 frames travel, 4x smaller).
    """
    clip, grid, secs = resize_video(frames, fps, min_pixels, max_pixels)
    return patchify_video(clip, device), grid, secs


def patchify_video(clip, device=None):
    """The device half of preprocess_video: uint8 [F', h, w, 3] -> normalised patches f32 [t*h*w, 1176]."""
    return _patchify(clip.to(device) if device is not None else clip)


# -----------------------------------------------------------------------------
# tokens


def build_tokenizer(texts, vocab_size, qwen_ids=False):
    """
    Train a tiny byte-level BPE on `texts` (vocab_size counts the 256 byte tokens plus merges) and append the
    22 Qwen2.5 added tokens. With qwen_ids=True the model vocab is padded with unreachable filler entries so the
    added tokens get the real ids 151643.. (at the cost of a ~5 MB tokenizer.json); otherwise they follow the BPE
    vocab. Returns a `tokenizers.Tokenizer`; save it with `.save(dir + '/tokenizer.json')`.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()  # Qwen2 normalizes to NFC
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # Add the tokens through the JSON form, which lets us choose their ids.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    first = len(vocab)
    if qwen_ids:
        if first > QWEN_FIRST_SPECIAL_ID:
            raise ValueError(f"BPE vocab ({first}) is larger than {QWEN_FIRST_SPECIAL_ID}")
        vocab.update({f"<|nanostream_filler_{i}|>": i for i in range(first, QWEN_FIRST_SPECIAL_ID)})
        first = QWEN_FIRST_SPECIAL_ID
    names = QWEN_SPECIAL_TOKENS + QWEN_OTHER_ADDED_TOKENS
    spec["added_tokens"] = [
        dict(id=first + i, content=name, single_word=False, lstrip=False, rstrip=False, normalized=False,
             special=name in QWEN_SPECIAL_TOKENS)
        for i, name in enumerate(names)
    ]
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` (Qwen2 byte-level BPE) with the Qwen special ids by name."""

    SPECIALS = dict(endoftext="<|endoftext|>", im_start="<|im_start|>", im_end="<|im_end|>",
                    vision_start="<|vision_start|>", vision_end="<|vision_end|>",
                    image_pad=IMAGE_PAD, video_pad=VIDEO_PAD)

    def __init__(self, tok):
        self.tok = tok
        missing = [s for s in self.SPECIALS.values() if tok.token_to_id(s) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the Qwen special token(s) {missing}; they must be added tokens")
        for name, s in self.SPECIALS.items():  # self.im_start_id, self.image_pad_id, ...
            setattr(self, f"{name}_id", tok.token_to_id(s))
        self.pad_id = self.endoftext_id  # Qwen pads with <|endoftext|>
        self.stop_ids = [self.im_end_id, self.endoftext_id]  # generation stops on either (Qwen's generation_config)

    @classmethod
    def from_file(cls, path):
        """path: a tokenizer.json, or a folder holding one."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (a checkpoint folder holds its tokenizer.json; "
                                    "`python train.py` writes one)")
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception whose text lacks the file name
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(tok)

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        # Added tokens (<|im_start|>, <|image_pad|>, ...) are split out before BPE, so each is one atomic id.
        # Qwen adds no BOS/EOS, hence add_special_tokens=False (a no-op for Qwen's own tokenizer.json).
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special=False):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        return self.tok.decode(ids, skip_special_tokens=skip_special)


# -----------------------------------------------------------------------------
# chat layout and the full processor


def build_prompt(messages, add_generation_prompt=True, add_vision_id=False):
    """
    Render messages with the Qwen2-VL chat_template (of the published tokenizer_config.json). A message is
    {"role": str, "content": str or list of {"type": "image"|"video"|"text", ...}}; each image/video item becomes
    one vision_start/pad/vision_end triple.
    """
    out, n_images, n_videos = [], 0, 0
    for i, msg in enumerate(messages):
        if i == 0 and msg["role"] != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
        out.append(f"<|im_start|>{msg['role']}\n")
        content = msg["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for item in items:  # no separator between items, as in the template
            kind = item.get("type")
            if kind == "image" or "image" in item or "image_url" in item:
                n_images += 1
                out.append(f"Picture {n_images}: " if add_vision_id else "")
                out.append(f"<|vision_start|>{IMAGE_PAD}<|vision_end|>")
            elif kind == "video" or "video" in item:
                n_videos += 1
                out.append(f"Video {n_videos}: " if add_vision_id else "")
                out.append(f"<|vision_start|>{VIDEO_PAD}<|vision_end|>")
            elif "text" in item:
                out.append(str(item["text"]))
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _expand_pads(texts, pad, grids, what):
    """Replace the k-th `pad` (counted across the whole batch) by grid_k.prod()/4 copies of itself."""
    counts = [t.count(pad) for t in texts]
    if sum(counts) != len(grids):
        raise ValueError(f"the text has {sum(counts)} {pad} placeholder(s) but {len(grids)} {what} were given")
    n_tokens = (grids.prod(-1) // MERGE_SIZE**2).tolist()  # one placeholder per merged 2x2 block
    out, k = [], 0
    for t, c in zip(texts, counts):
        pieces = t.split(pad)
        out.append(pieces[0] + "".join(pad * n_tokens[k + j] + p for j, p in enumerate(pieces[1:])))
        k += c
    return out


def _is_single_video(v):
    """A 4-D tensor/array, or a list whose items are frames (PIL images or 3-D arrays), is one video."""
    if hasattr(v, "ndim"):
        return v.ndim == 4
    return len(v) > 0 and (isinstance(v[0], Image.Image) or getattr(v[0], "ndim", 0) in (2, 3))


def read_json(path):
    """A JSON object from a file; any failure is a one-line error that names the file."""
    if os.path.getsize(path) > MAX_JSON_BYTES:  # a settings file, read whole: bounded before it is read
        raise ValueError(f"{path}: {os.path.getsize(path):,} bytes; the limit for a JSON settings file is "
                         f"{MAX_JSON_BYTES:,} (processor.MAX_JSON_BYTES)")
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text)") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object {{...}}, found a {type(out).__name__}")
    return out


class Processor:
    """Text + images + videos -> model inputs, with the keys, shapes and dtypes of HF's Qwen2_5_VLProcessor."""

    def __init__(self, tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                 video_min_pixels=VIDEO_MIN_PIXELS, video_max_pixels=VIDEO_MAX_PIXELS):
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        # Note: HF 4.57 loads the video processor from preprocessor_config.json when a checkpoint has no
        # video_preprocessor_config.json, so it then uses the *image* limits for videos. We keep the video
        # defaults unless a video config says otherwise (so pass video sizes to HF explicitly when comparing).
        self.video_min_pixels, self.video_max_pixels = video_min_pixels, video_max_pixels

    @staticmethod
    def _read_pixels(path, lo, hi):
        if not os.path.exists(path):
            return lo, hi
        cfg = read_json(path)
        size = cfg.get("size") or {}
        if not isinstance(size, dict):
            raise ValueError(f"{path}: 'size' must be an object like {{\"shortest_edge\": ...}}, got {size!r}")
        lo = cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or lo
        hi = cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or hi
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (lo, hi)):
            raise ValueError(f"{path}: the pixel limits must be positive numbers, got {lo!r} and {hi!r}")
        return int(lo), int(hi)

    @classmethod
    def from_pretrained(cls, folder):
        """Read tokenizer.json and the optional (video_)preprocessor_config.json of a checkpoint folder."""
        lo, hi = cls._read_pixels(os.path.join(folder, "preprocessor_config.json"), MIN_PIXELS, MAX_PIXELS)
        vlo, vhi = cls._read_pixels(os.path.join(folder, "video_preprocessor_config.json"),
                                    VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
        return cls(Tokenizer.from_file(folder), lo, hi, vlo, vhi)

    def save_pretrained(self, folder):
        """Write tokenizer.json, tokenizer_config.json and preprocessor_config.json (loadable by transformers'
        AutoTokenizer and Qwen2VLImageProcessor), each a new file renamed into place (a link there is replaced)."""
        from safeio import write_atomic
        with write_atomic(os.path.join(folder, "tokenizer.json")) as f:
            f.write(self.tokenizer.tok.to_str(pretty=True))
        tok_cfg = dict(tokenizer_class="Qwen2Tokenizer", bos_token=None, eos_token="<|im_end|>",
                       pad_token="<|endoftext|>", model_max_length=131072, errors="replace",
                       clean_up_tokenization_spaces=False, split_special_tokens=False)
        pre_cfg = dict(min_pixels=self.min_pixels, max_pixels=self.max_pixels, patch_size=PATCH_SIZE,
                       temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE, image_mean=list(IMAGE_MEAN),
                       image_std=list(IMAGE_STD), resample=3, rescale_factor=1 / 255,
                       size=dict(shortest_edge=self.min_pixels, longest_edge=self.max_pixels),
                       image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor")
        vid_cfg = dict(pre_cfg, min_pixels=self.video_min_pixels, max_pixels=self.video_max_pixels,
                       size=dict(shortest_edge=self.video_min_pixels, longest_edge=self.video_max_pixels))
        vid_cfg.pop("image_processor_type")
        for name, cfg in [("tokenizer_config.json", tok_cfg), ("preprocessor_config.json", pre_cfg),
                          ("video_preprocessor_config.json", vid_cfg)]:
            with write_atomic(os.path.join(folder, name)) as f:
                json.dump(cfg, f, indent=2)

    def __call__(self, text, images=None, videos=None, video_fps=2.0):
        """
        text: str or list[str] (already laid out, e.g. by build_prompt). images: one image or a list, matched in
        order to the <|image_pad|>s of the whole batch. videos: one video (list of frames / uint8 [F,H,W,3]) or a
        list of videos. video_fps: the sampling fps, a number or one per video.
        Returns input_ids/attention_mask int64 [B, L] (left-padded with <|endoftext|>), plus pixel_values f32
        [N, 1176], image_grid_thw int64 [n, 3], pixel_values_videos, video_grid_thw, second_per_grid_ts f32 [v]
        for the modalities given.
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a non-empty list of str")
        vision, no_grids = {}, torch.zeros(0, 3, dtype=torch.long)
        if images is not None:
            pixel_values, image_grid = preprocess_images(images, self.min_pixels, self.max_pixels)
            vision.update(pixel_values=pixel_values, image_grid_thw=image_grid)
        texts = _expand_pads(texts, IMAGE_PAD, vision.get("image_grid_thw", no_grids), "images")
        if videos is not None:
            if _is_single_video(videos):
                videos = [videos]
            fps = list(video_fps) if isinstance(video_fps, (list, tuple)) else [video_fps] * len(videos)
            if len(fps) != len(videos):
                raise ValueError(f"got {len(fps)} fps values for {len(videos)} videos")
            outs = [preprocess_video(v, f, self.video_min_pixels, self.video_max_pixels) for v, f in zip(videos, fps)]
            vision.update(pixel_values_videos=torch.cat([o[0] for o in outs]),
                          video_grid_thw=torch.cat([o[1] for o in outs]),
                          second_per_grid_ts=torch.cat([o[2] for o in outs]))
        texts = _expand_pads(texts, VIDEO_PAD, vision.get("video_grid_thw", no_grids), "videos")
        ids = [self.tokenizer.encode(t) for t in texts]
        # Left padding keeps every row's last real token in the last column, which is where generation continues.
        L = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), L), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(ids), L, dtype=torch.long)
        for b, x in enumerate(ids):
            if x:
                input_ids[b, L - len(x):] = torch.tensor(x, dtype=torch.long)
                attention_mask[b, L - len(x):] = 1
        return dict(input_ids=input_ids, attention_mask=attention_mask, **vision)

    def decode(self, ids, skip_special=False):
        return self.tokenizer.decode(ids, skip_special)
