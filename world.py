"""A tiny, endless, procedurally generated football stream with ground-truth commentary.

StreamingVLM has to comment on a video that never ends, one second at a time, while
seeing only a short window of recent frames. To train and test that on a CPU we need a
video "world" that is:

* endless and random-access: ``second(5000)`` must be as cheap as ``second(0)``. So
  nothing here is simulated step by step. Each second's event is drawn from a hash of
  ``(seed, t)``, and players and ball follow smooth sums of sines of the time,
  so any frame is a pure function of ``(seed, t)``. The one thing that depends on the
  past is the score; we keep a cached, lazily extended list of goal times and answer
  score queries with a bisect.
* learnable by a tiny vision tower: frames are small (default 56x56, a multiple of the
  28x28 merge unit of 14x14 patches). Every event has a big cue that is drawn in all
  frames of its second, and each cue shows the team, because the commentary names it:
    goal    the net the ball is in is filled with the scorer's colour, flashing
    shot    a thick streak in the shooter's colour from the shooter to the ball near the goal
    save    the keeper on the ball in front of their own goal, on a yellow "glove" square
    foul    a yellow card in the centre circle, framed in the offending team's colour
    corner  the ball at a corner flag, on a quarter disc in the attacking team's colour
  Red always attacks the right-hand goal and Blue the left, so the location of a cue
  agrees with its colour.
* hard in exactly one way: the score is never drawn. Every goal sentence states the
  running score ("Red scores! Red 3, Blue 2.") and goals are rare (``goal_rate``, about
  one every 150 s), so getting the score right at second 5,000 means remembering
  commentary the model itself produced long before its vision window.

Commentary is a plain sentence with no leading space, or "" for a quiet second; the
caller prepends " " (and turns silence into " ...") when it builds token streams.
"""
from __future__ import annotations

import bisect
import math
import random
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

EVENTS = ("goal", "shot", "save", "foul", "corner")
TEAMS = ("Red", "Blue")
SPLIT_SIZE = 1_000_000  # train seeds are [0, 1e6), eval seeds are [1e6, 2e6)

GRASS, GRASS_DARK, LINE = (46, 139, 60), (40, 124, 53), (235, 235, 235)
NET, BALL, BALL_EDGE, YELLOW = (170, 170, 170), (255, 255, 255), (20, 20, 20), (250, 215, 0)
COLOUR = {"Red": (225, 30, 30), "Blue": (30, 70, 240)}
FLASH = {"Red": (255, 120, 120), "Blue": (120, 160, 255)}  # second tint of a goal flash



@dataclass
class WorldConfig:
    seed: int = 0
    size: int = 56  # pixels, square; multiple of 28 (merge unit of 2x2 14-px patches)
    fps: int = 2
    event_rate: float = 0.12  # P(shot/save/foul/corner) per second
    goal_rate: float = 1 / 150  # P(goal) per second: a goal every 2.5 minutes on average
    players_per_team: int = 4  # one keeper + outfield players

    def __post_init__(self):
        if self.seed < 0 or self.seed >= 2 * SPLIT_SIZE:
            raise ValueError(f"seed must be in [0, {2 * SPLIT_SIZE}), got {self.seed}")
        if self.size % 28 or self.size < 56:
            raise ValueError(f"size must be a multiple of 28 and >= 56, got {self.size}")
        if self.fps < 1:
            raise ValueError("fps must be >= 1")
        if not (0 <= self.goal_rate and 0 <= self.event_rate and self.goal_rate + self.event_rate <= 1):
            raise ValueError("need goal_rate, event_rate >= 0 and goal_rate + event_rate <= 1")
        if not 2 <= self.players_per_team <= 11:
            raise ValueError("players_per_team must be in [2, 11]")


