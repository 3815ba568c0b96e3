"""Free-running decoding stops where it should, on the plain loop and on the graph step (decode="graphs", eager on
the CPU): at the first stop token, which is said but never fed, or at the cap, max_new_tokens tokens said and
all but the last fed. What each second returns and what its cache holds are checked against greedy decoding
written out by hand: every token an argmax of a fresh forward over the whole sequence so far (no cache), the
reply cut at the first stop or at the cap, and the next second's prompt built from layout.py's pieces.
Without eviction (full attention) the cache must hold exactly that sequence, so one token too few or too many
decoded, fed or handed back fails here."""
import pytest
import torch

from layout import Kind, end_ids, prefix_segments, stop_ids, user_ids
from processor import preprocess_video
from stream import Streamer

from conftest import frames, tiny_model


def by_hand(model, tok, seconds, cap, stops):
    """[(reply tokens said, text)] per second, and the token sequence fed by then: greedy decoding with a fresh
    forward per token. A reply ends at its first stop token or after `cap` tokens; its last token is not fed, and
    the next second begins with the whole end of a reply (' ...' <|im_end|> '\\n': the replies here never say
    ' ...' themselves, the test checks that)."""
    seq = [i for ids, _ in prefix_segments(tok) for i in ids]
    pvs, grids, said = [], [], []
    for t in range(seconds):
        pv, grid, _ = preprocess_video(frames(t), min_pixels=28 * 28 * 4)
        pvs.append(pv)
        grids.append(grid)
        seq += (end_ids(tok) if t else []) + user_ids(tok, t, int(grid.prod()) // 4)
        out = []
        while True:
            with torch.no_grad():
                logits = model(torch.tensor([seq]), pixel_values_videos=torch.cat(pvs),
                               video_grid_thw=torch.cat(grids))
            out.append(int(logits[0, -1].argmax()))
            if out[-1] in stops or len(out) == cap:
                break
            seq.append(out[-1])
        content = out[:-1] if out[-1] in stops else out
        said.append((out, tok.decode(content).strip()))
    return said, seq


def stream(model, tok, decode, cap, seconds, extra_stop=None):
    s = Streamer(model, tok, evict=False, max_new_tokens=cap, decode=decode)  # full attention
    if extra_stop is not None:
        s.stops = s.stops | {extra_stop}
    return s, [s.step(frames(t)) for t in range(seconds)]


def check(s, texts, said, seq, tok):
    """The streamer returned the hand-decoded texts and fed exactly the hand-built sequence."""
    assert texts == [text for _, text in said]
    ids, kinds, _ = s.cache.tokens()
    assert ids.tolist() == seq
    assert s.pending == [(end_ids(tok), Kind.END)]  # the whole end of the last reply is still to be fed
    # the reply tokens fed (all said but the last) are REPLY tokens of their second
    assert int((kinds == Kind.REPLY).sum()) == sum(len(out) - 1 for out, _ in said)


@pytest.mark.parametrize("decode", ["plain", "graphs"])
@pytest.mark.parametrize("cap", [1, 2, 5])
def test_decoding_stops_exactly_at_the_cap(tok, decode, cap):
    """No stop token said: every second says exactly `cap` tokens and feeds cap - 1 of them (cap - 1 decode
    forwards; none queued past the cap on the graph path)."""
    model = tiny_model(tok, layers=2, seed=5)
    said, seq = by_hand(model, tok, 2, cap, stops=set())
    silence = tok.encode(" ...")
    for out, _ in said:  # the premises: the cap, not a stop, ends each reply, and no reply says ' ...'
        assert len(out) == cap and not set(out) & stop_ids(tok), "a stop token in the reference: pick another seed"
        assert not any(out[i:i + len(silence)] == silence for i in range(len(out)))
    s, texts = stream(model, tok, decode, cap, 2)
    check(s, texts, said, seq, tok)
    assert s.forwards == 2 * (cap - 1)


@pytest.mark.parametrize("decode", ["plain", "graphs"])
@pytest.mark.parametrize("at", [0, 2])
def test_decoding_stops_exactly_at_the_stop_token(tok, decode, at):
    """The token the model says at index `at` of its first reply is made a stop token: the reply ends there,
    before the cap; the stop is said but not fed, and the tokens before it are (the plain loop runs exactly one
    forward per fed token; the graph path one more, queued ahead and dropped)."""
    model = tiny_model(tok, layers=2, seed=5)
    cap = 6
    free, _ = by_hand(model, tok, 1, cap, stops=set())
    stop = free[0][0][at]
    assert stop not in free[0][0][:at]
    said, seq = by_hand(model, tok, 2, cap, stops=stop_ids(tok) | {stop})
    assert said[0][0] == free[0][0][:at + 1]  # the first reply ends at the stop, before the cap
    s, texts = stream(model, tok, decode, cap, 2, extra_stop=stop)
    check(s, texts, said, seq, tok)
    fed = sum(len(out) - 1 for out, _ in said)
    if decode == "plain":
        assert s.forwards == fed
    else:  # a step queued past a stop ran and was dropped: at most one a reply
        assert fed <= s.forwards <= fed + len(said)
