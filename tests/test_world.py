"""Tests for world.py: determinism, random access, score bookkeeping, visible cues, rates."""
import re

import pytest
from PIL import Image

from world import (COLOUR, EVENTS, FLASH, TEAMS, YELLOW, SportsStream, WorldConfig,
                   commentary, event_table, parse_event, save_gif, split_seed, time_label)

LONG = 20_000  # seconds scanned by the rate / score tests (metadata only, no rendering)
SENTENCE = re.compile(r"^((Red|Blue) scores! Red \d+, Blue \d+\.|(Red|Blue) shoots!|"
                      r"(Red|Blue) keeper saves\.|Foul by (Red|Blue)\.|Corner for (Red|Blue)\.)$")


def frames_bytes(sec):
    return [f.tobytes() for f in sec.frames]


def first_of_each(stream, horizon=LONG):
    """First second of every (event, team) pair and of a quiet second."""
    found = {}
    for t in range(horizon):
        key = stream.event(t)
        found.setdefault(key, t)
        if len(found) == 1 + len(EVENTS) * len(TEAMS):
            return found
    raise AssertionError(f"not every event/team pair occurs in {horizon} s: {sorted(found, key=str)}")


def pixels(im):
    """RGB tuples in raster order (tobytes works on every Pillow; getdata is deprecated)."""
    b = im.tobytes()
    return [tuple(b[i:i + 3]) for i in range(0, len(b), 3)]


def count(im, colours, box=None):
    """Pixels of `im` (optionally inside box x0, y0, x1, y1 inclusive) with one of `colours`."""
    if box:
        im = im.crop((box[0], box[1], box[2] + 1, box[3] + 1))
    colours = set(colours)
    return sum(1 for p in pixels(im) if p in colours)


def test_deterministic_per_seed():
    a, b, c = (SportsStream(WorldConfig(seed=s)) for s in (7, 7, 8))
    for t in range(0, 40):
        sa, sb = a.second(t), b.second(t)
        assert frames_bytes(sa) == frames_bytes(sb)
        assert (sa.event, sa.team, sa.text, sa.score) == (sb.event, sb.team, sb.text, sb.score)
    assert a.transcript(0, 2000) == b.transcript(0, 2000)
    assert a.transcript(0, 2000) != c.transcript(0, 2000)
    assert frames_bytes(a.second(3)) != frames_bytes(c.second(3))


def test_random_access_equals_sequential():
    seq = list(SportsStream(WorldConfig(seed=11)).seconds(4990, 5010))
    fresh = SportsStream(WorldConfig(seed=11))  # nothing cached: jump straight to t ~ 5000
    for sec in reversed(seq):
        ra = fresh.second(sec.t)
        assert ra.t == sec.t
        assert frames_bytes(ra) == frames_bytes(sec)
        assert (ra.event, ra.team, ra.text, ra.score) == (sec.event, sec.team, sec.text, sec.score)
    # seconds() without an end is endless; take a few
    it = fresh.seconds(7)
    assert [next(it).t for _ in range(3)] == [7, 8, 9]


@pytest.mark.parametrize("world", [dict(seed=3), dict(seed=1_999_999, event_rate=0.3, goal_rate=0.15),
                                   dict(seed=12, event_rate=0.0, goal_rate=0.01)])
def test_event_table_is_event_second_by_second(world):
    """The numpy scan (the fast path) against SportsStream.event, the definition, over 10,000 seconds from 5,000."""
    cfg = WorldConfig(**world)
    stream = SportsStream(cfg)
    slow = [(t, *stream.event(t)) for t in range(5_000, 15_000) if stream.event(t)[0]]
    assert event_table(cfg, 5_000, 15_000) == slow and len(slow) > 50


