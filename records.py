"""
Training on real videos: a JSONL file of records, each one chunk, read lazily into data.py's Samples.

A --data file has one record a line, in either of two shapes (told apart by the line's JSON type).
  StreamingVLM's Inf-Stream-Train, which is LiveCC's format (mit-han-lab/streaming-vlm,
  streaming_vlm/data/lmm_dataset.py; showlab/livecc), a list [user, assistant]:
    [{"role": "user", "content": [{"type": "video", "video": "a.mp4", "video_start": 12.0, "video_end": 36.0},
                                  {"type": "text", "text": "(unused, as theirs)", "previous": "earlier words"}]},
     {"role": "assistant", "content": [{"type": "text_stream", "text_stream": [[12.4, 12.7, "What"], ...],
                                        "qa_stream": [[x, 20.5, "Who scored?", "Red."], ...]}]}]
  ours, an object: {"video": "a.mp4", "start": 12.0, "end": 36.0, "words": [[12.4, 12.7, "What"], ...],
                    "previous": "earlier words"}
Times are seconds from the video's start. A record is one chunk: its first chunk_seconds whole seconds from
start (fractional starts work; a last part-second is dropped), time stamps counting from start. Words go to
seconds by the authors' rule: walking the words in order, second k takes every word that ends by start + k + 1,
so words that end before start go to the first second; each word is stripped and follows one space. A qa_stream
entry [_, t, question, answer] is a question turn (layout.question_segments, the answer supervised) right after
the reply of the second t falls in, (start + k, start + k + 1]: the prompt Streamer.ask builds after that
second. The chunk's later seconds follow the answer (the authors keep theirs in the stream too; Streamer.ask
rewinds it). Entries outside the chunk are dropped. The authors put the question in that second's user turn and
the answer before its commentary; we keep one layout of user turn a second, the one inference uses.

The file is never held in memory (JsonlSamples): the index is each record's byte offset, from the authors'
`<stem>_seeks.jsonl` beside the file (a JSON list of offsets; stem = the name without "_with_seeks" and
".jsonl") or, without it, a scan. Each chunk is read when a DataLoader worker builds it: a seek to its line, and
video.read_seconds decodes only its seconds. Relative video paths are under --video-root, else beside the JSONL.
Every record is parsed once at the start (one read of the file; two integers a record kept), so a malformed line
or a missing video stops the run before it trains, with "file:line: why"; a video that exists but does not
decode is found when its chunk is built and stops the run the same way.
"""
import json
import math
import os
import re
from array import array
from dataclasses import dataclass

from data import DataError, build_sample
from layout import CONTROL_TOKEN
from processor import FrameError
from safeio import within
from video import VideoError, read_seconds


@dataclass
class Record:
    """One JSONL line, either shape, as the chunk builder needs it."""
    video: str        # as written in the line
    start: float      # seconds from the video's start
    end: float
    words: list       # [(start, end, word)]
    previous: str     # commentary before start ("" = none)
    questions: list   # [(t, question, answer)]
    sorted: bool = False  # whether parse_record had to sort the words by time


SEEK_INDEX = re.compile(rb"\s*\[[\d\s,]*\]\s*")  # a line that is a list of integers: LiveCC's in-file seek index
# The most a record may hold, checked as it is parsed (before a chunk is tokenised or a frame decoded)
LIMITS = dict(line_bytes=16 << 20, words=100_000, word_chars=200, text_chars=200_000, seconds=1e7)