def split_seed(split: str, index: int) -> int:
    """Seed of the index-th stream of a split; train and eval seed ranges never overlap."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"index must be in [0, {SPLIT_SIZE}), got {index}")
    return index + (SPLIT_SIZE if split == "eval" else 0)


def commentary(event: str | None, team: str | None, score: tuple[int, int]) -> str:
    """The one fixed sentence per (event, team); score is the score *after* the event."""
    if event is None:
        return ""
    return {
        "goal": f"{team} scores! Red {score[0]}, Blue {score[1]}.",
        "shot": f"{team} shoots!",
        "save": f"{team} keeper saves.",
        "foul": f"Foul by {team}.",
        "corner": f"Corner for {team}.",
    }[event]


# Questions about the whole stream so far (eval.py's whole-video task; training asks them at the end of some
# chunks). The answers need the commentary, never the frames: the score and the count from the last goal
# sentence, the first scorer from the first one.
QUESTIONS = {"score": "What is the score?", "goals": "How many goals so far?", "first": "Who scored first?"}


def answer(question: str, score: tuple[int, int], first: str | None) -> str:
    """The answer to QUESTIONS[question] given the score so far and the first scorer (None: no goal yet)."""
    return {
        "score": f"Red {score[0]}, Blue {score[1]}.",
        "goals": f"{sum(score)} goals.",
        "first": f"{first}." if first else "Nobody yet.",
    }[question]


# Questions whose answer lies anywhere in a long stretch of stream (tools.bench_flexprefill --long-prefill, and
# train.py --long-seconds, which teaches them): each needs a sentence found by its time or its order, not the last
# one, so a model must attend far back; the kind of retrieval FlexPrefill's query-aware heads are for.
# A timed question names its second as the prompt does (time_label), so that its digits are the prompt's tokens: a
# byte-level BPE splits " 358" and "=358" differently (" 3"+"58" against "35"+"8"), and a small model then has to
# learn that they are the same number before it can look the second up.
LONG_QUESTIONS = {"first": "Who scored first?", "score_at": "What was the score at {time}?",
                  "goals_before": "How many goals before {time}?", "scorer_at": "Who scored at {time}?"}
ALL_QUESTIONS = {**QUESTIONS, **LONG_QUESTIONS}  # every kind the long-prefill check asks
TIMED = [k for k in LONG_QUESTIONS if k not in QUESTIONS]  # the kinds that name a second
# A lookup training may add (long_questions(said_at=True)): a stream has a goal every few minutes but an event
# every few seconds, so asking for the sentence said at a second gives many lookups by label a stream, not one a goal.
SAID_AT = "What was said at {time}?"


def time_label(t: int) -> str:
    """How a prompt names second t, in its user turn (layout.user_ids) and in the questions about it."""
    return f"Time={t:.1f}-{t + 1:.1f}s"


def long_question(kind: str, stream: "SportsStream", t1: int, rng, t: int | None = None) -> tuple[str, str]:
    """(question, answer) of ALL_QUESTIONS[kind] about seconds [0, t1) of a stream. A timed question names a goal's
    second (`t`, or drawn with `rng`, a random.Random): its answer is said at that second (the scorer, the score)
    or follows from it (the goals before), so answering is a lookup by the second's label, not a search for the
    last goal before an arbitrary second. With no goal yet the scorer's question becomes the first scorer's, and
    the others name any second (the answer is then 0). "said_at" (SAID_AT) names second `t`, any second: its
    sentence, "..." when quiet, as the prompt's reply says it."""
    goals = stream.goals(t1)
    if kind == "scorer_at" and not goals:
        kind = "first"
    if kind in QUESTIONS:  # about the whole stretch: the last goal sentence, or the first
        return QUESTIONS[kind], answer(kind, stream.score(t1 - 1), goals[0][1] if goals else None)
    if t is None:
        t, team = rng.choice(goals) if goals else (rng.randrange(t1), None)
    else:
        team = dict(goals).get(t)
        if not 0 <= t < t1 or (kind == "scorer_at" and team is None):
            raise ValueError(f"{kind}: second {t} is not {'a goal' if kind == 'scorer_at' else 'a second'} of "
                             f"[0, {t1})")
    question = (SAID_AT if kind == "said_at" else LONG_QUESTIONS[kind]).format(time=time_label(t))
    if kind == "scorer_at":
        return question, f"{team}."
    if kind == "said_at":
        return question, stream.text(t) or "..."
    if kind == "score_at":  # the score after second t, its goal counted, as the commentary at t says it
        return question, answer("score", stream.score(t), None)
    return question, answer("goals", stream.score(t - 1) if t else (0, 0), None)