def test_score_bookkeeping():
    s = SportsStream(WorldConfig(seed=5))
    red = blue = 0
    goals = 0
    for t, text in s.transcript(0, LONG):
        assert text and SENTENCE.match(text), text
        g = parse_event(text)
        if g is None or g[0] != "goal":
            continue
        _, scorer, (r, b) = g
        red, blue = red + (scorer == "Red"), blue + (scorer == "Blue")
        assert (r, b) == (red, blue), (t, text)
        assert s.score(t) == (red, blue) and s.score(t - 1) == (red - (scorer == "Red"), blue - (scorer == "Blue"))
        goals += 1
    assert goals > 50 and s.score(LONG - 1) == (red, blue)
    # a fresh stream asked out of order agrees with the cumulative count
    fresh = SportsStream(WorldConfig(seed=5))
    for t in (LONG - 1, 1234, 0, 9999):
        gs = [g for g in s.events(0, t + 1) if g[1] == "goal"]
        assert fresh.score(t) == (sum(g[2] == "Red" for g in gs), sum(g[2] == "Blue" for g in gs))
    assert parse_event("Red shoots!") == ("shot", "Red", None) and parse_event("Red scores!") is None
    assert commentary("goal", "Blue", (3, 2)) == "Blue scores! Red 3, Blue 2."


def test_quiet_and_event_texts():
    s = SportsStream(WorldConfig(seed=2))
    n_quiet = 0
    for sec in s.seconds(0, 60):
        if sec.event is None:
            n_quiet += 1
            assert sec.text == "" and sec.team is None
        else:
            assert sec.event in EVENTS and sec.team in TEAMS
            assert SENTENCE.match(sec.text) and not sec.text.startswith(" ")
            assert sec.team in sec.text
    assert n_quiet > 30
    assert all(text for _, text in s.transcript(0, 500))


def test_every_event_has_a_visible_team_cue():
    s = SportsStream(WorldConfig(seed=3))
    S = s.cfg.size
    nets = [s._net_box(0), s._net_box(1)]
    team_cols = {tm: {COLOUR[tm], FLASH[tm]} for tm in TEAMS}
    # Quiet seconds: no cue colours where cues go.
    quiet = [t for t in range(300) if s.event(t)[0] is None][:25]
    for t in quiet:
        for f in s.second(t).frames:
            assert count(f, {YELLOW, *FLASH.values()}) == 0
            assert all(count(f, team_cols[tm], box) == 0 for box in nets for tm in TEAMS)
    for (ev, team), t in first_of_each(s).items():
        if ev is None:
            continue
        other = TEAMS[1 - TEAMS.index(team)]
        attack = 1 if team == "Red" else 0  # Red attacks the right-hand goal
        sec = s.second(t)
        assert (sec.event, sec.team) == (ev, team)
        for i, f in enumerate(sec.frames):
            plain = s.render(t, i)  # the same moment with no event
            changed = [p for p, q in zip(pixels(f), pixels(plain)) if p != q]
            assert len(changed) >= 30, (ev, team, len(changed))
            mine = sum(p in team_cols[team] for p in changed)
            yellow = count(f, {YELLOW})
            if ev == "goal":
                box = nets[attack]
                area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
                assert count(f, team_cols[team], box) >= 0.6 * area
                assert count(f, team_cols[team] | team_cols[other], nets[1 - attack]) == 0
            elif ev == "shot":
                assert mine >= 25 and mine > sum(p in team_cols[other] for p in changed)
                assert yellow == 0
            elif ev == "save":  # own goal is on the side the team does not attack
                ys = [(x, y) for y in range(S) for x in range(S) if f.getpixel((x, y)) == YELLOW]
                assert len(ys) >= 40
                cx = sum(x for x, _ in ys) / len(ys)
                assert (cx > S / 2) == (team == "Blue")
                x0, x1 = min(x for x, _ in ys), max(x for x, _ in ys)
                y0, y1 = min(y for _, y in ys), max(y for _, y in ys)
                assert count(f, {COLOUR[team]}, (x0, y0, x1, y1)) >= 5
            elif ev == "foul":
                c, h = S // 2, S // 4
                card = (c - h, c - h, c + h, c + h)
                assert count(f, {YELLOW}, card) == yellow >= 40
                assert count(f, {COLOUR[team]}, card) >= 30
            elif ev == "corner":
                rq = round(0.16 * S)
                xs = (S - 1 - rq, S - 1) if attack else (0, rq)
                boxes = [(xs[0], 0, xs[1], rq), (xs[0], S - 1 - rq, xs[1], S - 1)]
                assert max(count(f, {COLOUR[team]}, b) for b in boxes) >= 80
                assert yellow == 0


