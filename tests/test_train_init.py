"""train.py --init: StreamingVLM's fine-tune recipe is the default when starting from a checkpoint (lr 1e-5, AdamW
betas 0.9/0.999, no weight decay, 3% warm-up then cosine to 0, clip 1.0, vision tower frozen, 512/512 previous
text, the official video pixel limits), each value printed with where it came from; the from-scratch presets keep
their own."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train
from data import make_tokenizer
from layout import FPS, SYSTEM_PROMPT
from model import VLM
from processor import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS

SMALL = ["--batch-size", "1", "--chunk-seconds", "2", "--overlap", "1", "--stream-seconds", "60", "--eval-chunks", "1",
         "--question-rate", "0", "--workers", "0"]


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """A tiny random VLM saved as a checkpoint folder, with its tokenizer."""
    d = tmp_path_factory.mktemp("init")
    tok = make_tokenizer()
    tok.tok.save(str(d / "tok.json"))
    model = VLM(train.tiny_config(tok)).init_weights(seed=1)
    model.tokenizer_path = str(d / "tok.json")
    model.save_pretrained(str(d / "ck"))
    return d / "ck"


def test_one_init_step_moves_the_language_model_by_lr_and_the_vision_tower_not_at_all(init_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    train.main(["--init", str(init_dir), "--out", str(out), "--steps", "1", *SMALL])
    before, after = load_file(init_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    vision = [k for k in before if k.startswith("visual.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    delta = max((after[k] - before[k]).abs().max().item() for k in before if k not in vision)
    # Adam's first step moves each weight with a gradient by lr * g / (|g| + eps): lr, up to fp32 rounding (a
    # weight near 1, as in the norms, is stored to about 6e-8)
    assert delta == pytest.approx(1e-5, rel=0.02), delta
    printed = capsys.readouterr().out
    source = "--init recipe (StreamingVLM SFT)"
    for name, value in [("lr", "1e-05"), ("betas", "0.9,0.999"), ("weight_decay", "0"), ("warmup", "0.03"),
                        ("min_lr", "0"), ("grad_clip", "1"), ("freeze_vision", "True"), ("text_sink", "512"),
                        ("text_window", "512"), ("min_pixels", str(VIDEO_MIN_PIXELS)),
                        ("max_pixels", str(VIDEO_MAX_PIXELS))]:
        assert any(line.split() == [name, value, *source.split()] for line in printed.splitlines()), name
    assert any(line.split() == ["steps", "1", "flag"] for line in printed.splitlines())
    assert any(line.split() == ["batch_size", "1", "flag"] for line in printed.splitlines())
    assert any(line.split() == ["eval_every", "400", "preset", "cpu"] for line in printed.splitlines())
    stream = json.load(open(out / "stream.json"))
    assert (stream["text_sink"], stream["text_window"], stream["fps"], stream["system_prompt"]) == \
        (512, 512, FPS, SYSTEM_PROMPT)
    assert (stream["min_pixels"], stream["max_pixels"]) == (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
    assert stream["vision_window"] == 2 and stream["frame_size"] == 56  # never more seconds than a chunk (2 here)


def test_resuming_an_init_run_continues_from_its_checkpoint_not_from_init(init_dir, tmp_path):
    straight, part = tmp_path / "straight", tmp_path / "part"
    train.main(["--init", str(init_dir), "--out", str(straight), "--steps", "2", *SMALL])
    train.main(["--init", str(init_dir), "--out", str(part), "--steps", "2", "--stop-at", "1", *SMALL])
    train.main(["--init", str(init_dir), "--out", str(part), "--steps", "2", "--resume", *SMALL])
    a, b = load_file(straight / "model.safetensors"), load_file(part / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-7


def test_from_scratch_presets_keep_their_recipe_and_a_flag_wins_over_init(init_dir, tmp_path):
    out = ["--out", str(tmp_path / "unused")]
    cpu, gpu = train.get_args([*out, "--preset", "cpu"]), train.get_args([*out, "--preset", "gpu"])
    assert (cpu.cfg.lr, gpu.cfg.lr) == (3e-3, 1e-3)
    for a in (cpu, gpu):
        assert (a.cfg.betas, a.cfg.min_lr, a.cfg.freeze_vision) == ((0.9, 0.95), 0.1, False)
        assert a.sources["lr"] == f"preset {a.preset}"
    ft = train.get_args(["--preset", "cpu", "--init", str(init_dir), "--lr", "2e-5", "--out", "unused"])
    assert (ft.cfg.lr, ft.sources["lr"]) == (2e-5, "flag")
    assert (ft.cfg.betas, ft.cfg.weight_decay, ft.cfg.freeze_vision) == ((0.9, 0.999), 0.0, True)
    assert ft.sources["betas"] == "--init recipe (StreamingVLM SFT)" and ft.sources["steps"] == "preset cpu"
    assert (ft.cfg.chunk_seconds, ft.cfg.overlap) == (24, 12)  # the authors' windows, whatever the preset


def test_schedule_warms_up_then_cosines_to_the_recipes_floor(tmp_path):
    out = ["--out", str(tmp_path / "unused")]
    ft = train.get_args([*out, "--preset", "cpu", "--steps", "100"]).cfg
    ft.min_lr, ft.lr = 0.0, 1e-5
    assert [train.lr_at(s, ft) for s in range(3)] == pytest.approx([1e-5 / 3, 2e-5 / 3, 1e-5])  # 3% of 100 steps
    assert train.lr_at(99, ft) < 1e-8  # cosine to 0
    scratch = train.get_args([*out, "--preset", "cpu"]).cfg  # 2,800 steps (84 warm-up), cosine to 10% of 3e-3
    assert train.lr_at(2799, scratch) == pytest.approx(3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi * 2715 / 2716)))


def test_help_shows_every_presets_value(capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[cpu 0.003, gpu 0.001, --init 1e-05]" in text
    assert "[cpu 0.9,0.95, gpu 0.9,0.95, --init 0.9,0.999]" in text
    assert "[cpu 2800, gpu 6250]" in text and "[cpu 4, gpu 24, --init 24]" in text and "[default 56]" in text


def test_a_checkpoint_trained_here_keeps_its_frames_and_a_flag_still_wins(init_dir, tmp_path, capsys):
    """A checkpoint train.py made on the synthetic world says its frames in stream.json (frame_size, pixels): a
    fine-tune keeps them rather than the recipe's video limits, which would upscale its 56-pixel frames."""
    ck = tmp_path / "ck"
    shutil.copytree(init_dir, ck)
    (ck / "stream.json").write_text(json.dumps(dict(frame_size=56, min_pixels=3136, max_pixels=6272)))
    train.main(["--init", str(ck), "--out", str(tmp_path / "ft"), "--steps", "1", "--max-pixels", "9408", *SMALL])
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["min_pixels", "3136", "--init", f"{ck}/stream.json"] in lines
    assert ["frame_size", "56", "--init", f"{ck}/stream.json"] in lines
    assert ["max_pixels", "9408", "flag"] in lines
    stream = json.load(open(tmp_path / "ft" / "stream.json"))
    assert (stream["min_pixels"], stream["max_pixels"]) == (3136, 9408)


def test_a_checkpoints_frames_out_of_bounds_are_one_line(init_dir, tmp_path, capsys):
    """The stream.json values a fine-tune keeps pass the same checks as the flags they stand for."""
    ck = tmp_path / "ck"
    shutil.copytree(init_dir, ck)
    (ck / "stream.json").write_text(json.dumps(dict(frame_size=56, min_pixels=10**12)))
    with pytest.raises(SystemExit):
        train.main(["--init", str(ck), "--out", str(tmp_path / "ft"), "--steps", "1", *SMALL])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stream.json" in err and "must be at most" in err, err
    assert not (tmp_path / "ft").exists()
