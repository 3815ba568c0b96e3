"""
Qwen2.5-VL from scratch: the language model, M-RoPE, the whole VLM, loading and generation (the vision tower is
vision.py).

The model reads a video or image as 14x14 pixel patches over 2 frames, runs a ViT with 2-D rotary positions
whose blocks mostly attend inside 112x112 px windows (a few "full" blocks attend over the whole frame), merges
each 2x2 group of patches into one token, and splices those tokens into the text where the prompt holds
<|image_pad|> / <|video_pad|> placeholders. The language model is a Qwen2 decoder (GQA, q/k/v bias, RMSNorm,
SwiGLU) whose rotary embedding is 3-D ("M-RoPE"): the 64 rotary frequencies are split 16/24/24 between a time,
a row and a column position, so a vision token knows where and when it is, and a text token (all three equal)
is plain 1-D RoPE.

References:
- Qwen2.5-VL technical report, arXiv 2502.13923; Qwen2-VL, arXiv 2409.12191 (M-RoPE).
- transformers' modeling_qwen2_5_vl.py (Qwen/Qwen2.5-VL-7B-Instruct's config.json for the 7B numbers) is the
  numerical oracle in tests/test_model.py.

Module names follow the published checkpoint keys (visual.*, model.*, lm_head), so loading is a plain
state-dict copy (weights.py reads and checks the safetensors). forward takes an optional cache (cache.py: the
stage / write / commit protocol is written there).
Attention has three paths: one decoded token (two matmuls), a prompt or a chunk on a cache (a pluggable causal
attention function: dense SDPA, or FlexPrefill after flexprefill.enable_flexprefill), and an explicit padding mask.
"""
import glob
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.bias import causal_lower_right

from cache import KVCache, to_device
from layers import Fusable, GatedMLP, RMSNorm
from rope import apply_rope, inv_freq, mrope_axis, mrope_cos_sin, mrope_positions
from vision import VisionConfig, VisionTower
from weights import checkpoint_files, read_tensors, tensor_locations

# -----------------------------------------------------------------------------
# Configs

# The largest sizes a config.json may ask for (VLMConfig.check), far above any Qwen2.5-VL (72B: 80 layers of 8192)
CONFIG_LIMITS = dict(vocab_size=1 << 20, hidden_size=1 << 16, intermediate_size=1 << 18, num_hidden_layers=1024,
                     num_attention_heads=1024, num_key_value_heads=1024, max_position_embeddings=1 << 24)
VISION_LIMITS = dict(depth=256, hidden_size=1 << 14, num_heads=256, intermediate_size=1 << 16,
                     out_hidden_size=1 << 16, patch_size=64, temporal_patch_size=8, spatial_merge_size=8,
                     window_size=4096, in_chans=4, tokens_per_second=1000)


