"""The labelling tool (python -m minirlhf.label): every answer form reads back as the ranking it writes and
every bad one gets a one-line reason; the labels file round-trips and a damaged line is named by number;
the agreement figures are what their definitions say (a gold-following ranker reaches the annotator's
ceiling exactly, no ranker exceeds it); question i is the same however the session got there; a scripted
session trains and finishes its folder, and --from its labels gives the same reward model bit for bit;
resume, undo, skip, Ctrl-C and --force keep the labels as documented; and a session on a pseudo-terminal."""
import contextlib
import io
import json
import os
import pty
import select
import shutil
import signal
import sys
import time
import numpy as np
import pytest
from hypothesis import given, strategies as st

from minirlhf import label as L
from minirlhf import label_io as IO
from minirlhf import runs
from minirlhf.annotator import Comparison, ceiling_accuracy, scored_pairs
from minirlhf.checkpoint import load_checkpoint
from minirlhf.world import FAMILIES, all_prompts, gold, templated_responses

EPS = np.finfo(np.float64).eps
# Tiny training: seconds, to test the plumbing; the numbers mean nothing.
TRAIN = ["--rm-steps", "1", "--ppo-updates", "1", "--batch-size", "4", "--eval-prompts", "8", "--val-labels", "2"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run(tiny_run, tmp_path):
    """A copy of the session's tiny demo run (same bytes, so its manifest stays valid)."""
    shutil.copytree(tiny_run[0], tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def start(tiny_run):
    return runs.load_run(tiny_run[0])


class Typist:
    """A stand-in for standard input: the lines, then the end of input, or Ctrl-C if interrupt."""

    def __init__(self, lines, interrupt=False):
        self.lines, self.interrupt = list(lines), interrupt

    def isatty(self):
        return False

    def readline(self):
        if self.lines:
            return self.lines.pop(0) + "\n"
        if self.interrupt:
            raise KeyboardInterrupt
        return ""


def gold_order(prompt, responses):
    """The responses' indices by gold score, best first (ties in the order shown)."""
    g = [gold(prompt, t, e) for t, e in responses]
    return sorted(range(len(g)), key=lambda i: -g[i])


def gold_answers(start, first, n, k=4, seed=0, reverse=False):
    """What a ranker who follows gold types for questions first .. first + n - 1."""
    orders = [gold_order(*L.question(start, seed, i, k)) for i in range(first, first + n)]
    return [" ".join(IO.letter(i) for i in (o[::-1] if reverse else o)) for o in orders]


def lines(path):
    return [json.loads(s) for s in open(path).read().splitlines()]


def without_times(records):
    return [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in records]


# ---------------------------------------------------------------- what the reader types

@pytest.mark.parametrize("text, expected", [
    ("b a d c", ("ranking", [1, 0, 3, 2], "")), ("bad c", ("ranking", [1, 0, 3, 2], "")),
    ("2 1 4 3", ("ranking", [1, 0, 3, 2], "")), ("b>a>d>c", ("ranking", [1, 0, 3, 2], "")),
    ("2a, 4 > c", ("ranking", [1, 0, 3, 2], "")), ("  B A D C  ", ("ranking", [1, 0, 3, 2], "")),
    ("a>d", ("pair", (0, 3), "")), ("a > d", ("pair", (0, 3), "")), ("best a worst d", ("pair", (0, 3), "")),
    ("worst d best a", ("pair", (0, 3), "")), ("best 1 worst 4", ("pair", (0, 3), "")),
    ("d c b a # too rude", ("ranking", [3, 2, 1, 0], "too rude")), ("a>b # b rambles", ("pair", (0, 1), "b rambles")),
    ("s", ("skip", None, "")), ("u", ("undo", None, "")), ("q", ("quit", None, "")), ("?", ("help", None, "")),
    ("Q", ("quit", None, "")), ("skip # all gibberish", ("skip", None, "all gibberish"))])
def test_every_answer_form_reads_as_documented(text, expected):
    assert IO.parse_answer(text, 4) == expected


def test_with_two_responses_a_best_and_worst_is_the_full_ranking():
    assert IO.parse_answer("b>a", 2) == IO.parse_answer("best b worst a", 2) == ("ranking", [1, 0], "")


@pytest.mark.parametrize("text, message", [
    ("a a b c", "a appears 2 times"), ("abc", "missing d"), ("a b", "missing c, d"), ("x b c d", "there are only 4"),
    ("e a b c", "there are only 4 responses, a-d"), ("5 1 2 3", "numbered 1-4"), ("0 1 2 3", "numbered 1-4"),
    ("a b c !", "unknown key '!'"), ("", "type a ranking"), ("   # why", "type a ranking"),
    ("best a", "names one of each"), ("a>a", "both the best and the worst"), ("best a worst e", "only 4")])
def test_bad_input_gets_a_one_line_reason(text, message):
    with pytest.raises(ValueError, match=message) as e:
        IO.parse_answer(text, 4)
    assert "\n" not in str(e.value)


@given(st.integers(2, IO.MAX_K).flatmap(lambda k: st.tuples(
    st.permutations(range(k)), st.lists(st.booleans(), min_size=k, max_size=k),
    st.lists(st.sampled_from(["", " ", ",", ">", " > ", ", ", "  "]), min_size=k, max_size=k))))
def test_any_ranking_written_any_way_reads_back(case):
    """Letters or numbers, mixed, with any separators (or none): the ranking typed is the ranking read."""
    order, as_letter, seps = case
    text = "".join(s + (IO.letter(i) if a else str(i + 1)) for i, a, s in zip(order, as_letter, seps))
    assert IO.parse_answer(text, len(order)) == ("ranking", list(order), "")


# ---------------------------------------------------------------- the labels file

def record(index=0):
    return IO.make_record(index, "will it rain tomorrow?", [("not sure. no one knows.", True),
                                                           ("yes, for sure. trust me.", True), ("um", False)],
                          "ranking", (1, 0, 2), "", 1.5)


def write(path, recs, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return path


def test_labels_round_trip_and_become_comparisons(tmp_path, monkeypatch):
    """Each line is on disk when append_record returns (fsync of the file just written), and reads back."""
    path, synced = tmp_path / "labels.jsonl", []
    monkeypatch.setattr(IO.os, "fsync", lambda fd: synced.append(os.path.getsize(path)))
    pair = IO.make_record(3, "hi!", [("hello! nice to meet you.", True), ("ugh.", True)], "ranking", [0, 1], "x", 0)
    best_worst = IO.make_record(4, "what is 4+1?", [("5.", True), ("6.", False), ("it is 5.", True)],
                                "pair", (2, 1), "", 2.0)
    skipped = IO.make_record(7, "hi!", [("a", True), ("b", True)], "skip", None, "", 0.1)
    recs = [record(), pair, best_worst, skipped]
    for rec in recs:
        IO.append_record(path, rec)
    back = IO.read_labels(path)
    assert back == recs and synced == [len(b"".join(open(path, "rb").readlines()[:n + 1])) for n in range(4)]
    assert pair["reason"] == "x" and "reason" not in best_worst and skipped["ranking"] is None
    assert IO.to_comparisons(back) == [
        Comparison("will it rain tomorrow?", ("not sure. no one knows.", "yes, for sure. trust me.", "um"),
                   (True, True, False), (1, 0, 2)),
        Comparison("hi!", ("hello! nice to meet you.", "ugh."), (True, True), (0, 1)),
        Comparison("what is 4+1?", ("it is 5.", "6."), (True, False), (0, 1))]  # best first, the one pair
    IO.drop_last(path)
    assert IO.read_labels(path) == back[:-1]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 2: not a JSON line"), ("[1, 2]", "line 2: not a JSON object"),
    (dict(ranking=[0, 0, 2]), "line 2: ranking .* not a permutation"),
    (dict(ranking=[0, 1]), "line 2: ranking .* not a permutation"),
    (dict(ranking={"best": 0, "worst": 0}), "line 2: a best/worst ranking"),
    (dict(prompt="what is the meaning of life?"), "line 2: unknown prompt text"),
    (dict(responses=[{"text": "HELLO", "ended": True}, {"text": "hi", "ended": True}]),
     "line 2: response 0: character 'H'"),
    (dict(responses=[{"text": "hi", "ended": 1}, {"text": "hi", "ended": True}]), "line 2: response 0 must be"),
    (dict(index=0), "line 2: index 0 does not follow 0"), (dict(seconds=float("nan")), "line 2: seconds"),
    (dict(colour="red"), "line 2: unknown field colour"), ("", "line 2: not a JSON line")])
def test_a_damaged_line_is_named_by_its_number(tmp_path, bad, message):
    if isinstance(bad, dict):
        bad = json.dumps({**record(index=1), **bad})
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(record()) + "\n" + bad + "\n" + json.dumps(record(index=5)) + "\n")
    with pytest.raises(ValueError, match=message):
        IO.read_labels(path)