def parse_record(line, where):
    """The Record of a JSONL line (bytes or str); `where` ("file:line") starts every error. Its words come sorted
    by time (rec.sorted says whether they had to be)."""
    if len(line) > LIMITS["line_bytes"]:
        raise DataError(f"{where}: the line is {len(line):,} bytes; the limit is {LIMITS['line_bytes']:,} "
                        "(records.LIMITS)")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:   # (JSON is UTF-8 text)
        raise DataError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise DataError(f"{where}: not a valid record (JSON nested too deeply)") from None
    try:
        rec = _authors_record(obj) if isinstance(obj, list) else _our_record(obj)
    except KeyError as e:
        raise DataError(f"{where}: no {e.args[0]!r} where the format has one (formats: records.py)") from None
    except (IndexError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{where}: not a valid record ({e}; formats: records.py)") from None
    if not (math.isfinite(rec.start) and math.isfinite(rec.end) and 0 <= rec.start and rec.end - rec.start >= 1):
        raise DataError(f"{where}: start {rec.start:g} s, end {rec.end:g} s do not span a whole second")
    if rec.end > LIMITS["seconds"]:
        raise DataError(f"{where}: end {rec.end:g} s is past the limit of {LIMITS['seconds']:g} s (records.LIMITS)")
    check_text(rec, where)
    order = sorted(rec.words, key=lambda w: w[1])  # stable: words ending together keep their order
    rec.sorted, rec.words = order != rec.words, order
    return rec


def check_text(rec, where):
    """A DataError naming `where` when the record's text holds a control token or is too long (LIMITS)."""
    if len(rec.words) > LIMITS["words"]:
        raise DataError(f"{where}: {len(rec.words):,} words; the limit is {LIMITS['words']:,} (records.LIMITS)")
    texts = [("previous", rec.previous)] + [(f"question at {t:g} s", q + " " + a) for t, q, a in rec.questions]
    for i, (_, _, w) in enumerate(rec.words):
        if len(w) > LIMITS["word_chars"]:
            raise DataError(f"{where}: word {i + 1} is {len(w):,} characters; the limit is {LIMITS['word_chars']} "
                            "(records.LIMITS)")
        texts.append((f"word {i + 1}", w))
    for name, text in texts:
        if len(text) > LIMITS["text_chars"]:
            raise DataError(f"{where}: {name} is {len(text):,} characters; the limit is {LIMITS['text_chars']:,} "
                            "(records.LIMITS)")
        if m := CONTROL_TOKEN.search(text):
            raise DataError(f"{where}: {name} holds {m.group()!r}, a control token; data text is text (records.py)")


def _our_record(obj):
    if not isinstance(obj, dict):
        raise TypeError("a line is a JSON object (ours) or a list [user, assistant] (the authors')")
    return Record(str(obj["video"]), float(obj["start"]), float(obj["end"]), _words(obj["words"]),
                  str(obj.get("previous") or ""), [])


def _authors_record(obj):
    if len(obj) != 2:
        raise ValueError(f"a list line is [user, assistant], this one has {len(obj)} items")
    user, stream = obj[0]["content"], obj[1]["content"][0]
    video = [e for e in user if e.get("type") == "video"]
    if not video:
        raise ValueError("the user turn has no {'type': 'video'} element")
    previous = [e["previous"] for e in user if "previous" in e]  # the last one wins, as theirs
    qa = [(float(q[1]), str(q[2]), str(q[3])) for q in stream.get("qa_stream") or []]
    if not all(math.isfinite(t) for t, _, _ in qa):
        raise ValueError("a qa_stream time is not a finite number")
    return Record(str(video[0]["video"]), float(video[0]["video_start"]), float(video[0]["video_end"]),
                  _words(stream["text_stream"]), str(previous[-1] if previous else ""), qa)


def _words(words):
    out = []
    for w in words:
        if not isinstance(w, (list, tuple)) or len(w) != 3:
            raise ValueError(f"a word is [start, end, word], got {json.dumps(w)[:60]}")
        start, end = float(w[0]), float(w[1])
        if not (math.isfinite(start) and math.isfinite(end) and start <= end):
            raise ValueError(f"word {len(out) + 1} {json.dumps(w)[:60]} does not have finite times, start <= end")
        out.append((start, end, str(w[2])))
    return out


def words_by_second(words, start, n):
    """The commentary of each of n seconds from `start`, by StreamingVLM's rule (lmm_dataset.py,
    get_phrase_before_timestamp): walking the words in order, second k takes every word that ends by start + k + 1
    and stops at the first that ends later; each word stripped, after one space."""
    texts, i = [], 0
    for k in range(n):
        phrase = ""
        while i < len(words) and words[i][1] <= start + k + 1:
            phrase += " " + words[i][2].strip()
            i += 1
        texts.append(phrase)
    return texts


def questions_by_second(questions, start, n):
    """{k: [(question, answer), ...]}: each question asked at t goes after second k, the one t falls in:
    start + k < t <= start + k + 1 (the same edge as a word's). Questions outside the n seconds are dropped."""
    asked = {}
    for t, q, a in questions:
        k = next((k for k in range(n) if start + k < t <= start + k + 1), None)
        if k is not None:
            asked.setdefault(k, []).append((q, a))
    return asked


def seeks_path(path):
    """The authors' seek index beside a JSONL: a_with_seeks.jsonl -> a_seeks.jsonl (and a.jsonl -> a_seeks.jsonl)."""
    root, name = os.path.split(path)
    return os.path.join(root, name.replace("_with_seeks", "").rsplit(".jsonl", 1)[0] + "_seeks.jsonl")


class JsonlSamples:
    """The chunks of a JSONL file, one per record, built when asked for (make_batch, in the DataLoader workers).
    It holds two integers a record (byte offset, line number) and nothing else: a chunk is a seek to its line and
    a decode of its seconds only, so memory does not grow with the file or the videos. Every record is checked
    here, once (shape, video present), so a bad line stops the run before it trains; records whose video is an
    empty file (a failed download) are skipped and counted."""

    def __init__(self, path, tok, cfg, video_root=None, log=print):
        self.path, self.tok, self.cfg = path, tok, cfg  # cfg: chunk_seconds, text_sink/window, min/max_pixels
        # videos are read from under --video-root, else from the JSONL's folder, and never from outside it
        self.root = os.path.realpath(video_root or os.path.dirname(os.path.abspath(path)))
        self.offsets, self.lines = array("q"), array("q")
        empty, unsorted = 0, []
        try:
            for offset, n, line in self._lines(log):
                rec = parse_record(line, f"{path}:{n}")
                unsorted += [n] if rec.sorted else []
                if os.path.getsize(self.video_path(rec, f"{path}:{n}")) == 0:
                    empty += 1
                    continue
                self.offsets.append(offset)
                self.lines.append(n)
        except OSError as e:
            raise DataError(f"{e.filename or path}: {e.strerror or e}") from None
        if empty:
            log(f"{path}: skipped {empty} zero-byte videos")
        if unsorted:
            log(f"{path}: the words of {len(unsorted)} records were not in time order and are sorted by end time "
                f"(first: line {unsorted[0]})")
        if not self.offsets:
            raise DataError(f"{path}: no samples in the file")

    def _lines(self, log):
        """(byte offset, line number, line) of each record: at the offsets the seeks file lists (record i is
        taken to be line i + 1), else found by a scan that skips blank lines and an in-file seek index."""
        seeks = seeks_path(self.path)
        with open(self.path, "rb") as f:
            if os.path.isfile(seeks):
                yield from self._seek(f, seeks)
                return
            log(f"{self.path}: no {os.path.basename(seeks)} beside it; scanning the file for line offsets")
            offset = 0
            for n, line in enumerate(f, 1):
                if line.strip() and not SEEK_INDEX.fullmatch(line):
                    yield offset, n, line
                offset += len(line)

    def _seek(self, f, seeks):
        """The records at the seeks file's offsets, which must cover the data: between and after the records it
        lists, only blank lines or an in-file seek index (a record left out would silently not be trained on)."""
        size, end = os.fstat(f.fileno()).st_size, 0  # end: where the last record read stops
        for i, offset in enumerate(read_seeks(seeks)):
            f.seek(max(0, offset - 1))
            if offset >= size or (offset > 0 and f.read(1) != b"\n"):
                raise DataError(f"{seeks}: offset {offset} (record {i + 1}) is not the start of a line of "
                                f"{self.path} ({size} bytes)")
            self._skipped(f, end, offset, seeks)
            f.seek(offset)
            yield offset, i + 1, f.readline()
            end = f.tell()
        self._skipped(f, end, size, seeks)

    def _skipped(self, f, start, stop, seeks):
        """DataError when bytes [start, stop) of the data hold a record (the seeks file leaves it out) or stop is
        before start (offsets out of order)."""
        if stop < start:
            raise DataError(f"{seeks}: offset {stop} comes before the end of the record listed before it ({start}): "
                            "offsets must increase")
        f.seek(start)
        while f.tell() < stop:
            line = f.readline()
            if line.strip() and not SEEK_INDEX.fullmatch(line):
                raise DataError(f"{seeks} does not cover {self.path}: the record at byte {f.tell() - len(line)} "
                                "is not in it (rebuild the seeks file, or remove it to scan the data)")

    def video_path(self, rec, where):
        """The record's video, relative to the root (--video-root, else the JSONL's folder); it must resolve,
        after symlinks, inside that root."""
        try:
            path = os.path.join(self.root, rec.video)  # an absolute rec.video stays itself
            real, found = os.path.realpath(path), os.path.exists(path)
        except ValueError as e:  # a NUL byte in the name
            raise DataError(f"{where}: video {rec.video[:80]!r} is not a path ({e})") from None
        if not within(real, self.root):
            raise DataError(f"{where}: video {rec.video[:80]} resolves to {real}, outside the video root "
                            f"{self.root} (--video-root, else the JSONL's folder)")
        if not found:
            raise DataError(f"{where}: video {rec.video[:80]} not found (looked for {path})")
        if os.path.isdir(real):   # a folder of frames: each image it holds must stay inside the root too
            for name in sorted(os.listdir(real)):
                if not within(frame := os.path.realpath(os.path.join(real, name)), self.root):
                    raise DataError(f"{where}: video {rec.video[:80]}: {name} resolves to {frame}, outside the "
                                    f"video root {self.root} (--video-root, else the JSONL's folder)")
        return path

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        where = f"{self.path}:{self.lines[i]}"
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            rec = parse_record(f.readline(), where)
        c = self.cfg
        try:
            frames = read_seconds(self.video_path(rec, where), rec.start,
                                  min(c.chunk_seconds, math.floor(rec.end - rec.start + 1e-6)))
        except VideoError as e:
            raise DataError(f"{where}: {e}") from None
        if not frames:
            raise DataError(f"{where}: {rec.video} has no whole second from {rec.start:g} s on")
        try:
            return build_sample(self.tok, frames, words_by_second(rec.words, rec.start, len(frames)), rec.start,
                                [rec.previous] if rec.previous.strip() else [], c.text_sink, c.text_window,
                                (c.min_pixels, c.max_pixels), asked=questions_by_second(rec.questions, rec.start,
                                                                                        len(frames)))
        except FrameError as e:   # (two frame sizes in one second, a 300:1 frame)
            raise DataError(f"{where}: video {rec.video[:80]}: {e}") from None


def read_seeks(path):
    """The byte offsets in a seeks file: one JSON list of non-negative integers."""
    try:
        with open(path) as f:
            seeks = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: cannot read the seek index ({e or 'nested too deeply'})") from None
    if not isinstance(seeks, list) or not all(isinstance(s, int) and s >= 0 for s in seeks):
        raise DataError(f"{path}: a seek index is one JSON list of byte offsets (non-negative integers)")
    return seeks
