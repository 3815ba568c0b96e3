"""
FP8 weights for serving: every Linear of the language model and of the vision tower keeps its weight in 8-bit
floats (e4m3: 4 exponent bits, 3 mantissa bits, largest value 448) with one fp32 scale per output row, and multiplies
through torch._scaled_mm, whose inputs are quantized the same way on the fly, one scale per row (token):

    W ~ W8 * sw    (W8 = round_e4m3(W / sw),  sw = max |W's row| / 448,  one per output row)
    x ~ x8 * sx    (x8 = round_e4m3(x / sx),  sx = max |x's row| / 448,  one per token)
    x @ W^T  ~  (x8 @ W8^T) * sx * sw^T   (the 8-bit products summed in fp32, scaled once at the end)

Why: a Hopper GPU multiplies FP8 at about twice its bf16 rate and a weight read takes half the bytes. At 7B a 2-fps
720p second's prefill is ~11 TFLOP of matmuls, so 32 streams' seconds take ~1 s of an H100 in bf16 before anything
is decoded; a decode step reads ~14 GB of weights in bf16, 7 GB in FP8. One scale per row (per output channel for the
weights, per token for the inputs) is the common recipe for FP8 inference of transformers (FP8 formats for deep
learning, Micikevicius et al., arXiv 2209.05433; "rowwise" scaling in vLLM and torchao): an outlier in one token or
one channel costs only that row its precision.

It is an approximation, unlike everything else on the fast path: e4m3 keeps ~2 significant digits, so a product's
relative error is a few percent per element and about 1% over a long dot product (tests/test_quantize.py measures it
against the same model in full precision, and checks that FP8Linear is exact math on its 8-bit values). Use it for
speed, and compare a model's answers before serving it so.

Applied from outside, as gpt-fast's quantize.py is: quantize_fp8(model) swaps each nn.Linear for an FP8Linear in
place. The projections then run unfused (VLM.fuse would stack bf16 weights); a quantized model is for inference and is
not saved (save the bf16 one and quantize at load). _scaled_mm wants both inner sizes and the weight's rows in
multiples of 16, so FP8Linear pads them with zeros (the 7B vision MLP is 3,420 wide) and drops the padded outputs.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max   # 448.0
ALIGN = 16                         # _scaled_mm's inner sizes and the weight's rows: multiples of 16


def rowwise(x):
    """x (R, K) -> (x8 (R, K) e4m3, scale (R, 1) fp32) with x ~ x8 * scale, each row scaled to fill e4m3's range."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX   # an all-zero row: any scale works
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def pad_to(n, align=ALIGN):
    return -(-n // align) * align


def quantize_rows(x, width):
    """rowwise(x) of x (R, K) with zero columns up to `width` (the padded weight's inner size)."""
    if x.shape[1] != width:
        x = F.pad(x, (0, width - x.shape[1]))
    return rowwise(x)


@functools.cache
def _compiled_quantize_rows():
    # on a GPU quantize_rows eagerly is ~8 small kernels a Linear (abs, amax, divide, clamp, cast, ...): ~1,600 more
    # launches in a 7B decode step; compiled, one or two
    return torch.compile(quantize_rows, dynamic=True)


class FP8Linear(nn.Module):
    """nn.Linear's forward with the weight in e4m3, one scale per output row; inputs quantized per row per call (on
    a GPU through torch.compile), the output in the input's dtype. Made from a Linear (its weight and bias copied,
    the Linear left as it was)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        K, N = pad_to(self.in_features), pad_to(self.out_features)
        w = F.pad(linear.weight.detach(), (0, K - self.in_features, 0, N - self.out_features))   # (N, K)
        w8, scale = rowwise(w)
        self.register_buffer("weight8", w8)                   # (N, K) e4m3
        self.register_buffer("scale", scale.T.contiguous())   # (1, N) fp32: _scaled_mm's per-column scale of W^T
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def _apply(self, fn, recurse=True):
        # .to(device) moves the layer; a dtype cast (.to(torch.bfloat16), .half()) would turn the 8-bit weight and its
        # fp32 scales into 16-bit numbers, so they only move, and the bias follows the model
        device = fn(torch.empty(0, device=self.weight8.device)).device
        self.weight8, self.scale = self.weight8.to(device), self.scale.to(device)
        if self.bias is not None:
            self.bias = fn(self.bias)
        return self

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)                   # (R, K)
        if x.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        quantize = _compiled_quantize_rows() if x.is_cuda and not torch.compiler.is_compiling() else quantize_rows
        x8, sx = quantize(x, self.weight8.shape[1])           # (R, K padded) e4m3, (R, 1) fp32
        y = torch._scaled_mm(x8, self.weight8.T, scale_a=sx, scale_b=self.scale, out_dtype=x.dtype)   # (R, N)
        y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def dequantized(self):
        """The weight this layer multiplies by, (out, in) in fp32: W8 * sw, unpadded (for tests and inspection)."""
        return (self.weight8.float() * self.scale.T)[:self.out_features, :self.in_features]

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, e4m3"


def quantize_fp8(model, vision=True):
    """Swap every nn.Linear of a VLM's language model (lm_head too) and, with vision=True, of its vision tower for an
    FP8Linear, in place; the bf16 weights are freed. The projections are unfused first, and stay so. Returns the
    model, marked model.fp8 = True."""
    model.fuse(False)   # (and model.fusion = False: decode.take_fast_defaults fuses only where nobody chose)
    swaps = [(parent, name, child) for where, parent in model.named_modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and (vision or not f"{where}.{name}".lstrip(".").startswith("visual."))]
    for parent, name, linear in swaps:
        setattr(parent, name, FP8Linear(linear))
    model.fp8 = True
    return model


ABOUT = "fp8: every Linear of both towers in e4m3 with row-wise scales (quantize.py; an approximation)"


def fp8_problem(device):
    """Why --fp8 cannot run on `device` (one line), or None."""
    if fp8_supported(device):
        return None
    return (f"--fp8: torch._scaled_mm with row-wise scales does not run on {device} here (it needs FP8 tensor cores, "
            "Ada or Hopper, or a CPU build that has it)")


@functools.cache
def fp8_supported(device):
    """Whether torch._scaled_mm runs with row-wise scales here: a GPU with FP8 tensor cores (Ada, Hopper or newer),
    or a CPU build that has it. Tried once per device on a tiny input."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        a = torch.ones(16, 16, device=device).to(E4M3)
        torch._scaled_mm(a, a.T, scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                         out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True