def test_a_missing_field_and_a_cut_short_last_line(tmp_path):
    rec = record()
    del rec["prompt"]
    with pytest.raises(ValueError, match="line 1: missing field prompt"):
        IO.read_labels(write(tmp_path / "a.jsonl", [rec]))
    with pytest.raises(ValueError, match="line 2: not a JSON line .*no newline: a write cut short"):
        IO.read_labels(write(tmp_path / "b.jsonl", [record()], tail=json.dumps(record(index=1))[:40]))


# ---------------------------------------------------------------- agreement with gold and the annotator

def test_a_gold_follower_reaches_the_ceiling_and_its_reverse_the_floor():
    """Following gold, every pair has p = max(p, 1 - p): agreement with the annotator equals its ceiling,
    with gold (on the pairs gold does not tie) it is 1; the reversed rankings agree with the annotator
    1 - ceiling and with gold never."""
    comparisons = []
    for p in all_prompts()[::9]:
        texts = tuple(t for _, t in templated_responses(p))[:5] + ("hlo wrld",)
        order = gold_order(p, [(t, True) for t in texts])
        comparisons += [Comparison(p.text, texts, (True,) * len(texts), tuple(order))]
    follow = L.agreement(comparisons)
    reverse = L.agreement([Comparison(c.prompt, c.responses, c.ended, c.ranking[::-1]) for c in comparisons])
    n = follow["all"]["pairs"]
    ties = sum(gold(c.prompt, c.responses[w]) == gold(c.prompt, c.responses[l])
               for c in comparisons for w, l in scored_pairs(c))
    assert 0 < ties < n and follow["all"]["gold_ties"] == reverse["all"]["gold_ties"] == ties
    assert set(follow) == set(FAMILIES) | {"all"}
    for name, s in follow.items():  # means of n terms in [0, 1]: each rounded within n eps
        assert abs(s["with_annotator"] - s["ceiling"]) <= n * EPS, name
        assert abs(reverse[name]["with_annotator"] - (1 - s["ceiling"])) <= 2 * n * EPS, name
        assert s["with_gold"] == 1.0 and reverse[name]["with_gold"] == 0.0, name


