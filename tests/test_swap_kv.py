"""tools/swap_kv.py: the swapped caches decode what they should on the shipped model (CPU, a short stream)."""
import os

import pytest

from tools.swap_kv import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fresh_everything_decodes_as_recompute_and_streamed_as_streaming(capsys):
    """Swapping every kept token's K/V for the fresh prefill's is the recompute policy's computation (one forward
    over the kept tokens and the new turn, here in two), so it decodes the same reply. Second 111 of held-out
    stream 65 is a goal the shipped model misreads while streaming with once-a-second eviction ("Blue 1" for
    "Blue 0", eval.py --seed 65 --evict-every 1) and reads right under recompute: the swaps change what is
    decoded, and the streamed cache decodes the miss."""
    out = main(["--model", os.path.join(ROOT, "checkpoints", "tiny"), "--seed", "65", "--second", "111",
                "--device", "cpu"])  # --evict-every 1, the default
    assert out["truth"] == out["recompute"] == out["fresh: everything kept"] == "Red scores! Red 2, Blue 0."
    assert out["streamed (reused K/V)"] == "Red scores! Red 2, Blue 1."
    # what docs/RESULTS.md reports for this second: the user turns' K/V decide it, the previous text's do not
    assert out["fresh: their user turns (frames, prompt)"] == out["truth"]
    assert out["fresh: previous text"] == out["fresh: their replies"] == out["streamed (reused K/V)"]
    assert len(out) == 10 and "previous text" in capsys.readouterr().out


def test_bad_flags_get_one_line(capsys):
    """A bad flag: argparse's exit status 2 and one line that names it."""
    with pytest.raises(SystemExit) as e:
        main(["--seed", "-1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--seed" in err
