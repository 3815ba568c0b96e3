"""train.py and checkpoint.py: nothing lost, nothing silently wrong. A checkpoint is whole after a kill at any
moment, the train state is read without unpickling anything, a fresh run does not replace a checkpoint unasked,
a non-finite step stops the run with the last good checkpoint kept, and bad flags get a one-line error."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import checkpoint as ckpt
import train

FAST = ["--steps", "6", "--batch-size", "2", "--eval-every", "3", "--eval-chunks", "1", "--chunk-seconds", "6",
        "--overlap", "3", "--stream-seconds", "600", "--text-sink", "16", "--text-window", "24", "--lr", "3e-3",
        "--workers", "0"]


def run(out, *extra):
    return train.main(["--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The loss history of an uninterrupted 6-step run."""
    return run(tmp_path_factory.mktemp("full") / "ck")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A checkpoint at step 3 of the same 6-step run (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("stopped") / "ck"
    run(out, "--stop-at", "3")
    return out


def copy(stopped, tmp_path):
    out = tmp_path / "ck"
    shutil.copytree(stopped, out)
    return out


def state(out):
    return json.load(open(out / ckpt.STATE))


class Planted:
    """Unpickling this creates the file `marker`: what a malicious pickle could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_train_state_is_json_and_safetensors_and_no_pickle_is_ever_loaded(stopped, full, tmp_path, capsys):
    out, marker = copy(stopped, tmp_path), tmp_path / "pwned"
    s = state(out)
    assert s["step"] == 3 and len(s["history"]) == 3 and s["config"]["lr"] == 3e-3
    assert any(k.endswith(".exp_avg") for k in load_file(out / ckpt.OPTIMIZER))
    torch.save({"optimizer": Planted(str(marker))}, out / "train_state.pt")  # a pickle where the old format was
    resumed = run(out, "--resume")
    assert not marker.exists()
    assert torch.allclose(torch.tensor(resumed), torch.tensor(full), rtol=1e-5)
    shutil.copy(out / "train_state.pt", out / ckpt.OPTIMIZER)  # a pickle where the tensors should be
    with pytest.raises(SystemExit, match="cannot load the optimizer state"):
        run(out, "--resume", "--steps", "6")
    os.remove(out / ckpt.STATE)  # only the pickle is left: named, refused, not loaded
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(out, "--resume")
    assert "train_state.pt is an older pickle format, never loaded" in capsys.readouterr().err
    assert not marker.exists()


def test_killed_save_keeps_the_previous_checkpoint_and_resume_continues_it(stopped, full, tmp_path, monkeypatch):
    out = copy(stopped, tmp_path)
    before = (out / "model.safetensors").read_bytes()

    def killed(*a, **kw):
        raise KeyboardInterrupt("killed while writing the optimizer state")

    monkeypatch.setattr(ckpt, "save_file", killed)  # the save at step 6 dies half-way through
    with pytest.raises(KeyboardInterrupt):
        run(out, "--resume")
    monkeypatch.undo()
    assert os.path.isdir(ckpt.beside(out, "tmp"))  # the half-written folder is left ...
    assert state(out)["step"] == 3 and (out / "model.safetensors").read_bytes() == before  # ... and step 3 whole
    resumed = run(out, "--resume")
    assert not os.path.exists(ckpt.beside(out, "tmp"))  # cleaned up at the start
    assert torch.allclose(torch.tensor(resumed), torch.tensor(full), rtol=1e-5)
    assert state(out)["step"] == 6


@pytest.mark.parametrize("killed_at", [1, 2, 3])
def test_a_swap_killed_anywhere_leaves_one_whole_checkpoint(tmp_path, monkeypatch, killed_at):
    """Kill swap_in at its first rename (old away), its second (new in) or its delete of the old folder: after
    clean_leftovers --out holds the old checkpoint or the new one, whole, and the user's own files."""
    out, tmp = tmp_path / "ck", tmp_path / ".tmp-ck"
    out.mkdir()
    tmp.mkdir()
    for name in ckpt.FILES:
        (out / name).write_text("old")
        (tmp / name).write_text("new")
    (out / "notes.txt").write_text("mine")
    calls = []
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def step(real):
        def wrapped(*a, **kw):
            calls.append(a)
            if len(calls) == killed_at:
                raise KeyboardInterrupt("killed")
            return real(*a, **kw)
        return wrapped

    monkeypatch.setattr(os, "rename", step(real_rename))
    monkeypatch.setattr(shutil, "rmtree", step(real_rmtree))
    with pytest.raises(KeyboardInterrupt):
        ckpt.swap_in(str(tmp), str(out))
    monkeypatch.undo()
    ckpt.clean_leftovers(str(out))
    kept = {(out / name).read_text() for name in ckpt.FILES}
    assert kept == ({"old"} if killed_at < 3 else {"new"})
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no .tmp-ck or .old-ck left


def test_a_save_keeps_the_users_files_and_leaves_nothing_beside(tmp_path):
    out, tmp = tmp_path / "ck", tmp_path / ".tmp-ck"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "loss.png").write_text("png")
    tmp.mkdir()
    (tmp / "config.json").write_text("new")
    ckpt.swap_in(str(tmp), str(out))
    assert (out / "plots" / "loss.png").read_text() == "png" and (out / "config.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_fresh_run_refuses_to_replace_a_checkpoint(stopped, tmp_path, capsys):
    out = copy(stopped, tmp_path)
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(out, "--steps", "1")
    err = capsys.readouterr().err.strip()
    assert "holds a checkpoint" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (out / "model.safetensors").read_bytes() == before
    assert run(out, "--steps", "1", "--overwrite") and state(out)["step"] == 1


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_non_finite_step_stops_and_keeps_the_last_good_checkpoint(stopped, tmp_path, monkeypatch, what):
    out = copy(stopped, tmp_path)
    before = (out / "model.safetensors").read_bytes()
    calls = []
    if what == "loss":
        real = train.loss_sum

        def poisoned(model, batch, device):  # the second step of this run (step 5) goes NaN
            s, n = real(model, batch, device)
            calls.append(1)
            return (s * float("nan") if len(calls) == 2 else s), n
        monkeypatch.setattr(train, "loss_sum", poisoned)
    else:
        real = torch.nn.utils.clip_grad_norm_

        def poisoned(params, clip):
            calls.append(1)
            norm = real(params, clip)
            return norm * float("inf") if len(calls) == 2 else norm
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    with pytest.raises(SystemExit) as e:
        run(out, "--resume")
    assert isinstance(e.value.code, str)  # exits non-zero, with one line
    assert e.value.code.startswith("step 5: non-finite") and "step 3" in e.value.code
    assert "\n" not in e.value.code
    assert state(out)["step"] == 3 and (out / "model.safetensors").read_bytes() == before
    assert all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())