@given(st.data())
def test_no_ranking_agrees_with_the_annotator_beyond_its_ceiling(data):
    prompts = all_prompts()
    comparisons = []
    for _ in range(data.draw(st.integers(1, 4))):
        p = prompts[data.draw(st.integers(0, len(prompts) - 1))]
        pool = [t for _, t in templated_responses(p)] + ["", "hlo wrld", "sorry, i cant hlp."]
        texts = data.draw(st.lists(st.sampled_from(pool), min_size=2, max_size=6))
        ended = data.draw(st.lists(st.booleans(), min_size=len(texts), max_size=len(texts)))
        order = data.draw(st.permutations(range(len(texts))))
        comparisons.append(Comparison(p.text, tuple(texts), tuple(ended), tuple(order)))
    stats = L.agreement(comparisons)
    scored = [c for c in comparisons if scored_pairs(c)]
    assert (stats == {}) == (not scored)
    if scored:
        n = stats["all"]["pairs"]
        assert n == sum(len(scored_pairs(c)) for c in comparisons)
        assert stats["all"]["ceiling"] == ceiling_accuracy(scored, L.P.ANNOTATOR)
        for s in stats.values():  # means of n terms in [0, 1]: each rounded within n eps
            assert s["with_annotator"] <= s["ceiling"] + 2 * n * EPS
            assert 0.5 - 2 * n * EPS <= s["ceiling"] <= 1 + 2 * n * EPS
            assert (s["with_gold"] is None) == (s["gold_ties"] == s["pairs"])


# ---------------------------------------------------------------- the questions

def test_question_i_is_fixed_by_seed_and_index_and_families_come_in_blocks(start):
    asked = [L.question(start, 0, i, 4) for i in range(8)]
    assert L.question(start, 0, 5, 4) == asked[5]  # asked again (after undo or resume): the same
    assert len({(p.text, tuple(r)) for p, r in asked}) == 8  # each question its own draw
    assert L.question(start, 1, 5, 4) != asked[5]
    val = {p.text for p in start["val_prompts"]}
    assert all(p.text in val and len(r) == 4 for p, r in asked)
    for block in (asked[:4], asked[4:]):
        assert sorted(p.family for p, _ in block) == sorted(FAMILIES)


