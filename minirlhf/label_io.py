"""The labelling tool's input and output: what the reader types, and the file their rankings live in.

`python -m minirlhf.label` (label.py) shows K responses to a prompt, lettered a, b, c, ..., and reads one
answer per line. The answers (HELP prints the same list):

    b a d c   bad c   b>a>d>c   2 1 4 3     a full ranking, best first: every response exactly once
    a>d   best a worst d   worst d best a   only the best and the worst: that one pairwise label
    <answer> # because ...                  anything after # is saved with the answer, as its reason
    s   u   q   ?                           skip this prompt, undo the last answer, stop and train, help

Letters and numbers may be mixed ("2 a 4 3"); spaces, commas and ">" between them are optional. A full
ranking of K responses gives the C(K, 2) pairs InstructGPT (Ouyang et al. 2022) trains on; a best/worst
answer gives the one pair (best over worst), as a Comparison of two responses. With K = 2 the two forms are
the same label and the answer is saved as a ranking. An answer that is none of these raises a ValueError
whose one-line message says what is wrong (a letter twice, a letter missing, a key that means nothing, a
letter beyond K), and the question is asked again.

The file (labels.jsonl) holds one JSON object per line, one line per answered prompt, appended, flushed and
fsynced as soon as the answer is typed, so an interrupted session loses nothing:

    index      the question's number in the session (label.py: it fixes the prompt and the responses)
    prompt     the prompt's text, one of the world's prompts
    responses  [{"text": ..., "ended": true/false}, ...], K >= 2 of them, in the order shown (a = 0)
    ranking    the indices best first; or {"best": i, "worst": j}; or null for a skipped prompt
    time       when the answer was typed (ISO 8601, UTC);  seconds: how long the reader took
    reason     what the reader typed after "#" (only when they typed something)

`undo` rewrites the file without its last line (checkpoint.atomic_write: the old file or the new one,
never half of one). Reading a file back (`read_labels`) checks every line and raises a ValueError naming
the line: not JSON, a field missing, unknown or of the wrong type, a ranking that is not a permutation of
the responses, a prompt that is not the world's, a response with characters outside the vocabulary,
indices that do not increase.

The session folder (`check_session`, `open_session`): a run of runs.py inside the demo run, whose manifest
lists labels.jsonl only once the session finishes (label.py's docstring has the rules for --resume and
--force).
"""
import datetime
import json
import math
import os
import re
import shutil
import string
import sys

from . import runs
from .annotator import Comparison
from .checkpoint import TMP_PREFIX, atomic_write
from .tokenizer import encode
from .world import get_prompt

REMAKE = "python -m minirlhf.label"  # the command that makes a session (runs.start_run's remake)
LABELS = "labels.jsonl"  # the labels file of a session folder
MAX_K = 8  # letters a-h and digits 1-8; s, u and q stay free for the commands
COMMANDS = {"s": "skip", "skip": "skip", "u": "undo", "undo": "undo", "q": "quit", "quit": "quit",
            "?": "help", "h": "help", "help": "help"}
FIELDS = {"index", "prompt", "responses", "ranking", "time", "seconds", "reason"}
HELP = """\
  Rank the responses, best first:
    b a d c    bad c    b>a>d>c    2 1 4 3     a full ranking: every letter once
    a>d    best a worst d                      only the best and the worst: one pairwise label
    ... # too rude                             anything after # is saved as your reason
  s skip this prompt   u undo your last answer   q stop and train on what there is   ? this help"""

_SEPARATORS = re.compile(r"[\s,>]+")
_BEST_WORST = re.compile(r"^best\s+(\S+)\s+worst\s+(\S+)$|^worst\s+(\S+)\s+best\s+(\S+)$")


# ---------------------------------------------------------------- what the reader types

def letter(i):
    """The letter of response i (0 -> a)."""
    return string.ascii_lowercase[i]


def _item(key, k):
    """The index a single key names (a letter a.. or a number 1..), or a ValueError saying why not."""
    if len(key) == 1 and key in string.ascii_lowercase:
        i = ord(key) - ord("a")
    elif key.isascii() and key.isdigit():
        i = int(key) - 1
    else:
        raise ValueError(f"unknown key {key!r}: name responses by letter (a-{letter(k - 1)}) or number (1-{k}); "
                         f"? for help")
    if not 0 <= i < k:
        raise ValueError(f"{key}: the responses are numbered 1-{k}" if key.isdigit() else
                         f"{key}: there are only {k} responses, a-{letter(k - 1)}")
    return i