def test_quiet_corners_stay_below_corner_cue():
    s = SportsStream(WorldConfig(seed=4))
    S = s.cfg.size
    rq = round(0.16 * S)
    boxes = [(x, y, x + rq, y + rq) for x in (0, S - 1 - rq) for y in (0, S - 1 - rq)]
    for t in [t for t in range(400) if s.event(t)[0] is None][:60]:
        for f in s.second(t).frames:
            assert max(count(f, set(COLOUR.values()), b) for b in boxes) < 60


def test_split_seeds_disjoint_and_validated():
    train = {split_seed("train", i) for i in (0, 1, 999_999)}
    evals = {split_seed("eval", i) for i in (0, 1, 999_999)}
    assert not train & evals
    assert max(train) < 1_000_000 <= min(evals)
    for bad in [("test", 0), ("train", -1), ("eval", 1_000_000)]:
        with pytest.raises(ValueError):
            split_seed(*bad)


def test_config_validation():
    for kw in [dict(size=50), dict(size=28), dict(fps=0), dict(seed=-1), dict(goal_rate=0.5, event_rate=0.6),
               dict(players_per_team=1), dict(event_rate=-0.1)]:
        with pytest.raises(ValueError):
            WorldConfig(**kw)


def test_rates_over_a_long_stream():
    s = SportsStream(WorldConfig(seed=9))
    ev = s.events(0, LONG)
    goals = sum(e == "goal" for _, e, _ in ev)
    assert 80 <= goals <= 200  # expect 20_000 / 150 = 133
    assert 2200 <= len(ev) - goals <= 2600  # expect 0.12 * 20_000 = 2400
    assert 0.45 < sum(tm == "Red" for _, _, tm in ev) / len(ev) < 0.55
    for kind in EVENTS[1:]:
        assert 450 <= sum(e == kind for _, e, _ in ev) <= 750  # expect 600 each
    busy = SportsStream(WorldConfig(seed=9, goal_rate=1 / 50))
    assert 300 <= sum(e == "goal" for _, e, _ in busy.events(0, LONG)) <= 500  # expect 400


def test_frame_size_and_count():
    for size, fps in [(56, 2), (84, 3)]:
        sec = SportsStream(WorldConfig(seed=1, size=size, fps=fps)).second(17)
        assert len(sec.frames) == fps
        assert all(isinstance(f, Image.Image) and f.size == (size, size) and f.mode == "RGB" for f in sec.frames)
    # players keep moving through quiet seconds
    s = SportsStream(WorldConfig(seed=1))
    a, b = s.second(20).frames
    assert a.tobytes() != b.tobytes()


def test_save_gif(tmp_path):
    s = SportsStream(WorldConfig(seed=0))
    path = tmp_path / "w.gif"
    save_gif(s, str(path), 3)
    with Image.open(path) as im:
        assert im.n_frames == 3 * s.cfg.fps


def test_long_questions_answer_from_the_commentary():
    """Each timed question's answer, read back from the commentary as a model would have to: the goal sentence at
    the second for the score, the goal sentences before it for the count, the sentence at it."""
    import random
    from world import LONG_QUESTIONS, long_question, parse_event
    w = SportsStream(WorldConfig(seed=3))
    said = {t: parse_event(text) for t, text in w.transcript(0, 1200)}
    goals = {t: p for t, p in said.items() if p and p[0] == "goal"}
    assert len(goals) >= 4
    rng = random.Random(0)
    for _ in range(40):
        for kind in ["score", "goals", *LONG_QUESTIONS]:
            q, a = long_question(kind, w, 1200, rng)
            if kind in ("score", "goals"):  # world.QUESTIONS: the last goal sentence
                last = goals[max(goals)][2]
                assert a == ("Red {}, Blue {}.".format(*last) if kind == "score" else f"{sum(last)} goals.")
                continue
            if kind == "first":
                assert a == f"{goals[min(goals)][1]}."
                continue
            t = int(q.split("=")[-1].split(".")[0])  # "... at Time=788.0-789.0s?" -> 788
            assert q.endswith(f" {time_label(t)}?")
            assert t in goals  # a timed question names a goal's second: a lookup
            before = [g for g in goals if g <= t]
            if kind == "score_at":
                assert a == ("Red {}, Blue {}.".format(*goals[max(before)][2]) if before else "Red 0, Blue 0.")
            elif kind == "goals_before":
                assert a == f"{len([g for g in goals if g < t])} goals."
            else:
                assert t in goals and a == f"{goals[t][1]}."