BAD = [
    (["--grad-clip", "0"], "--grad-clip"), (["--overlap", "-1"], "--overlap"), (["--overlap", "24"], "--overlap"),
    (["--text-sink", "-1"], "--text-sink"), (["--text-window", "-2"], "--text-window"),
    (["--chunk-seconds", "24", "--stream-seconds", "10"], "--stream-seconds"),
    (["--question-rate", "1.5"], "--question-rate"),
    (["--fsdp", "--segment-seconds", "2", "--vision-window", "2"], "--fsdp"),
    (["--chunk-seconds", "6", "--segment-seconds", "2"], "--vision-window"),
    (["--chunk-seconds", "24", "--segment-seconds", "12"], "evicts nothing"),
    (["--preroll", "8"], "--preroll"), (["--preroll", "-1"], "--preroll"),
    (["--chunk-seconds", "24", "--segment-seconds", "8", "--preroll", "32", "--stream-seconds", "50"], "--preroll"),
    (["--warmup", "1"], "--warmup"), (["--eval-every", "0"], "--eval-every"), (["--eval-chunks", "0"], "--eval-chunks"),
    (["--stop-at", "0"], "--stop-at"), (["--steps", "10", "--stop-at", "11"], "--stop-at"), (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"), (["--lr", "x"], "--lr"), (["--steps", "0"], "--steps"), (["--workers", "-1"], "--workers"),
    (["--weight-decay", "-0.1"], "--weight-decay"), (["--betas", "0.9"], "--betas"), (["--betas", "1,0.9"], "--betas"),
    (["--min-lr", "2"], "--min-lr"), (["--batch-size", "0"], "--batch-size"), (["--grad-accum", "0"], "--grad-accum"),
    (["--frame-size", "60"], "--frame-size"), (["--width", "100"], "--width"), (["--layers", "0"], "--layers"),
    (["--min-pixels", "9000", "--max-pixels", "5000"], "--min-pixels"),
    (["--event-rate", "0.9", "--goal-rate", "0.2"], "--event-rate"), (["--goal-rate", "0.2:0.1"], "--goal-rate"),
    (["--segment-event-rate", "0.9", "--segment-goal-rate", "0.2", "--segment-steps", "10", "--segment-seconds", "8",
      "--segment-chunk-seconds", "24"], "--segment-event-rate"), (["--segment-event-rate", "1.5"], "--segment-event-rate"),
    (["--segment-event-rate", "0.1"], "--segment-event-rate set(s) the segment phase"),
    (["--resume", "--overwrite"], "--overwrite"), (["--device", "nonsense"], "--device"),
    (["--fsdp"], "--fsdp"), (["--data", "missing.jsonl"], "--data"), (["--init", "."], "--init"),
    (["--long-seconds", "90:60"], "--long-seconds"), (["--long-seconds", "1"], "--long-seconds"),
    (["--long-seconds", "60", "--chunk-seconds", "24", "--segment-seconds", "8"], "--long-seconds"),
]


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags_get_a_one_line_error(argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:
        train.get_args(["--out", str(tmp_path / "ck"), "--preset", "cpu", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and flag in err, err


def test_settings_that_need_context_get_a_one_line_error(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text("")
    cases = [(["--resume"], "no train_state.json"),
             (["--data", str(tmp_path / "x.jsonl"), "--event-rate", "0.2"], "only apply to the synthetic world"),
             (["--data", str(tmp_path / "x.jsonl"), "--segment-seconds", "8", "--chunk-seconds", "24", "--preroll",
               "8"], "--preroll only apply"),
             (["--data", str(tmp_path / "x.jsonl"), "--steps", "9", "--segment-steps", "3", "--segment-seconds", "8"],
              "the segment phase's chunks are synthetic"),
             (["--preset", "gpu", "--steps", "200"], "--segment-steps (250, preset gpu) must leave some of --steps"),
             (["--segment-lr", "1e-4"], "--segment-lr set(s) the segment phase: it needs --segment-steps")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for argv, words in cases:
        with pytest.raises(SystemExit):
            train.get_args(["--out", str(tmp_path / "ck"), *argv])
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    # a fine-tune from a checkpoint follows StreamingVLM's recipe: plain chunks, no segment phase from the gpu preset
    init = tmp_path / "init"
    init.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (init / name).write_text("{}")
    cfg = train.get_args(["--out", str(tmp_path / "ck"), "--preset", "gpu", "--init", str(init)]).cfg
    assert (cfg.segment_steps, cfg.segment_seconds) == (0, 0)


@pytest.mark.parametrize("change", [["--grad-clip", "0.5"], ["--weight-decay", "0.1"], ["--betas", "0.9,0.99"],
                                    ["--warmup", "0.1"], ["--min-lr", "0"], ["--grad-accum", "2"],
                                    ["--question-rate", "0.5"], ["--freeze-vision"]])
def test_resume_refuses_other_optimisation_or_data_settings(stopped, change):
    flag = change[0]
    with pytest.raises(SystemExit, match=f"--resume with other settings .*{flag}"):
        run(stopped, "--resume", *change)


def test_resume_may_change_bookkeeping_but_not_stop_before_the_checkpoint(stopped, tmp_path):
    out = copy(stopped, tmp_path)
    with pytest.raises(SystemExit, match="already at step 3"):
        run(out, "--resume", "--stop-at", "2")
    assert run(out, "--resume", "--stop-at", "4", "--eval-every", "4", "--eval-chunks", "2")[-1] > 0


def test_resume_a_run_that_used_a_removed_setting_is_refused(stopped, full, tmp_path):
    """A train state written with a setting this train.py no longer has: refused if the run used it, resumed exactly
    if the run left it off."""
    out = copy(stopped, tmp_path)
    saved = state(out)
    saved["config"]["evict_seconds"] = 8
    (out / ckpt.STATE).write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="used --evict-seconds 8, which this train.py no longer has"):
        run(out, "--resume")
    saved["config"]["evict_seconds"] = 0
    (out / ckpt.STATE).write_text(json.dumps(saved))
    assert torch.allclose(torch.tensor(run(out, "--resume")), torch.tensor(full), rtol=1e-5)


def test_resume_a_run_saved_before_a_setting_existed(stopped, full, tmp_path):
    """A train state written before --vision-window existed ran as with its default: resuming it with the default
    continues the run exactly; asking for another value is refused."""
    out = copy(stopped, tmp_path)
    saved = state(out)
    del saved["config"]["vision_window"]
    (out / ckpt.STATE).write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="--vision-window 16 -> 2"):
        run(out, "--resume", "--vision-window", "2")
    assert torch.allclose(torch.tensor(run(out, "--resume")), torch.tensor(full), rtol=1e-5)