def parse_answer(line, k):
    """One typed line -> (kind, value, reason). kind: "ranking" (value: indices best first), "pair" (value:
    (best, worst)), or one of the commands "skip", "undo", "quit", "help" (value None). ValueError, with a
    one-line message, for anything else."""
    text, _, reason = line.partition("#")
    text, reason = text.strip().lower(), reason.strip()
    if text in COMMANDS:
        return COMMANDS[text], None, reason
    if not text:
        raise ValueError(f"type a ranking such as '{' '.join(letter(i) for i in range(k))}', a best and a worst "
                         f"such as 'a>{letter(k - 1)}', or ? for help")
    pair = _BEST_WORST.match(text)
    if pair:
        best, worst = (pair[1], pair[2]) if pair[1] else (pair[4], pair[3])
    elif (one_pair := re.fullmatch(r"([^\s>])\s*>\s*([^\s>])", text)) and k > 2:  # one key each side
        best, worst = one_pair[1], one_pair[2]
    elif "best" in text.split() or "worst" in text.split():
        raise ValueError("a best/worst answer names one of each: best a worst d")
    else:
        return "ranking", _ranking(text, k), reason
    best, worst = _item(best, k), _item(worst, k)
    if best == worst:
        raise ValueError(f"{letter(best)} cannot be both the best and the worst")
    return ("ranking", [best, worst], reason) if k == 2 else ("pair", (best, worst), reason)


def _ranking(text, k):
    """A full ranking from its keys, in order; ValueError for a repeated, missing or unknown one."""
    order = [_item(key, k) for chunk in _SEPARATORS.split(text) for key in chunk]  # "bad c": b, a, d, c
    for i in order:
        if order.count(i) > 1:
            raise ValueError(f"{letter(i)} appears {order.count(i)} times: rank each response once")
    missing = [letter(i) for i in range(k) if i not in order]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: rank all {k} responses, or give only the best and the "
                         f"worst (a>{letter(k - 1)})")
    return order


def ask(question, stdin):
    """The reader's next line, or None at the end of the input (which means q). On a terminal the question
    is input()'s prompt (with line editing); from a pipe or a file each line is read and echoed after the
    question, so the transcript reads like a session."""
    if stdin is sys.stdin and stdin.isatty():
        try:
            return input(question)
        except EOFError:  # Ctrl-D
            print()
            return None
    line = stdin.readline()
    if not line:
        return None
    print(question + line.rstrip("\n"), flush=True)
    return line


# ---------------------------------------------------------------- the labels file

def make_record(index, prompt, responses, kind, value, reason, seconds):
    """One line of the labels file (module docstring); kind is "ranking", "pair" or "skip"."""
    ranking = (list(value) if kind == "ranking" else {"best": value[0], "worst": value[1]} if kind == "pair"
               else None)
    rec = {"index": index, "prompt": prompt, "responses": [{"text": t, "ended": bool(e)} for t, e in responses],
           "ranking": ranking, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "seconds": round(float(seconds), 3)}
    if reason:
        rec["reason"] = reason
    return check_record(rec)


def append_record(path, rec):
    """Append one line and force it to disk before returning (flush, then fsync)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def drop_last(path):
    """Remove the file's last line (undo), atomically."""
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    atomic_write(path, lambda f: f.write(b"".join(lines[:-1])))


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def check_record(rec):
    """rec unchanged if it is a well-formed line (module docstring); else a ValueError saying what is wrong."""
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    missing, unknown = FIELDS - {"reason"} - set(rec), set(rec) - FIELDS
    if missing or unknown:
        raise ValueError(f"{'missing field ' + ', '.join(sorted(missing)) if missing else ''}"
                         f"{'; ' if missing and unknown else ''}"
                         f"{'unknown field ' + ', '.join(sorted(unknown)) if unknown else ''}")
    if not _is_int(rec["index"]) or rec["index"] < 0:
        raise ValueError(f"index must be an integer >= 0, got {rec['index']!r}")
    if not isinstance(rec["prompt"], str):
        raise ValueError(f"prompt must be a string, got {rec['prompt']!r}")
    get_prompt(rec["prompt"])  # ValueError: not one of the world's prompts
    responses = rec["responses"]
    if not isinstance(responses, list) or not 2 <= len(responses) <= MAX_K:
        raise ValueError(f"responses must be a list of 2 to {MAX_K}, got {responses!r}"[:160])
    for n, r in enumerate(responses):
        if not (isinstance(r, dict) and set(r) == {"text", "ended"} and isinstance(r["text"], str)
                and isinstance(r["ended"], bool)):
            raise ValueError(f"response {n} must be {{\"text\": string, \"ended\": true/false}}, got {r!r}"[:160])
        try:
            encode(r["text"])
        except ValueError as e:
            raise ValueError(f"response {n}: {e}") from None
    K, ranking = len(responses), rec["ranking"]
    if isinstance(ranking, dict):
        if set(ranking) != {"best", "worst"} or not all(_is_int(v) and 0 <= v < K for v in ranking.values()) \
                or ranking["best"] == ranking["worst"]:
            raise ValueError(f"a best/worst ranking needs two different indices 0-{K - 1}, got {ranking!r}")
    elif ranking is not None and (not isinstance(ranking, list) or not all(_is_int(i) for i in ranking)
                                  or sorted(ranking) != list(range(K))):
        raise ValueError(f"ranking {ranking!r} is not a permutation of the {K} responses' indices 0-{K - 1}")
    if not isinstance(rec["time"], str):
        raise ValueError(f"time must be a string, got {rec['time']!r}")
    seconds = rec["seconds"]
    if not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
            and seconds >= 0):
        raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
    if not isinstance(rec.get("reason", ""), str):
        raise ValueError(f"reason must be a string, got {rec['reason']!r}")
    return rec