def long_questions(stream: "SportsStream", t1: int, n: int, rng, said_at=False) -> list[tuple[str, str]]:
    """Up to n (question, answer) pairs about seconds [0, t1), shuffled with `rng`: the whole-stretch questions
    (world.QUESTIONS), then as many timed ones as fit, each naming a different goal's second. With `said_at`, "said_at"
    is one more timed kind, and the room left goes to "said_at" about the other events' seconds. Training asks them
    one after another in one sequence, where a repeat is answered by copying the earlier answer, not by finding it in
    the video (the long-prefill check asks each question alone), so no answer is another's: the last goal's score
    is the score's, the first goal's scorer the first scorer's (and, with `said_at`, their sentences say them)."""
    events = stream.events(0, t1)
    goals = [t for t, event, _ in events if event == "goal"]
    copies = {("score_at", goals[-1]), ("scorer_at", goals[0])} if goals else set()  # the score's, the first's
    kinds = TIMED + ["said_at"] * said_at
    if said_at and goals:
        copies |= {("said_at", goals[-1]), ("said_at", goals[0])}
    timed = []
    for t in rng.sample(goals, min(len(goals), max(0, n - len(QUESTIONS)))):
        timed.append((rng.choice([k for k in kinds if (k, t) not in copies]), t))
    if said_at:
        others = [t for t, event, _ in events if event != "goal"]
        room = max(0, n - len(QUESTIONS) - len(timed))
        timed += [("said_at", t) for t in rng.sample(others, min(len(others), room))]
    pool = [(k, None) for k in QUESTIONS][:n] + timed
    rng.shuffle(pool)
    return [long_question(kind, stream, t1, rng, t) for kind, t in pool]


# commentary's sentences read back (eval.py scores a model's output with these)
SENTENCES = [("goal", re.compile(r"^(Red|Blue) scores! Red (\d+), Blue (\d+)\.$")),
             ("shot", re.compile(r"^(Red|Blue) shoots!$")), ("save", re.compile(r"^(Red|Blue) keeper saves\.$")),
             ("foul", re.compile(r"^Foul by (Red|Blue)\.$")), ("corner", re.compile(r"^Corner for (Red|Blue)\.$"))]


def parse_event(text: str) -> tuple[str, str, tuple[int, int] | None] | None:
    """(event, team, score or None) of a commentary sentence, None for silence or anything unrecognised."""
    for name, rx in SENTENCES:
        m = rx.match(text.strip())
        if m:
            return name, m.group(1), (int(m.group(2)), int(m.group(3))) if name == "goal" else None
    return None


@dataclass
class Second:
    t: int
    frames: list  # fps PIL RGB images
    event: str | None  # one of EVENTS, or None for a quiet second
    team: str | None  # "Red"/"Blue": scorer, shooter, saving keeper, offender, corner taker
    text: str  # commentary, "" if quiet; no leading space
    score: tuple[int, int]  # (red, blue) after this second


def _rng(seed: int, t: int, salt: int) -> random.Random:
    # A str seed is hashed (sha512) by random.Random, so neighbouring (seed, t) keys give
    # unrelated streams. Only rng.random() is used below: it is the one draw Python promises
    # to reproduce across versions for a given seed.
    return random.Random(f"{seed}:{t}:{salt}")