@dataclass
class VLMConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def check(self):
        """Raise a one-line ValueError naming the field, the value and its limit (CONFIG_LIMITS) when a size, a count,
        a rope or eps value cannot make a working model; called before any module is built, so a config asking for
        ten million layers costs a line, not the memory of ten million modules."""
        v = self.vision
        sizes = {**{k: getattr(self, k) for k in CONFIG_LIMITS}, **{f"vision_config.{k}": getattr(v, k)
                                                                    for k in VISION_LIMITS}}
        for name, value in sizes.items():
            hi = {**CONFIG_LIMITS, **{f"vision_config.{k}": x for k, x in VISION_LIMITS.items()}}[name]
            if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= hi):
                raise ValueError(f"{name} = {str(value)[:30]} must be an integer in [1, {hi:,}] (model.CONFIG_LIMITS)")
        for name in ("rope_theta", "rms_norm_eps"):
            x = getattr(self, name)
            if not (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                    and (name == "rope_theta" or x < 1)):
                raise ValueError(f"{name} = {x!r} must be a positive finite number"
                                 + (" below 1" if name == "rms_norm_eps" else ""))
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if self.hidden_size % heads or self.head_dim % 2 or heads % kv or v.hidden_size % v.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must split into num_attention_heads {heads} "
                             f"heads of an even size, num_attention_heads into num_key_value_heads {kv} groups, and "
                             f"vision_config.hidden_size {v.hidden_size} into num_heads {v.num_heads}")
        sec = self.mrope_section
        if not (isinstance(sec, list) and len(sec) == 3 and all(isinstance(x, int) and x > 0 for x in sec)
                and sum(sec) == self.head_dim // 2):
            raise ValueError(f"mrope_section {str(sec)[:40]} must be 3 positive integers summing to "
                             f"head_dim / 2 = {self.head_dim // 2}")
        if not all(isinstance(i, int) and 0 <= i < v.depth for i in v.fullatt_block_indexes):
            raise ValueError(f"vision_config.fullatt_block_indexes must be block numbers in [0, depth "
                             f"{v.depth})")
        return self

    @classmethod
    def from_hf_dict(cls, d):
        """Read an official config.json: the flat published layout or the newer one with a text_config."""
        if d.get("model_type") != "qwen2_5_vl":
            raise ValueError(f"model_type={d.get('model_type')!r}; this code loads 'qwen2_5_vl' (Qwen2.5-VL) "
                             "checkpoints only")
        flat = {**d, **d.get("text_config", {})}  # text_config (transformers >= 4.52) wins over top-level copies
        names = {f.name for f in fields(cls)} - {"vision", "mrope_section"}
        kw = {k: flat[k] for k in names if k in flat}
        rope = flat.get("rope_scaling") or flat.get("rope_parameters") or {}
        if "mrope_section" in rope:
            kw["mrope_section"] = list(rope["mrope_section"])
        v = dict(d.get("vision_config", {}))
        if "in_channels" in v:
            v["in_chans"] = v.pop("in_channels")
        vnames = {f.name for f in fields(VisionConfig)}
        kw["vision"] = VisionConfig(**{k: v[k] for k in vnames if k in v})
        cfg = cls(**kw).check()
        cfg._tie_explicit = "tie_word_embeddings" in flat  # lets the loader tie when the key and lm_head are absent
        return cfg

    def to_hf_dict(self):
        """The flat published layout (what Qwen ships), which transformers 4.x and 5.x both read."""
        d = {k: v for k, v in asdict(self).items() if k not in ("vision", "mrope_section")}
        vision = asdict(self.vision)
        vision["in_channels"] = vision.pop("in_chans")
        d.update(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", hidden_act="silu",
                 rope_scaling={"type": "mrope", "mrope_section": list(self.mrope_section)},
                 use_sliding_window=False, attention_dropout=0.0,
                 vision_config={**vision, "hidden_act": "silu", "model_type": "qwen2_5_vl"})
        return d


def _tiny(vocab_size=512, layers=4, width=256):
    """A named preset for tests and for training from scratch on the synthetic stream (a few M parameters):
    `layers` decoder layers of `width` (a multiple of 64: heads of 64 dims, half as many K/V heads)."""
    heads = width // 64
    return VLMConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), mrope_section=[8, 12, 12],
                     tie_word_embeddings=True, max_position_embeddings=32768,
                     vision=VisionConfig(depth=4, hidden_size=128, num_heads=4, intermediate_size=256,
                                         out_hidden_size=width, fullatt_block_indexes=[1, 3]))


PRESETS = {
    "tiny": _tiny,
    "3B": lambda: VLMConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                            num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                            vision=VisionConfig(out_hidden_size=2048)),
    "7B": lambda: VLMConfig(),
}

def tiny_config(tok, layers=4, width=256):
    """The tiny preset for a tokenizer: its vocabulary (padded to a multiple of 64) and its special token ids."""
    cfg = PRESETS["tiny"](vocab_size=64 * math.ceil(len(tok) / 64), layers=layers, width=width)
    cfg.image_token_id, cfg.video_token_id = tok.image_pad_id, tok.video_pad_id
    cfg.vision_start_token_id, cfg.vision_end_token_id = tok.vision_start_id, tok.vision_end_id
    cfg.eos_token_id, cfg.bos_token_id = tok.im_end_id, tok.endoftext_id
    return cfg

