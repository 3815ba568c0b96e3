"""Shared test helpers: a toy tokenizer (a fixture), a tiny random VLM, random frames and a commentary script;
`refused`, the check that a command line stops with a one-line error.

pytest.ini puts the repository root on the import path, so tests import model.py, cache.py, ... as a reader
runs them; test modules import the plain helpers below with `from conftest import ...`."""
import pytest
import torch
from PIL import Image

from model import PRESETS, VLM
from processor import Tokenizer, build_tokenizer

TEXTS = ["Red scores! Red 1, Blue 0.", "Blue shoots!", "Foul by Red.", "Corner for Blue.", "Blue keeper saves.",
         "Time=12.0-13.0s", " ..."]


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
    cfg = PRESETS["tiny"](vocab_size=len(tok))
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 64, 128, layers
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.mrope_section = 4, 2, [2, 3, 3]
    cfg.vision.depth, cfg.vision.hidden_size, cfg.vision.intermediate_size = 2, 32, 64
    cfg.vision.num_heads, cfg.vision.out_hidden_size, cfg.vision.fullatt_block_indexes = 2, 64, [1]
    cfg.image_token_id, cfg.video_token_id = tok.image_pad_id, tok.video_pad_id
    torch.manual_seed(seed)
    return VLM(cfg).init_weights(std=0.2, seed=seed).eval()


def frames(t, size=56):
    g = torch.Generator().manual_seed(t)
    return [Image.fromarray(torch.randint(0, 255, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(2)]


def script(t):
    return TEXTS[t % 5] if t % 3 == 0 else ""