_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a fixed bijection of 64-bit ints whose outputs look independent."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _uniforms(seed: int, t: int, n: int = 3) -> list[float]:
    """n uniform floats in [0, 1) for second t, a pure function of (seed, t) in integer arithmetic (so the same
    on every Python). It decides each second's event and is several times cheaper than seeding a Random per second,
    which matters: a training chunk at hour 2 needs the events of all 7,200 seconds before it (they make the score)."""
    h, out = (seed << 32) ^ t, []
    for _ in range(n):
        h = _mix64(h)
        out.append((h >> 11) / 2.0**53)
    return out


def _sines(rng: random.Random, n: int, amp: float) -> list[tuple[float, float, float]]:
    """n random (amplitude, angular frequency, phase) terms with periods of 6-40 s."""
    return [(amp * (0.5 + 0.5 * rng.random()) / n, 2 * math.pi / (6 + 34 * rng.random()),
             2 * math.pi * rng.random()) for _ in range(n)]


def _wave(terms, tau: float) -> float:
    return sum(a * math.sin(w * tau + p) for a, w, p in terms)


def _mix64_np(x: np.ndarray) -> np.ndarray:
    """_mix64 on an array of uint64 (numpy's uint64 arithmetic wraps modulo 2**64, as the masks do above)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def event_table(cfg: WorldConfig, t0: int, t1: int) -> list[tuple[int, str, str]]:
    """(t, event, team) of every non-quiet second in [t0, t1): SportsStream.event for many seconds at once, the
    three _uniforms of each second drawn as arrays (a 2-hour stream in milliseconds instead of a second)."""
    h = np.uint64(cfg.seed << 32) ^ np.arange(t0, t1, dtype=np.uint64)
    u = []
    for _ in range(3):  # the same chain as _uniforms
        h = _mix64_np(h)
        u.append((h >> np.uint64(11)).astype(np.float64) / 2.0**53)
    out = []
    for i in np.flatnonzero(u[0] < cfg.goal_rate + cfg.event_rate).tolist():
        team = "Red" if u[2][i] < 0.5 else "Blue"
        ev = "goal" if u[0][i] < cfg.goal_rate else EVENTS[1 + min(3, int(4 * u[1][i]))]
        out.append((t0 + i, ev, team))
    return out


class SportsStream:
    """An endless match. ``second(t)`` renders second t; everything else is cheap metadata."""

    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        S = cfg.size
        # Geometry in pixels: the goals sit in the side margins, outside the touchlines, so
        # players (clamped to the pitch) never cover a net and a filled net means a goal.
        self.mx, self.my = round(0.11 * S), round(0.06 * S)
        self.x0, self.y0, self.x1, self.y1 = self.mx, self.my, S - 1 - self.mx, S - 1 - self.my
        self.gh = round(0.16 * S)  # half height of a goal mouth
        self.r_player, self.r_ball = max(2, round(0.04 * S)), max(2, round(0.035 * S))
        self.edge = (self.r_player + 1) / (self.x1 - self.x0)  # keeps whole player dots on the pitch
        # Fixed motion parameters for the whole stream (salt 1..): smooth, state-free paths.
        r = _rng(cfg.seed, 0, 1)
        self._ball = (_sines(r, 3, 0.44), _sines(r, 3, 0.44))
        self._wiggle = [[(_sines(r, 2, 0.08), _sines(r, 2, 0.08)) for _ in range(cfg.players_per_team)]
                        for _ in TEAMS]
        self._pitch = self._draw_pitch()
        self._events: list[tuple[int, str, str]] = []  # (t, event, team) of all non-quiet seconds in [0, _scanned)
        self._goal_t: list[int] = []  # times of all goals in [0, _scanned)
        self._red_cum: list[int] = []  # red goals among _goal_t[: i + 1]
        self._scanned = 0

    # ---- event schedule ------------------------------------------------------------
    def event(self, t: int) -> tuple[str | None, str | None]:
        """(event, team) of second t, or (None, None) for a quiet second."""
        if t < 0:
            raise ValueError(f"t must be >= 0, got {t}")
        h = _mix64((self.cfg.seed << 32) ^ t)  # the first of _uniforms(seed, t): most seconds need only this one
        u = (h >> 11) / 2.0**53
        if u >= self.cfg.goal_rate + self.cfg.event_rate:
            return None, None
        _, k, side = _uniforms(self.cfg.seed, t)
        team = "Red" if side < 0.5 else "Blue"
        if u < self.cfg.goal_rate:
            return "goal", team
        return EVENTS[1 + min(3, int(4 * k))], team

    def _scan(self, t: int):
        """Extend the event cache to cover second t, 4,096 seconds at a time, once per stream: a chunk at hour 2
        needs every event before it (the transcript and the score). The seconds are drawn together in numpy
        (event_table), which gives exactly what event() gives second by second (tests/test_world.py). Not
        thread-safe: one thread at a time per SportsStream (eval.py's frame thread is the only one touching its
        world)."""
        while self._scanned <= t:
            for s, ev, team in event_table(self.cfg, self._scanned, self._scanned + 4096):
                self._events.append((s, ev, team))
                if ev == "goal":
                    self._red_cum.append((self._red_cum[-1] if self._red_cum else 0) + (team == "Red"))
                    self._goal_t.append(s)
            self._scanned += 4096

    def events(self, t0: int, t1: int) -> list[tuple[int, str, str]]:
        """(t, event, team) for every non-quiet second in [t0, t1)."""
        if t0 < 0:
            raise ValueError(f"t0 must be >= 0, got {t0}")
        if t1 <= t0:
            return []
        self._scan(t1 - 1)
        i, j = bisect.bisect_left(self._events, (t0,)), bisect.bisect_left(self._events, (t1,))
        return self._events[i:j]

    def score(self, t: int) -> tuple[int, int]:
        """(red, blue) after second t: all goals at seconds <= t."""
        self._scan(t)
        i = bisect.bisect_right(self._goal_t, t)
        red = self._red_cum[i - 1] if i else 0
        return red, i - red

    def goals(self, t1: int) -> list[tuple[int, str]]:
        """(time, scorer) of every goal at a second < t1."""
        return [(t, team) for t, e, team in self.events(0, t1) if e == "goal"]

    def first_goal(self, t: int) -> tuple[int, str] | None:
        """(time, scorer) of the first goal at a second <= t, or None."""
        self._scan(t)
        if not self._goal_t or self._goal_t[0] > t:
            return None
        return self._goal_t[0], "Red" if self._red_cum[0] else "Blue"

    def text(self, t: int) -> str:
        ev, team = self.event(t)
        return commentary(ev, team, self.score(t) if ev == "goal" else (0, 0))

    def transcript(self, t0: int, t1: int) -> list[tuple[int, str]]:
        """(t, text) for every second in [t0, t1) with commentary."""
        return [(t, commentary(ev, team, self.score(t) if ev == "goal" else (0, 0))) for t, ev, team in
                self.events(t0, t1)]

    # ---- rendering -----------------------------------------------------------------
    def second(self, t: int) -> Second:
        ev, team = self.event(t)
        rng = _rng(self.cfg.seed, t, 0)
        layout = (rng.random(), rng.random(), rng.random())  # where this second's cue goes
        frames = [self.render(t, i, ev, team, layout) for i in range(self.cfg.fps)]
        return Second(t, frames, ev, team, self.text(t), self.score(t))

    def seconds(self, start: int = 0, end: int | None = None) -> Iterator[Second]:
        """Seconds start, start+1, ... up to end (exclusive), or forever if end is None."""
        t = start
        while end is None or t < end:
            yield self.second(t)
            t += 1

    def _px(self, x: float, y: float) -> tuple[float, float]:
        """Pitch coordinates in [0, 1]^2 (x=0 is Red's goal line) to pixels."""
        return self.x0 + x * (self.x1 - self.x0), self.y0 + y * (self.y1 - self.y0)

    def _net_box(self, side: int) -> tuple[int, int, int, int]:
        """Pixel box of the net behind goal line `side` (0 left, 1 right)."""
        c = self.cfg.size // 2
        x0, x1 = (1, self.x0 - 1) if side == 0 else (self.x1 + 1, self.cfg.size - 2)
        return x0, c - self.gh, x1, c + self.gh

    def _draw_pitch(self) -> Image.Image:
        S = self.cfg.size
        im = Image.new("RGB", (S, S), GRASS)
        d = ImageDraw.Draw(im)
        for i in range(0, 8, 2):  # mown stripes, only to make the pitch look like one
            d.rectangle([self.x0 + i * (self.x1 - self.x0) // 8, 0,
                         self.x0 + (i + 1) * (self.x1 - self.x0) // 8, S], fill=GRASS_DARK)
        d.rectangle([self.x0, self.y0, self.x1, self.y1], outline=LINE)
        d.line([S // 2, self.y0, S // 2, self.y1], fill=LINE)
        rc = round(0.12 * S)
        d.ellipse([S // 2 - rc, S // 2 - rc, S // 2 + rc, S // 2 + rc], outline=LINE)
        bw, bh = round(0.12 * S), round(0.26 * S)
        d.rectangle([self.x0, S // 2 - bh, self.x0 + bw, S // 2 + bh], outline=LINE)
        d.rectangle([self.x1 - bw, S // 2 - bh, self.x1, S // 2 + bh], outline=LINE)
        for side in (0, 1):
            d.rectangle(self._net_box(side), fill=NET, outline=LINE)
        return im

    def _positions(self, tau: float):
        """Ball and players at time tau: players are pulled toward the ball from a formation."""
        bx = min(0.97, max(0.03, 0.5 + _wave(self._ball[0], tau)))
        by = min(0.97, max(0.03, 0.5 + _wave(self._ball[1], tau)))
        n, players = self.cfg.players_per_team, []
        for k, name in enumerate(TEAMS):
            mirror = (lambda x: x) if name == "Red" else (lambda x: 1 - x)
            team = []
            for j in range(n):
                wx, wy = (_wave(w, tau) for w in self._wiggle[k][j])
                if j == 0:  # keeper: on the goal line, shadowing the ball's height
                    x, y = mirror(0.03), 0.5 + 0.35 * (by - 0.5) + wy
                else:
                    hx = mirror(0.2 + 0.5 * (j - 1) / max(1, n - 2))
                    hy = (j - 0.5) / (n - 1)
                    x, y = hx + 0.45 * (bx - hx) + wx, hy + 0.45 * (by - hy) + wy
                lo, hi = self.edge, 1 - self.edge
                team.append((min(hi, max(lo, x)), min(hi, max(lo, y))))
            players.append(team)
        return (bx, by), players

    def render(self, t: int, frame: int = 0, ev: str | None = None, team: str | None = None,
               layout: tuple = (0.5, 0.5, 0.5)) -> Image.Image:
        """Frame `frame` of second t showing event `ev` by `team`, whatever actually happens.

        second() calls this with the scheduled event; calling it directly draws counterfactuals
        (e.g. the same moment with no event), which is how the tests measure each cue.
        """
        (bx, by), players = self._positions(t + frame / self.cfg.fps)
        im = self._pitch.copy()
        d = ImageDraw.Draw(im)
        S, k = self.cfg.size, TEAMS.index(team) if team else 0
        col = COLOUR.get(team)
        ball = self._px(bx, by)
        goal_half = self.gh / (self.y1 - self.y0)  # goal mouth half height in pitch units
        attack = 1 if team == "Red" else 0  # side of the goal this team attacks
        under = mid = top = None  # cue drawn under the players / under the ball / on top
        if ev == "goal":
            box = self._net_box(attack)
            fill = col if frame % 2 == 0 else FLASH[team]
            under = lambda: d.rectangle(box, fill=fill)  # no outline: the whole net lights up
            ball = ((box[0] + box[2]) / 2, S / 2 + (layout[0] - 0.5) * self.gh)
        elif ev == "shot":
            shooter = (0.55 if attack else 0.45, 0.2 + 0.6 * layout[0])  # long shot: long streak
            players[k][1] = shooter
            off = goal_half + 0.06 + 0.06 * layout[1]
            ball = self._px(0.96 if attack else 0.04, 0.5 + (off if layout[2] < 0.5 else -off))
            start = self._px(*shooter)
            w = max(3, round(0.05 * S))  # thick enough to survive a 14-px patch
            mid = lambda: d.line([start, ball], fill=col, width=w)
        elif ev == "save":
            home = 1 - attack  # a keeper saves in front of their own goal
            keeper = (0.06 if home == 0 else 0.94, 0.5 + (layout[0] - 0.5) * goal_half)
            players[k][0] = keeper
            kx, ky = self._px(*keeper)
            ball = (kx + (1 if home == 0 else -1) * self.r_player, ky - self.r_player)
            g = round(0.09 * S)
            under = lambda: d.rectangle([kx - g, ky - g, kx + g, ky + g], fill=YELLOW)
        elif ev == "corner":
            cy = layout[0] < 0.5
            cx, cyp = (self.x1 if attack else self.x0), (self.y1 if cy else self.y0)
            rq = round(0.16 * S)
            under = lambda: d.ellipse([cx - rq, cyp - rq, cx + rq, cyp + rq], fill=col)
            o = self.r_ball  # just inside the flag, on the pitch
            ball = (cx + (-o if attack else o), cyp + (-o if cy else o))
        elif ev == "foul":
            cw, ch, b = round(0.1 * S), round(0.14 * S), max(2, S // 28)
            top = lambda: d.rectangle([S // 2 - cw, S // 2 - ch, S // 2 + cw, S // 2 + ch],
                                       fill=YELLOW, outline=col, width=b)
        if under:
            under()
        r = self.r_player
        for name, team_pos in zip(TEAMS, players):
            for x, y in team_pos:
                px, py = self._px(x, y)
                d.ellipse([px - r, py - r, px + r, py + r], fill=COLOUR[name])
        if mid:
            mid()
        rb = self.r_ball
        d.ellipse([ball[0] - rb, ball[1] - rb, ball[0] + rb, ball[1] + rb], fill=BALL, outline=BALL_EDGE)
        if top:  # the card goes on top of everything, so nothing can hide it
            top()
        return im


def save_gif(stream: SportsStream, path: str, seconds, scale: int = 4, caption: bool = True) -> None:
    """Write seconds (an int n for 0..n-1, or an iterable of ints) as an upscaled GIF.

    The caption (time, commentary, score) is for humans only; the model never sees it.
    """
    ts = range(seconds) if isinstance(seconds, int) else seconds
    font, S, out = ImageFont.load_default(), stream.cfg.size * scale, []
    for t in ts:
        sec = stream.second(t)
        for f in sec.frames:
            im = Image.new("RGB", (S, S + (14 if caption else 0)), (0, 0, 0))
            im.paste(f.resize((S, S), Image.NEAREST), (0, 0))
            if caption:
                msg = f"{t}s {sec.score[0]}-{sec.score[1]} {sec.text}"
                ImageDraw.Draw(im).text((2, S + 1), msg, fill=(255, 255, 255), font=font)
            out.append(im)
    from safeio import write_atomic  # a new file renamed into place: a link at `path` is replaced, not followed
    with write_atomic(path, "wb") as f:
        out[0].save(f, format="GIF", save_all=True, append_images=out[1:], duration=1000 // stream.cfg.fps, loop=0)