def read_labels(path):
    """Every line of a labels file, checked (check_record, indices increasing); ValueError naming the file
    and the line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the labels file ({e.strerror})") from None
    lines = data.split(b"\n")
    cut = lines[-1] != b""  # text after the last newline: a write cut short
    if not cut:
        lines.pop()
    records = []
    for n, raw in enumerate(lines, start=1):
        where = f"{path}, line {n}"
        try:
            rec = check_record(json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError:
            raise ValueError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            hint = (" (the last line has no newline: a write cut short? delete it and resume)"
                    if cut and n == len(lines) else "")
            raise ValueError(f"{where}: not a JSON line ({e.msg}){hint}") from None
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if records and rec["index"] <= records[-1]["index"]:
            raise ValueError(f"{where}: index {rec['index']} does not follow {records[-1]['index']} "
                             f"(the lines of one session have increasing indices)")
        records.append(rec)
    return records


def to_comparisons(records):
    """The answered lines as annotator.Comparison objects (skipped prompts left out): a full ranking as
    itself, a best/worst pair as a comparison of those two responses."""
    out = []
    for rec in records:
        texts = tuple(r["text"] for r in rec["responses"])
        ended = tuple(r["ended"] for r in rec["responses"])
        ranking = rec["ranking"]
        if isinstance(ranking, list):
            out.append(Comparison(rec["prompt"], texts, ended, tuple(ranking)))
        elif isinstance(ranking, dict):
            b, w = ranking["best"], ranking["worst"]
            out.append(Comparison(rec["prompt"], (texts[b], texts[w]), (ended[b], ended[w]), (0, 1)))
    return out


# ---------------------------------------------------------------- the session folder

def open_session(args, start):
    """The session's manifest and its records so far: a new session, or (--resume) the one in args.out,
    reopened (its outputs deleted, module docstring). With --from, the file is copied in as its labels."""
    folder, path = args.out, os.path.join(args.out, LABELS)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "force", "resume")}
    if not args.resume:
        old = runs.read_manifest(folder) if os.path.isdir(folder) else None
        if args.force and old is not None and old.get("remake") == REMAKE and LABELS not in old["files"] \
                and os.path.exists(path):
            os.unlink(path)  # an unfinished session's labels: not in its manifest yet, so ours to delete
        manifest = runs.start_run(folder, settings, args.seed, args.force, remake=REMAKE, parent=start["manifest"])
        if args.from_file:
            shutil.copyfile(args.from_file, path)
            return manifest, read_labels(path)
        open(path, "a").close()  # there from the start, so that a session of no answers can finish
        return manifest, []
    manifest = runs.read_manifest(folder)
    if manifest["parent_run_id"] != start["manifest"]["run_id"]:
        raise ValueError(f"{folder} was made from run {manifest['parent_run_id']}, which is no longer the run in "
                         f"{args.run}: start a new session with --force")
    records = read_labels(path) if os.path.exists(path) else []
    outputs = [f for f in manifest["files"] if f != LABELS]
    manifest.update(status="running", stages=[], files={})
    runs.write_json(os.path.join(folder, runs.MANIFEST), manifest)  # first: a crash now leaves a running session
    for name in outputs:
        os.unlink(os.path.join(folder, name))
    print(f"resuming the session in {folder}: {len(records)} answer{'s' * (len(records) != 1)} so far")
    return manifest, records


def check_session(args):
    """ValueError unless a session may start in args.out (or, with --resume, continue there). Changes nothing."""
    old = runs.read_manifest(args.out) if os.path.isdir(args.out) else None
    mine = old is not None and old.get("remake") == REMAKE
    if args.resume:
        if not mine:
            raise ValueError(f"{args.out} holds no labelling session to resume")
        if args.k != old["settings"]["k"] or args.seed != old["seed"]:
            raise ValueError(f"the session in {args.out} has --k {old['settings']['k']} --seed {old['seed']}; "
                             f"--resume keeps them")
        return
    if mine and not args.force:
        raise ValueError(f"{args.out} holds a labelling session ({old['status']}): --resume continues it, "
                         f"--force starts over and deletes its labels")
    if mine and LABELS not in old["files"]:
        foreign = [f for f in os.listdir(args.out) if f not in (runs.MANIFEST, LABELS, *old["files"])
                   and os.path.isfile(os.path.join(args.out, f)) and not f.startswith(TMP_PREFIX)]
        if foreign:
            raise ValueError(f"{args.out}: {', '.join(foreign)} belong to no run; move them first")
        return
    runs.check_start(args.out, args.force)
