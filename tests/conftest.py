"""Shared test helpers: a toy tokenizer (a fixture), a tiny random VLM, random frames and a commentary script;
`refused`, the check that a command line stops with a one-line error.

The numerical oracle (transformers, pinned in requirements-dev.txt) must be there: without it the model tests
would skip, not fail, so a run without it stops at once with one line (NANOSTREAM_NO_ORACLE=1 lets it skip them,
for a quick run on a machine without the dev requirements). GPU tests skip on a machine without one.

The GPU kernels (decode.py's split-KV attention, cache.py's eviction) are Triton. Without a GPU, Triton's
interpreter runs them on CPU tensors (in NumPy, slowly), so that their index logic is tested on any machine with
Triton installed (requirements-dev.txt): `kernel_device` says where. The interpreter must be on before those modules
define their kernels, hence here, before the imports below. It gets two things wrong in bf16 (tl.dot, and rounding
to bf16), so on a CPU the kernel tests run in fp16, which takes the same code path.

pytest.ini puts the repository root on the import path, so tests import model.py, cache.py, ... as a reader
runs them; test modules import the plain helpers below with `from conftest import ...`."""
import importlib.util
import os

import pytest
import torch
from PIL import Image

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from model import PRESETS, VLM  # noqa: E402 (after the interpreter is chosen)
from processor import Tokenizer, build_tokenizer  # noqa: E402

TEXTS = ["Red scores! Red 1, Blue 0.", "Blue shoots!", "Foul by Red.", "Corner for Blue.", "Blue keeper saves.",
         "Time=12.0-13.0s", " ..."]


def pinned_oracle():
    """The transformers version requirements-dev.txt pins (the one the model matches)."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements-dev.txt")) as f:
        return next(line.split("==")[1].split()[0] for line in f if line.startswith("transformers=="))


def oracle_problem():
    """Why the oracle cannot be used ('' when it can): transformers missing, or not the pinned version."""
    try:
        import transformers
    except ImportError as e:
        return f"transformers is not importable ({e})"
    if transformers.__version__ != (pinned := pinned_oracle()):
        return f"transformers {transformers.__version__} is installed, the tests' oracle is {pinned}"
    return ""


def kernel_device():
    """Where the tests run the Triton kernels: "cuda", "cpu" (Triton's interpreter), or None (no Triton)."""
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if importlib.util.find_spec("triton") and os.environ.get("TRITON_INTERPRET") == "1" else None


def kernel_dtype():
    """The 16-bit dtype the kernel tests use: bf16 as the model runs, fp16 in the interpreter (see above)."""
    return torch.bfloat16 if kernel_device() == "cuda" else torch.float16


def pytest_configure(config):
    if os.environ.get("NANOSTREAM_NO_ORACLE") != "1" and (problem := oracle_problem()):
        raise pytest.UsageError(f"{problem}: pip install -r requirements-dev.txt (or set NANOSTREAM_NO_ORACLE=1 to "
                                "skip the model-vs-transformers tests)")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(build_tokenizer(TEXTS * 20, vocab_size=300))


def refused(main, argv, capsys):
    """main(argv) must stop with a one-line error (argparse's exit status 2, no usage block, no traceback)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    return err


def tiny_model(tok, layers=2, seed=0):
    """A random tiny VLM whose every weight matters: init_weights zeroes the biases (training from scratch), so
    here they are drawn too (q/k/v in the decoder, the vision tower's), or no test would see how they are handled
    (a key bias rotated with the key, kept in raw keys, a value bias through eviction)."""
    cfg = PRESETS["tiny"](vocab_size=len(tok))
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 64, 128, layers
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.mrope_section = 4, 2, [2, 3, 3]
    cfg.vision.depth, cfg.vision.hidden_size, cfg.vision.intermediate_size = 2, 32, 64
    cfg.vision.num_heads, cfg.vision.out_hidden_size, cfg.vision.fullatt_block_indexes = 2, 64, [1]
    cfg.image_token_id, cfg.video_token_id = tok.image_pad_id, tok.video_pad_id
    torch.manual_seed(seed)
    model = VLM(cfg).init_weights(std=0.2, seed=seed).eval()
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        # a random model may pick a vision placeholder as its next word, which no reply can say (the fast decode
        # path stops with an error, the plain loop at the model's input): the placeholders' rows of the (tied)
        # embedding, unused as input (the vision tower's features replace them), make their logits 0
        assert model.lm_head is None
        model.model.embed_tokens.weight[[tok.image_pad_id, tok.video_pad_id]] = 0
    assert any(n.endswith("bias") for n, _ in model.named_parameters())
    return model


def frames(t, size=56):
    g = torch.Generator().manual_seed(t)
    return [Image.fromarray(torch.randint(0, 255, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(2)]


def script(t):
    return TEXTS[t % 5] if t % 3 == 0 else ""