def test_responses_differ_where_the_draws_allow(start, monkeypatch):
    draws = iter([[("x", True)] * 4, [("y", True), ("x", True), ("x", False), ("y", True)], [("z", True)] * 4])
    monkeypatch.setattr(L.tf, "sample_responses", lambda policy, texts, rng: next(draws))
    assert L.question(start, 0, 0, 4)[1] == [("x", True), ("y", True), ("x", False), ("z", True)]
    monkeypatch.setattr(L.tf, "sample_responses", lambda policy, texts, rng: [("x", True)] * 3)
    assert L.question(start, 0, 0, 3)[1] == [("x", True)] * 3  # nothing else to show: repeats fill it


# ---------------------------------------------------------------- sessions

@pytest.fixture(scope="module")
def finished(tiny_run, start, tmp_path_factory):
    """A scripted session of 3 prompts ranked as gold ranks them, piped into the command line as printf
    would (python -m minirlhf.label --prompts 3 < answers): (the run folder, the answers, the output)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    shutil.copytree(tiny_run[0], run)
    answers = gold_answers(start, 0, 3)
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(sys, "argv", ["label", "--run", str(run), "--prompts", "3", *TRAIN])
        mp.setattr(sys, "stdin", io.StringIO("\n".join(answers) + "\n"))
        L.cli()
    return run, answers, printed.getvalue()


@pytest.fixture
def copy_of(tmp_path):
    """A copy of a run folder with its sessions (same bytes: every manifest stays valid)."""
    return lambda folder: shutil.copytree(folder, tmp_path / "run")


def test_a_piped_session_teaches_saves_and_finishes_its_folder(finished):
    run, answers, out = finished
    session = run / "labels"
    assert [r["ranking"] for r in lines(session / "labels.jsonl")] == [IO.parse_answer(a, 4)[1] for a in answers]
    assert all(f"your ranking> {a}\n" in out for a in answers)  # each answer echoed after its question
    assert out.count("the annotator agrees with P") == 3 * 6 and out.count("gold ranks them") == 3
    summary = json.loads((session / "summary.json").read_text())
    agree = summary["agreement"]["all"]
    assert abs(agree["with_annotator"] - agree["ceiling"]) <= agree["pairs"] * EPS  # following gold
    row = next(line for line in out.split("your agreement")[1].splitlines() if line.startswith("all "))
    assert row.split()[1:] == [str(agree["pairs"]), str(agree["gold_ties"]), f"{agree['with_gold']:.3f}",
                               f"{agree['with_annotator']:.3f}", f"{agree['ceiling']:.3f}"]
    assert agree["with_gold"] == 1.0
    manifest = runs.open_run(session)  # one finished run, whose parent is the demo run around it
    assert set(manifest["files"]) == {"labels.jsonl", "reward.npz", "policy.npz", "summary.json"}
    assert manifest["parent_run_id"] == runs.open_run(run)["run_id"] and manifest["remake"] == IO.REMAKE
    assert manifest["stages"] == ["reward_model", "ppo", "evaluation"]
    for name in ("reward.npz", "policy.npz"):
        assert load_checkpoint(session / name)[2]["run_id"] == manifest["run_id"]
    assert summary["answers"] == summary["rankings"] == 3 and summary["win_rate_vs_sft"]["n"] == 8


def test_from_its_labels_gives_the_same_reward_model_bit_for_bit(finished, copy_of, capsys):
    run = copy_of(finished[0])
    session = run / "labels"
    again = L.main(["--run", str(run), "--from", str(session / "labels.jsonl"), *TRAIN])
    assert "your ranking>" not in capsys.readouterr().out  # asks nothing
    assert (run / "labels-from" / "labels.jsonl").read_bytes() == (session / "labels.jsonl").read_bytes()
    assert again["agreement"] == json.loads((session / "summary.json").read_text())["agreement"]
    for name in ("reward.npz", "policy.npz"):
        a, b = load_checkpoint(session / name)[0], load_checkpoint(run / "labels-from" / name)[0]
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a), name


def test_bad_answers_undo_skip_interrupt_and_resume(run, start, capsys):
    """Bad lines are explained and asked again; u undoes the last answer (a skip or a ranking) and asks it
    again; Ctrl-C leaves the session running with every answer saved; --resume asks what a straight-through
    session would have asked next, and no-feedback hides the teaching."""
    flags = ["--run", str(run), "--no-feedback", *TRAIN]
    g = gold_answers(start, 0, 4)
    typed = ["a a b c", "zz", "best a", g[0], "s", "u", "u", "", g[0], "s", g[2]]
    with pytest.raises(KeyboardInterrupt):
        L.main(flags + ["--prompts", "3"], stdin=Typist(typed, interrupt=True))
    out = capsys.readouterr().out
    assert "Traceback" not in out and "a appears 2 times" in out and "unknown key" not in out
    assert "there are only 4 responses" in out and "names one of each" in out and out.count("undone") == 2
    assert "the annotator agrees" not in out and "gold ranks" not in out
    path = run / "labels" / "labels.jsonl"
    assert [(r["index"], r["ranking"] is None) for r in lines(path)] == [(0, False), (1, True), (2, False)]
    assert runs.read_manifest(run / "labels")["status"] == "running"
    with pytest.raises(SystemExit):  # a session is there: --resume or --force
        L.parse_args(flags)
    with pytest.raises(KeyboardInterrupt):
        L.main(flags + ["--prompts", "5", "--resume"], stdin=Typist([g[3]], interrupt=True))
    assert "3 answers so far" in capsys.readouterr().out
    records = lines(path)
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert without_times(records)[3] == without_times([IO.make_record(
        3, L.question(start, 0, 3, 4)[0].text, L.question(start, 0, 3, 4)[1], "ranking",
        IO.parse_answer(g[3], 4)[1], "", 0)])[0]


def test_a_finished_session_reopens_with_resume_and_force_starts_over(finished, copy_of):
    run = copy_of(finished[0])
    session, flags = run / "labels", ["--run", str(run), "--prompts", "4"]
    with pytest.raises(KeyboardInterrupt):  # reopened: its outputs go, its labels stay
        L.main(flags + ["--resume"], stdin=Typist([], interrupt=True))
    assert sorted(os.listdir(session)) == ["labels.jsonl", "manifest.json"]
    assert len(lines(session / "labels.jsonl")) == 3
    assert runs.read_manifest(session)["status"] == "running" and runs.read_manifest(session)["files"] == {}
    with pytest.raises(KeyboardInterrupt):  # --force on an unfinished session: its labels go too
        L.main(flags + ["--force"], stdin=Typist([], interrupt=True))
    assert (session / "labels.jsonl").read_text() == ""
    manifest = runs.read_manifest(session)
    manifest["parent_run_id"] = "another run"
    runs.write_json(session / "manifest.json", manifest)
    with pytest.raises(ValueError, match="no longer the run"):
        L.main(flags + ["--resume"], stdin=Typist([]))


def test_training_needs_a_pair_of_ended_responses(run, tmp_path, capsys):
    path = write(tmp_path / "l.jsonl", [IO.make_record(0, "hi!", [("hi", True), ("hey", False), ("yo", False)],
                                                       "ranking", [0, 1, 2], "", 1)])
    with pytest.raises(ValueError, match="none of your 1 rankings has two responses that ended"):
        L.main(["--run", str(run), "--from", str(path), *TRAIN])
    assert not (run / "labels-from").exists()  # refused before any work
    with pytest.raises(ValueError, match="no ranking, and the reward model learns only from pairs"):
        L.main(["--run", str(run), "--prompts", "1", *TRAIN], stdin=Typist(["q"]))
    assert runs.read_manifest(run / "labels")["status"] == "running"  # kept, for --resume


@pytest.mark.parametrize("flags", [["--k", "1"], ["--k", "9"], ["--prompts", "0"], ["--mix", "-1"],
                                   ["--rm-steps", "nan"], ["--resume", "--force"], ["--out", "elsewhere"],
                                   ["--from", "no-such-file.jsonl"], ["--resume"]])
def test_bad_flags_are_usage_errors(run, flags, capsys):
    with pytest.raises(SystemExit) as e:
        L.parse_args(["--run", str(run), *flags])
    assert e.value.code == 2 and "usage:" in capsys.readouterr().err


def test_the_command_line_reports_a_damaged_file_in_one_line(run, tmp_path, monkeypatch, capsys):
    path = write(tmp_path / "l.jsonl", [record()], tail="{oops\n")
    monkeypatch.setattr(sys, "argv", ["label", "--run", str(run), "--from", str(path)])
    with pytest.raises(SystemExit) as e:
        L.cli()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "line 2: not a JSON line" in err
    assert err.count("\n") == 1


def test_an_empty_run_folder_gets_its_demo_run_first(tiny_run, tmp_path, monkeypatch, capsys):
    made = []

    def demo_main(flags):
        made.append(flags)
        shutil.copytree(tiny_run[0], flags[1])
    monkeypatch.setattr(L.demo, "main", demo_main)
    args = L.parse_args(["--run", str(tmp_path / "new"), "--quick", "--seed", "3"])
    assert L.starting_point(args)["sft"].params and made == [["--out", str(tmp_path / "new"), "--seed", "3", "--quick"]]
    assert "making one first" in capsys.readouterr().out


# ---------------------------------------------------------------- a real terminal

def converse(steps, argv, timeout=60):
    """Run python -m minirlhf.label on a pseudo-terminal: for each (wait_for, then_type) step, read until the
    text appears and type the bytes. Returns (exit code, everything it printed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin and stdout are the terminal, so the tool reads with input()
        os.chdir(ROOT)
        try:
            os.execv(sys.executable, [sys.executable, "-m", "minirlhf.label", *argv])
        finally:
            os._exit(127)  # never back into pytest
    seen, deadline, finished = b"", time.monotonic() + timeout, False
    try:
        for wait_for, typed in steps + [(None, None)]:
            while wait_for is None or wait_for.encode() not in seen:
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                assert ready, f"timed out waiting for {wait_for!r}; got:\n{seen.decode(errors='replace')}"
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    assert wait_for is None, f"exited before {wait_for!r}:\n{seen.decode(errors='replace')}"
                    break
                seen += chunk
            if typed is not None:
                seen = seen.replace(wait_for.encode(), b"<seen>", 1)  # each step waits for a fresh copy
                os.write(fd, typed)
        finished = True
    finally:
        if not finished:  # a failed step: stop the child rather than wait for it forever
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")


def test_a_session_on_a_terminal(run, start, finished):
    """On a terminal (input()): --resume of a session stopped after one answer, a bad key, undo, and q,
    which trains on the three answers and one simulated ranking (--mix 1) and finishes the session. Its
    labels and training differ from the piped session's, its evaluation does not: the same unseen prompts
    and the same SFT answers."""
    g = gold_answers(start, 0, 3)
    g[2] = gold_answers(start, 2, 1, reverse=True)[0]
    with pytest.raises(KeyboardInterrupt):
        L.main(["--run", str(run)], stdin=Typist(g[:1], interrupt=True))
    steps = [("1 answer so far", b""), ("ranking> ", b"a b c k\n"), ("only 4 responses", b""),
             ("ranking> ", f"{g[1]}\n".encode()), ("ranking> ", b"u\n"), ("undone", b""),
             ("ranking> ", f"{g[1]}\n".encode()), ("ranking> ", f"{g[2]}\n".encode()), ("ranking> ", b"q\n")]
    code, out = converse(steps, ["--run", str(run), "--resume", "--mix", "1", *TRAIN])
    assert code == 0 and "wrote" in out and "Traceback" not in out, out
    assert "[2/20]" in out and "gold ranks them" in out
    assert [r["ranking"] for r in lines(run / "labels" / "labels.jsonl")] == [IO.parse_answer(a, 4)[1] for a in g]
    assert runs.open_run(run / "labels")["status"] == "finished"
    assert lines(run / "labels" / "labels.jsonl")[2]["ranking"] != lines(finished[0] / "labels" / "labels.jsonl")[2][
        "ranking"]
    mine, piped = (json.loads((r / "labels" / "summary.json").read_text()) for r in (run, finished[0]))
    assert mine["mix"] == 1 and piped["mix"] == 0 and mine["sft"] == piped["sft"]


def test_ctrl_c_on_the_command_line_keeps_the_answers(run, start, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["label", "--run", str(run)])
    monkeypatch.setattr(sys, "stdin", Typist(gold_answers(start, 0, 1), interrupt=True))
    with pytest.raises(SystemExit) as e:
        L.cli()
    assert e.value.code == 130 and "interrupted: every answer typed so far is saved" in capsys.readouterr().err
    assert len(lines(run / "labels" / "labels.jsonl")) == 1
