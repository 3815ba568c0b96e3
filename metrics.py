"""
How streamed commentary is scored against the truth (eval.py's stream task; tested on hand-made transcripts in
tests/test_eval.py).

Both transcripts are one text a second ('' for silence); world.parse_event reads a sentence back into (event, team,
score). For the seconds [t0, t1):
- event F1: a predicted event matches a true one of the same kind and team at the same second (f1) or within +-1 s
  (f1_tol1); each prediction matches at most one event;
- score accuracy: a true goal counts when a goal sentence with the right running score comes within +-1 s. Exact,
  so one misread goal sinks every later one;
- goal steps: a true goal counts when the model's goal sentence adds one to the scorer in the model's *own* last
  score sentence, so each misreading counts once;
- silence accuracy: quiet seconds left quiet.
slices() scores five 20% slices of a stream: does the commentary hold up as the stream goes on (StreamingVLM, arXiv
2510.09608, Fig. 8)? Over many streams, the mean score accuracy hides how many kept the score all along: kept_line
counts the streams at KEPT or above and names the others.
"""
from world import parse_event

KEPT = 0.95  # score accuracy at which a stream "keeps the score" (exact: one misread goal costs every later one)


def score_transcript(truth, pred, t0=0, t1=None):
    """truth, pred: lists of texts, one per second ('' = silence). Scores seconds [t0, t1)."""
    t1 = len(truth) if t1 is None else t1
    T = {t: parse_event(truth[t]) for t in range(t0, t1) if parse_event(truth[t])}
    P = {t: parse_event(pred[t]) for t in range(t0, t1) if parse_event(pred[t])}

    def f1(tol):
        used, tp = set(), 0
        for t, (ev, team, _) in sorted(T.items()):  # one-to-one: each prediction matches at most one event
            for d in sorted(range(-tol, tol + 1), key=abs):
                p = P.get(t + d)
                if p and t + d not in used and p[:2] == (ev, team):
                    used.add(t + d)
                    tp += 1
                    break
        prec = tp / len(P) if P else 1.0
        rec = tp / len(T) if T else 1.0
        return 2 * prec * rec / (prec + rec) if prec + rec else 0.0

    goals = [(t, e) for t, e in T.items() if e[0] == "goal"]
    right = sum(any(P.get(t + d) == e for d in (-1, 0, 1)) for t, e in goals)
    quiet = [t for t in range(t0, t1) if not truth[t].strip()]
    silent = sum(not pred[t].strip() for t in quiet)
    return dict(f1=f1(0), f1_tol1=f1(1), score_acc=right / len(goals) if goals else None, goals=len(goals),
                goal_step=goal_steps(goals, pred, t0, t1), silence_acc=silent / len(quiet) if quiet else None,
                events=len(T))


def goal_steps(goals, pred, t0, t1):
    """The fraction of true goals (t, (event, team, score)) whose goal sentence, within +-1 s and inside [t0, t1),
    adds one to the scorer in the model's own last score sentence before it (0-0 at the start of the stream; one
    sentence a goal, the nearest, as in F1). score_acc is exact, so one misread goal sinks every later one; this
    counts each misreading once."""
    said = [(t, e) for t in range(t1) if (e := parse_event(pred[t])) and e[0] == "goal"]  # its own, in order
    index, used, right = {u: i for i, (u, _) in enumerate(said)}, set(), 0
    for t, (_, team, _) in sorted(goals):
        for u in sorted(range(max(t0, t - 1), min(t1, t + 2)), key=lambda u: abs(u - t)):
            i = index.get(u)
            if i is not None and i not in used and said[i][1][1] == team:
                used.add(i)
                red, blue = said[i - 1][1][2] if i else (0, 0)
                right += said[i][1][2] == ((red + 1, blue) if team == "Red" else (red, blue + 1))
                break
    return right / len(goals) if goals else None


def slices(truth, pred, n=5):
    L = len(pred)
    return [score_transcript(truth, pred, L * i // n, L * (i + 1) // n) for i in range(n)]


def kept_line(runs):
    """'N of M; below: seed: accuracy, ...' over runs with a score accuracy (streams without a goal have none); a
    run that stopped early is marked, since its accuracy covers only the seconds before."""
    scored = [r for r in runs if r.get("score_acc") is not None]
    if not scored:
        return "no stream had a goal"
    def name(r):
        return f"{r['seed']}: {r['score_acc']:.2f}" + (f" (stopped at {r['seconds']} s)" if r.get("failed") else "")
    below = [name(r) for r in scored if r["score_acc"] < KEPT]
    stopped = [name(r) for r in scored if r["score_acc"] >= KEPT and r.get("failed")]
    return (f"{len(scored) - len(below)} of {len(scored)}" + (f"; below: {', '.join(below)}" if below else "")
            + (f"; of those kept, {', '.join(stopped)}" if stopped else ""))