# -----------------------------------------------------------------------------
# Language model


def right_padded(attention_mask, past):
    """Whether a batch's padding, if any, all comes after its real tokens (a training batch, data.collate), with no
    cache before it: then causal attention alone keeps every real query off the padding (the fused kernels, and
    no (T, T) mask, which at 64k tokens would not fit); padded queries read more, and nothing reads them."""
    m = attention_mask.bool()
    return past == 0 and bool((m[:, 1:] <= m[:, :-1]).all())


def causal_attention(q, k, v):
    """Dense causal SDPA: the model's default attention, and the reference that FlexPrefill (flexprefill.py) is
    tested against. q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D). When Nq < Nk the queries are the last Nq positions
    (a chunk on a KV cache): causal aligned to the bottom right, which SDPA's is_causal (top-left) is not.
    causal_lower_right reaches the flash kernel on a GPU with GQA and no mask in memory; elsewhere it falls back to
    a materialised mask."""
    Nq, Nk, gqa = q.shape[2], k.shape[2], q.shape[1] != k.shape[1]
    if Nq == Nk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Nq, Nk), enable_gqa=gqa)


def exact_causal(attn_fn):
    """Whether attn_fn computes causal_attention exactly (a faster kernel for it, say prefill.CachedPrefill), as
    opposed to an approximation of it (FlexPrefill) or a wrapper."""
    return attn_fn is causal_attention or getattr(attn_fn, "exact_causal", False)


def decode_attention(q, k, v, mask=None):
    """One decoded token's attention, the reference: q (B, Hkv, G, D) holds the G query heads that share each KV
    head, k and v (B, Hkv, Nk, D), mask (B, 1, 1, Nk) bool (True = visible) or None -> (B, Hkv, G, D). Two plain
    matmuls: the fused SDPA kernels split work by head and query block, which for 1 query x 4 KV heads leaves most
    of the GPU idle over a long cache (scores in the model dtype, softmax in fp32 or better: what transformers'
    eager attention does)."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5                                  # (B, Hkv, G, Nk)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(-1, dtype=torch.promote_types(s.dtype, torch.float32))
    return p.to(v.dtype) @ v


class Attention(Fusable):
    def __init__(self, cfg: VLMConfig, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.attn_fn = causal_attention  # (q, k, v) -> causal attention output; see VLM.use_attention
        self.decode_fn = decode_attention  # (q, k, v, mask) for one decoded token; see VLM.use_decode_attention

    def parallel(self):  # one q/k/v matmul after fuse() (layers.Fusable)
        return [self.q_proj, self.k_proj, self.v_proj]

    def forward(self, x, cos, sin, mask, cache=None):
        return self.o_proj(self.attend(*self.qkv(x, cos, sin), mask, cache).transpose(1, 2).flatten(2))

    def qkv(self, x, cos, sin):
        """x (B, T, hidden) -> q (B, H, T, D), k, v, raw_k (B, Hkv, T, D): the projections, k and q rotated."""
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)               # (B, H, T, D)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)                  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, k               # in the model dtype

    def attend(self, q, k, v, raw_k, mask, cache=None):
        """The new tokens' attention over the cache's keys and their own -> (B, H, T, D)."""
        B, _, T, _ = q.shape
        if cache is not None:
            # all keys so far, the new ones last; the raw keys let a streaming cache re-rotate after eviction
            k, v = cache.update(self.layer_idx, k, v, raw_k)
        G = self.n_heads // self.n_kv
        if T == 1:
            # decode: one query per head, so the G query heads sharing a KV head sit on the query axis and GQA
            # needs no copies of K/V (decode_attention; the fast path swaps in a split-KV kernel, decode.py)
            o = self.decode_fn(q.view(B, self.n_kv, G, self.head_dim), k, v, mask)      # (B, Hkv, G, D)
            o = o.reshape(B, self.n_heads, 1, self.head_dim)                             # -> (B, H, 1, D)
        elif mask is None:
            # a prompt, or a chunk on a cache (the queries are the last T of the keys): causal attention, dense
            # by default, FlexPrefill's block-sparse attention after flexprefill.enable_flexprefill(model)
            o = self.attn_fn(q, k, v)
        else:
            # an explicit mask (padding): the fused kernels need K/V per query head (expanded: repeat_interleave syncs)
            k, v = (t[:, :, None].expand(-1, -1, G, -1, -1).flatten(1, 2) for t in (k, v))   # (B, H, S, D)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o


class DecoderLayer(nn.Module):
    compiled = None   # (before_attention, after_attention) compiled, for prefills (VLM.compile_prefill)

    def __init__(self, cfg: VLMConfig, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        if self.compiled is not None and x.shape[1] > 1 and not torch.is_grad_enabled():
            return self.forward_compiled(x, cos, sin, mask, cache)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_compiled(self, x, cos, sin, mask, cache):   # the work around the attention compiled
        before, after = self.compiled
        return after(x, self.self_attn.attend(*before(x, cos, sin), mask, cache))

    def before_attention(self, x, cos, sin):   # norm, q/k/v, rotary
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

    def after_attention(self, x, o):
        """o (B, H, T, D), the attention's output: output projection, residual, norm, MLP, residual."""
        x = x + self.self_attn.o_proj(o.transpose(1, 2).flatten(2))
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope_tables(cfg)

    def rope_tables(self, cfg, device=None):
        """M-RoPE's frequencies and each one's axis, on the device (remade after a meta build): no host copies."""
        self.register_buffer("inv_freq", inv_freq(cfg.head_dim, cfg.rope_theta).to(device), persistent=False)
        self.register_buffer("rope_axis", mrope_axis(cfg.mrope_section, device), persistent=False)

