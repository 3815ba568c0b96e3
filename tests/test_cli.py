"""cli.py and the scripts' first checks: a user's mistake is one line before any work (an output that cannot be
written, the shipped checkpoint as --out, a full-size benchmark on a CPU, a bad seed)."""
import os

import pytest

import cli
from conftest import refused


def test_unwritable_says_why_and_creates_nothing(tmp_path):
    (tmp_path / "a_file").write_text("")
    assert cli.unwritable(str(tmp_path / "new" / "folder")) is None
    assert cli.unwritable(str(tmp_path / "new2" / "out.jsonl"), folder=False) is None
    assert "a_file is a file, not a folder" in cli.unwritable(str(tmp_path / "a_file" / "out"))
    assert "a_file is a file, not a folder" in cli.unwritable(str(tmp_path / "a_file" / "x.vtt"), folder=False)
    assert "not a folder" in cli.unwritable(str(tmp_path / "a_file"))
    assert "not a file" in cli.unwritable(str(tmp_path), folder=False)
    assert "not a file name" in cli.unwritable(str(tmp_path / "x") + os.sep, folder=False)
    assert "not a folder name" in cli.unwritable("")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    assert "broken symlink" in cli.unwritable(str(tmp_path / "dangling" / "sub"))
    assert "broken symlink" in cli.unwritable(str(tmp_path / "dangling" / "x.vtt"), folder=False)
    os.remove(tmp_path / "dangling")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # no folder made, no probe file left


def test_the_shipped_checkpoints_folder_is_recognised_however_written(tmp_path, monkeypatch):
    home = os.path.dirname(cli.SHIPPED)
    for path in (cli.SHIPPED, home, os.path.join(home, "other"), os.path.join(home, "..", "checkpoints", "tiny"),
                 os.path.dirname(home)):  # the repository itself holds it
        assert cli.touches_shipped(path), path
    monkeypatch.chdir(os.path.dirname(home))
    assert cli.touches_shipped("checkpoints/tiny") and cli.touches_shipped("./checkpoints") and cli.touches_shipped(".")
    assert not cli.touches_shipped("out/tiny") and not cli.touches_shipped(str(tmp_path))
    assert not cli.touches_shipped("checkpoints2") and not cli.touches_shipped("checkpoints2/x")


def test_train_never_writes_into_checkpoints_and_checks_out_first(tmp_path, capsys):
    from train import get_args
    for out in (cli.SHIPPED, os.path.dirname(cli.SHIPPED), os.path.dirname(os.path.dirname(cli.SHIPPED))):
        assert "home of the shipped model" in refused(get_args, ["--out", out, "--overwrite"], capsys)
    (tmp_path / "a_file").write_text("")
    err = refused(get_args, ["--out", str(tmp_path / "a_file" / "run")], capsys)
    assert "--out" in err and "cannot write there" in err


def test_checking_out_leaves_a_killed_save_to_be_restored(tmp_path):
    """A save killed between its two renames leaves only .old-NAME; the check must not make NAME, or the restore
    (checkpoint.clean_leftovers) would take the empty folder for the checkpoint and delete the real one."""
    import checkpoint
    from train import get_args
    old = tmp_path / ".old-run"
    old.mkdir()
    (old / "config.json").write_text("{}")
    get_args(["--out", str(tmp_path / "run"), "--resume"])
    assert not (tmp_path / "run").exists()
    checkpoint.clean_leftovers(str(tmp_path / "run"))
    assert (tmp_path / "run" / "config.json").exists()


def test_eval_never_writes_into_checkpoints(capsys):
    from eval import get_args
    assert "home of the shipped model" in refused(get_args, ["--out", cli.SHIPPED, "--seconds", "1"], capsys)


def test_demo_flags(tmp_path, capsys):
    from tools.demo import main
    out = ["--out", str(tmp_path / "d.gif")]
    assert "--seed: must be in [0, 1000000)" in refused(main, ["--seed", "5000000", *out], capsys)
    assert "--seconds: must be >= 1" in refused(main, ["--seconds", "0", *out], capsys)
    (tmp_path / "a_file").write_text("")
    assert "cannot write there" in refused(main, ["--out", str(tmp_path / "a_file" / "d.gif")], capsys)
    assert not (tmp_path / "d.gif").exists()


def test_full_size_benchmarks_are_refused_on_a_cpu(tmp_path, capsys, monkeypatch):
    from tools import bench_flexprefill
    from tools.bench_stream import get_args
    err = refused(get_args, ["--device", "cpu", "--out", str(tmp_path)], capsys)
    assert "--preset 7B" in err and "--preset tiny" in err
    monkeypatch.setattr(bench_flexprefill, "kernel_bench", lambda args: pytest.fail("the benchmark ran"))
    err = refused(bench_flexprefill.main, ["--device", "cpu"], capsys)
    assert "--lengths up to 131072" in err and "--lengths 1024" in err