def test_long_questions_never_name_a_goal_twice():
    import random

    from world import LONG_QUESTIONS, QUESTIONS, long_question, long_questions
    w = SportsStream(WorldConfig(seed=7, goal_rate=0.05))
    goals = [t for t, e, _ in w.events(0, 600) if e == "goal"]
    asked = long_questions(w, 600, 64, random.Random(0))
    assert asked == long_questions(w, 600, 64, random.Random(0))  # a function of the rng's seed
    assert len(asked) == 3 + len(goals) and len({a for _, a in asked}) < len(asked)  # answers may coincide ...
    assert set(QUESTIONS.values()) <= {q for q, _ in asked}  # ... but the whole-stretch three are each asked once
    kind_of = {text.split("{")[0]: k for k, text in LONG_QUESTIONS.items() if "{" in text}
    named = []
    for q, a in asked:
        if "Time=" in q:  # each timed answer is long_question's for its kind and second
            t = int(q.split("=")[-1].split(".")[0])
            kind = kind_of[q.split("Time=")[0]]
            assert long_question(kind, w, 600, None, t) == (q, a)
            named.append((kind, t))
    assert sorted(t for _, t in named) == goals  # every goal named, once
    assert ("score_at", goals[-1]) not in named and ("scorer_at", goals[0]) not in named  # the score's, the first's
    short = long_questions(w, 600, 5, random.Random(1))
    assert len(short) == 5 and set(QUESTIONS.values()) <= {q for q, _ in short}
    quiet = SportsStream(WorldConfig(seed=7, goal_rate=0.0))  # no goal: nothing to time, the three alone
    assert sorted(q for q, _ in long_questions(quiet, 100, 64, random.Random(0))) == sorted(QUESTIONS.values())
    quiet_second = next(t for t in range(600) if t not in goals)
    with pytest.raises(ValueError, match=f"scorer_at: second {quiet_second} is not a goal"):
        long_question("scorer_at", w, 600, None, quiet_second)
    with pytest.raises(ValueError, match="score_at: second 600 is not a second"):
        long_question("score_at", w, 600, None, 600)


def test_said_at_questions_add_lookups_of_every_event():
    """long_questions(said_at=True): "said_at" joins the goals' timed kinds, and the room left asks for the sentences
    of other events' seconds, each once; the answer is the sentence as the prompt says it; without it the questions
    are exactly the plain ones."""
    import random

    from world import QUESTIONS, SAID_AT, long_question, long_questions
    w = SportsStream(WorldConfig(seed=7, goal_rate=0.05))
    goals = [t for t, e, _ in w.events(0, 600) if e == "goal"]
    others = [t for t, e, _ in w.events(0, 600) if e != "goal"]
    assert long_questions(w, 600, 64, random.Random(0), said_at=False) == long_questions(w, 600, 64, random.Random(0))
    asked = long_questions(w, 600, 64, random.Random(0), said_at=True)
    assert len(asked) == 64 < 3 + len(goals) + len(others) and set(QUESTIONS.values()) <= {q for q, _ in asked}
    said = {int(q.split("=")[-1].split(".")[0]): a for q, a in asked if q.startswith(SAID_AT.split("{")[0])}
    timed = [int(q.split("=")[-1].split(".")[0]) for q, _ in asked if "Time=" in q]
    assert sorted(t for t in timed if t in goals) == goals and len(set(timed)) == len(timed)  # each second once
    assert set(said) - set(goals) <= set(others) and len(set(said) - set(goals)) == 64 - 3 - len(goals)
    assert goals[0] not in said and goals[-1] not in said  # the first scorer's and the score's sentences
    for t, a in said.items():
        assert a == w.text(t) and long_question("said_at", w, 600, None, t) == (SAID_AT.format(time=time_label(t)), a)
    assert long_question("said_at", w, 600, None, next(t for t in range(600) if t not in goals + others))[1] == "..."
