"""
The two small layers that the language model (model.py) and the vision tower (vision.py) both stack: RMSNorm and
the gated (SwiGLU) MLP. They sit in a file of their own so that each tower can import them without importing the
other.

Both follow Qwen2.5-VL's published checkpoints (arXiv 2502.13923): RMSNorm normalises in fp32 and scales after
casting back; the MLP is down(silu(gate(x)) * up(x)), with biases in the vision tower and none in the decoder.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, cast back, *then* scale: the order the checkpoints were trained with
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); the vision tower's has biases, the language model's does not."""

    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