# -----------------------------------------------------------------------------
# The whole model


def check_device(device):
    """torch.device(device), or a one-line ValueError saying why this machine cannot use it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        cpu_only = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
        raise ValueError(f"device {device!r}: CUDA is not available ("
                         + ("this torch is CPU-only)" if cpu_only else "no GPU is visible: see nvidia-smi)"))
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS (Apple GPU) is not available on this machine")
    return dev


def pick_device_dtype(device=None, dtype=None, quiet=False):
    """Explicit device/dtype choice, printed with its reason (bf16 on a GPU, fp32 on a CPU)."""
    why = []
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        why.append(f"device={device} ({'a GPU is available' if device == 'cuda' else 'no GPU found'})")
    device = check_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        reason = "bf16 is native on the GPU" if device.type == "cuda" else "CPUs are slow and inexact in bf16"
        why.append(f"dtype={str(dtype).split('.')[-1]} ({reason})")
    if why and not quiet:
        print("using " + ", ".join(why))
    return device, dtype


class VLM(nn.Module):
    fp8 = False   # quantize.quantize_fp8 swapped the Linears for FP8 ones (inference only: not saved)

    def __init__(self, cfg: VLMConfig, tokenizer_path=None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer_path = tokenizer_path  # a tokenizer.json that save_pretrained copies along
        self.checkpointing = False            # activation checkpointing of the decoder layers (training)
        self.visual = VisionTower(cfg.vision)
        self.model = TextModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.fusion = None  # fused projections: None until fuse() decides (the fast decode path fuses then)
        self.decode_kernel = None  # decode attention: None until use_decode_attention decides (likewise)
        self.prompt_kernel = None  # prompt / prefill attention: None until use_attention decides (likewise)

    def fuse(self, enabled=True):
        """Run q/k/v and gate/up (both towers) as one matmul each, for inference (layers.Fusable): the same
        parameters, viewed from one stacked tensor, so state_dict names, loading and saving are unchanged. Call it
        after moving the model (a later .to() re-stacks); enabled=False goes back to the separate Linears."""
        if self.fp8:   # its projections run unfused (quantize.py): fuse(False) is what it is already
            if enabled:
                raise ValueError("the FP8 model's projections run unfused (quantize.py); fuse the bf16 model instead")
            return self
        for m in self.modules():
            if isinstance(m, Fusable):
                m.fuse(enabled)
        self.fusion = enabled
        return self

    def use_attention(self, attn_fn=None):
        """Run prompts and prefill chunks through attn_fn(q, k, v) (None: dense causal SDPA). Decode steps and
        explicitly masked (padded) batches stay dense."""
        for layer in self.model.layers:
            layer.self_attn.attn_fn = attn_fn or causal_attention
        self.prompt_kernel = attn_fn or causal_attention
        return self

    def compile_prefill(self, enabled=True):
        """Prefills (over one new token, no gradients) run each layer's work around its attention (which stays
        use_attention's) through torch.compile, dynamic shapes: one compile serves every layer and length."""
        for layer in self.model.layers:
            layer.compiled = ((torch.compile(layer.before_attention, dynamic=True),
                               torch.compile(layer.after_attention, dynamic=True)) if enabled else None)
        return self

    def use_decode_attention(self, decode_fn=None):
        """Run decode steps' attention through decode_fn(q, k, v, mask) (None: the two-matmul reference,
        decode_attention); decode.py's split-KV kernel is the GPU fast path."""
        for layer in self.model.layers:
            layer.self_attn.decode_fn = decode_fn or decode_attention
        self.decode_kernel = decode_fn or decode_attention
        return self

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    def init_weights(self, std=0.02, seed=0):
        """Random init for training from scratch: normal(0, std) linears/embeddings, ones for norms."""
        gens = {}  # one generator per device, so a model built on the GPU is initialised there
        for name, p in self.named_parameters():
            g = gens.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
            with torch.no_grad():
                if name.endswith("norm.weight") or ".norm" in name or "ln_q" in name or "layernorm" in name:
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * std)
        return self

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
              compile_vision=False, video_embeds=None):
        """Token embeddings with the vision tower's output written over the <|image_pad|>/<|video_pad|> slots
        (video_embeds: the tower's output for the videos, when the caller ran it already)."""
        x = self.model.embed_tokens(input_ids)
        # the checks read the ids back (on a GPU: after all queued work); callers bringing video_embeds skip them
        check = video_embeds is None or not input_ids.is_cuda
        for pix, grid, feats, tok, name in (
                (pixel_values, image_grid_thw, None, self.cfg.image_token_id, "image"),
                (pixel_values_videos, video_grid_thw, video_embeds, self.cfg.video_token_id, "video")):
            slots = input_ids == tok
            if pix is None and feats is None:
                if check and slots.any():
                    raise ValueError(f"input_ids hold <|{name}_pad|> tokens but no pixel values were given")
                continue
            if feats is None:
                feats = self.visual(pix, grid, compiled=compile_vision)
            if check and int(slots.sum()) != feats.shape[0]:
                raise ValueError(f"{int(slots.sum())} <|{name}_pad|> tokens in input_ids but the {name}s give "
                                 f"{feats.shape[0]} features (grid_t*grid_h*grid_w/4 each)")
            n = slots.flatten().cumsum(0).view(slots.shape) - 1  # pad n gets feature n; masked_scatter's backward syncs
            x = torch.where(slots[..., None], feats.to(x.dtype)[n.clamp(min=0)], x) if len(feats) else x
        return x

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                video_grid_thw=None, second_per_grid_ts=None, attention_mask=None, position_ids=None, cache=None,
                logits_to_keep=0, compile_vision=False, video_embeds=None):
        """Logits (B, T, vocab) (the last `logits_to_keep` positions when > 0).

        attention_mask (B, past + T), 1 = real token, for left-padded batches; position_ids (3, B, T), or made
        here by the M-RoPE rule (by the cache when there is one: cache.py's stage / write / commit protocol);
        cache: a KVCache / StreamingCache (StreamingCache callers stage their tokens and pass position_ids);
        video_embeds: the vision tower's output for the video pads, instead of pixel_values_videos.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            new_mask = attention_mask[:, -T:] if attention_mask is not None else None
            grids = (image_grid_thw, video_grid_thw, second_per_grid_ts, new_mask)
            position_ids = (cache.add_tokens(input_ids, *grids) if cache is not None
                            else mrope_positions(input_ids, self.cfg, *grids)[0])
        x = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, compile_vision,
                       video_embeds)
        cos, sin = self.rope(position_ids, x.dtype)
        mask = None
        padded = attention_mask is not None and not bool(attention_mask.all())
        # right padding needs no mask under dense causal attention (right_padded); a sparse attn_fn would read the
        # padded queries too (FlexPrefill's pattern estimate), so it keeps the mask
        dense = exact_causal(self.model.layers[0].self_attn.attn_fn)  # use_attention sets every layer's
        if padded and not (dense and right_padded(attention_mask, past)):
            # causal + key padding, (B, 1, T, past + T); a padded query still sees itself (no NaN rows)
            keys = attention_mask.to(x.device, non_blocking=True).bool()  # a pinned host mask: no wait (train.py)
            qi = torch.arange(T, device=x.device)[:, None] + past  # absolute index of each query
            kj = torch.arange(past + T, device=x.device)[None, :]
            mask = ((kj <= qi)[None] & keys[:, None, :]) | (kj == qi)[None]
            mask = mask[:, None]
        for layer in self.model.layers:
            if self.checkpointing and self.training:  # activation checkpointing: recompute in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.commit(T)
        x = self.model.norm(x[:, -logits_to_keep:] if logits_to_keep else x)
        return self.lm_head(x) if self.lm_head is not None else x @ self.model.embed_tokens.weight.T

    def rope(self, position_ids, dtype):
        """M-RoPE cos, sin (B, 1, T, head_dim) for position ids (3, B, T): no copy here waits for the GPU's queue."""
        pos = to_device(position_ids, self.model.inv_freq.device)
        return mrope_cos_sin(pos, self.model.inv_freq, self.cfg.mrope_section, dtype, self.model.rope_axis)

    # ---- generation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=20, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
                 stop_ids=None, attention_mask=None, generator=None, **vision):
        """Greedy (temperature 0) or sampled decoding with a KVCache. Returns (B, T + new) ids; rows that stop
        early are filled with the first stop id. Pass pixel values etc. as keyword arguments, as to forward."""
        B, T = input_ids.shape
        stop_ids = list(stop_ids) if stop_ids is not None else [self.cfg.eos_token_id, self.cfg.bos_token_id]
        cache = KVCache(self.cfg, B, T + max_new_tokens, self.device, self.dtype)
        logits = self(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1, **vision)
        seen = input_ids.clone()
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out = []
        for step in range(max_new_tokens):
            tok = sample_next(logits[:, -1].float(), seen, temperature, top_p, repetition_penalty, generator)
            tok = torch.where(done, torch.full_like(tok, stop_ids[0]), tok)
            out.append(tok)
            seen = torch.cat([seen, tok[:, None]], 1)
            done |= torch.isin(tok, torch.tensor(stop_ids, device=tok.device))
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], 1)
            logits = self(tok[:, None], attention_mask=attention_mask, cache=cache)
        return torch.cat([input_ids, torch.stack(out, 1)], 1)

    # ---- checkpoints --------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """Load an official Qwen2.5-VL folder (config.json + model.safetensors or a sharded index).

        The model is built on the meta device and each tensor is read from the memory-mapped file straight
        to `device` in `dtype`, so a 7B checkpoint never exists twice (it loads with 24 GB of RAM to a GPU).
        """
        from processor import read_json
        path = os.fspath(path)
        device, dtype = pick_device_dtype(device, dtype)
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{path}: no config.json in this folder; make a checkpoint with `python "
                                    "train.py` (it writes out/tiny) or download a Qwen2.5-VL one")
        raw = read_json(cfg_file)
        try:
            cfg = VLMConfig.from_hf_dict(raw)
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{cfg_file}: {e}") from None
        where = tensor_locations(checkpoint_files(path))
        if "lm_head.weight" not in where and cfg.tie_word_embeddings is False and not cfg._tie_explicit:
            cfg.tie_word_embeddings = True  # no lm_head and no word on tying: the embeddings are the head
        tok = os.path.join(path, "tokenizer.json")
        with torch.device("meta"):
            model = cls(cfg, tokenizer_path=tok if os.path.isfile(tok) else None)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        missing = sorted(set(expected) - set(where))
        unexpected = sorted(set(where) - set(expected))
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not fit the config: missing tensors {missing[:20]}"
                             f"{' ...' if len(missing) > 20 else ''}, unexpected tensors {unexpected[:20]}"
                             f"{' ...' if len(unexpected) > 20 else ''}")
        model.load_state_dict(read_tensors(where, expected, device, dtype), assign=True)
        model.model.rope_tables(cfg, device)
        return model.eval()

    def save_pretrained(self, path, state_dict=None):
        """config.json + model.safetensors (+ tokenizer.json) in the official layout, written atomically:
        everything goes to a temporary folder beside `path`, then each file is renamed into place; the temporary
        folder goes whatever happens, and leftovers of a save killed half-way go at the next save."""
        if self.fp8 and state_dict is None:
            raise ValueError(f"{path}: an FP8 model (quantize.py) is for inference; save the bf16 model")
        os.makedirs(path, exist_ok=True)
        for old in glob.glob(os.path.join(path, ".tmp-save-*")):  # what a save killed half-way left behind
            shutil.rmtree(old, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=path)
        try:
            self._save_into(tmp, path, state_dict)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.tokenizer_path = os.path.join(path, "tokenizer.json") if self.tokenizer_path is not None else None

    def _save_into(self, tmp, path, state_dict):
        from safetensors.torch import save_file
        state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or self.state_dict()).items()}
        # fused projections (fuse()) are views of one stacked tensor; safetensors refuses tensors sharing memory
        state = {k: v.clone() if v.untyped_storage().nbytes() != v.nbytes else v for k, v in state.items()}
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**self.cfg.to_hf_dict(), "torch_dtype": str(self.dtype).split(".")[-1]}, f, indent=2)
        # safetensors writes 0600 (a private temp file, renamed); give it the mode open() gave config.json
        os.chmod(os.path.join(tmp, "model.safetensors"), os.stat(os.path.join(tmp, "config.json")).st_mode & 0o777)
        names = ["config.json", "model.safetensors"]
        if self.tokenizer_path is not None:
            with open(self.tokenizer_path, "rb") as src, open(os.path.join(tmp, "tokenizer.json"), "wb") as dst:
                dst.write(src.read())
            names.append("tokenizer.json")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):  # an earlier sharded save: its index would win over the new file when loading
            os.remove(index)
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))


def sample_next(logits, seen, temperature=0.0, top_p=1.0, repetition_penalty=1.0, generator=None):
    """Next token ids (B,) from last-position logits (B, V); `seen` (B, S) are the ids so far."""
    if repetition_penalty != 1.0:
        # CTRL-style, as transformers does it: shrink the logit of every token already seen
        prev = logits.gather(1, seen)
        logits = logits.scatter(1, seen, torch.where(prev < 0, prev * repetition_penalty, prev / repetition_penalty))
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, -1)
    if top_p < 1.0:
        # keep the smallest set of tokens whose probability reaches top_p
        p, idx = probs.sort(-1, descending=True)
        drop = p.cumsum(-1) - p > top_p  # mass before this token already reaches top_p
        p = p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(1, idx, p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
