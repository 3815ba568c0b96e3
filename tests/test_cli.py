"""cli.py and the scripts' first checks: a user's mistake is one line before any work (an output that cannot be
written, the shipped checkpoint as --out, a full-size benchmark on a CPU, a bad seed)."""
import os

import pytest

import cli


def refused(main, argv, capsys):
    """main(argv) must stop with a one-line error (argparse's exit status 2, no usage block, no traceback)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    return err


def test_unwritable_says_why(tmp_path):
    (tmp_path / "a_file").write_text("")
    assert cli.unwritable(str(tmp_path / "new" / "folder")) is None and (tmp_path / "new" / "folder").is_dir()
    assert cli.unwritable(str(tmp_path / "new2" / "out.jsonl"), folder=False) is None
    assert not (tmp_path / "new2" / "out.jsonl").exists()  # only its folder is made
    assert "a file is in the way" in cli.unwritable(str(tmp_path / "a_file" / "out"))
    assert "a file is in the way" in cli.unwritable(str(tmp_path / "a_file" / "x.vtt"), folder=False)
    assert "not a folder" in cli.unwritable(str(tmp_path / "a_file"))
    assert "not a file" in cli.unwritable(str(tmp_path / "new"), folder=False)
    assert os.listdir(tmp_path / "new" / "folder") == []  # the probe file is gone


def test_the_shipped_checkpoints_folder_is_recognised_however_written(tmp_path, monkeypatch):
    home = os.path.dirname(cli.SHIPPED)
    for path in (cli.SHIPPED, home, os.path.join(home, "other"), os.path.join(home, "..", "checkpoints", "tiny")):
        assert cli.touches_shipped(path), path
    monkeypatch.chdir(os.path.dirname(home))
    assert cli.touches_shipped("checkpoints/tiny") and cli.touches_shipped("./checkpoints")
    assert not cli.touches_shipped("out/tiny") and not cli.touches_shipped(str(tmp_path))


def test_train_never_writes_into_checkpoints_and_checks_out_first(tmp_path, capsys):
    from train import main
    for out in (cli.SHIPPED, os.path.dirname(cli.SHIPPED)):
        assert "home of the shipped model" in refused(main, ["--out", out, "--overwrite", "--steps", "1"], capsys)
    (tmp_path / "a_file").write_text("")
    err = refused(main, ["--out", str(tmp_path / "a_file" / "run"), "--steps", "1"], capsys)
    assert "--out" in err and "cannot write there" in err


def test_demo_flags(tmp_path, capsys):
    from demo import main
    assert "--seed: must be in [0, 1000000)" in refused(main, ["--seed", "5000000"], capsys)
    assert "--seconds: must be >= 1" in refused(main, ["--seconds", "0"], capsys)
    (tmp_path / "a_file").write_text("")
    assert "cannot write there" in refused(main, ["--out", str(tmp_path / "a_file" / "d.gif")], capsys)


def test_full_size_benchmarks_are_refused_on_a_cpu(tmp_path, capsys):
    from bench_flexprefill import main as flex
    from bench_stream import main as stream
    err = refused(stream, ["--device", "cpu", "--out", str(tmp_path)], capsys)
    assert "--preset 7B" in err and "--preset tiny" in err
    err = refused(flex, ["--device", "cpu"], capsys)
    assert "--lengths up to 131072" in err and "--lengths 1024" in err
