"""The scorer registry and the generation scorers (exact_number, code_tests in its sandbox)."""

import os
import time
from pathlib import Path

import pytest

from coe.errors import InvalidRequestError
from coe.scoring import Outcome, Probe, get_scorer, register_scorer, score, scorer_names
from coe.scoring.answers import final_number
from coe.scoring.code_tests import extract_code


def test_registry():
    assert scorer_names() == ["choice", "code_tests", "exact_number", "reference_nll"]
    with pytest.raises(InvalidRequestError, match="unknown scorer 'bleu'; available: choice, code_tests"):
        get_scorer("bleu")
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("exact_number")(type("Other", (), {}))


@pytest.mark.parametrize("text, want", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 1,000", "1000"),
    ("It costs $18.00 in total.", "18"),
    ("The answer is 42. Check: 42 - 2 = 40", "42"),
    ("first 3 then 5", "5"),
    ("-2.50", "-2.5"),
    ("no number", None),
])
def test_final_number(text, want):
    assert final_number(text) == want


def test_exact_number():
    s, p = get_scorer("exact_number"), Probe(id="g", query="q", scorer="exact_number", answer="18")
    assert score(s, p, "9 * 2 = 18\n#### 18").passed
    out = score(s, p, "#### 17")
    assert not out.passed and out.reason == "final number 17 != 18"
    assert score(s, p, "I do not know").reason == "no number in the answer"


def test_crashing_scorer_is_a_recorded_failure():
    class Boom:
        name, higher_is_better = "boom", True

        def __call__(self, probe, answer, **ctx):
            raise RuntimeError("kaput")

    out = score(Boom(), Probe(id="x", query="q", scorer="exact_number", answer="1"), "1")
    assert out == Outcome(0.0, False, "scorer 'boom' crashed: RuntimeError: kaput", None)


def test_hanging_scorer_times_out_as_a_recorded_failure():
    import threading

    release = threading.Event()

    class Hang:
        name, higher_is_better = "hang", True

        def __call__(self, probe, answer, **ctx):
            release.wait(30)
            return Outcome(1.0, True)

    p = Probe(id="x", query="q", scorer="exact_number", answer="1")
    t0 = time.monotonic()
    out = score(Hang(), p, "1", timeout_s=0.3)
    release.set()
    assert out.reason == "scorer 'hang' timed out after 0.3 s" and not out.passed
    assert time.monotonic() - t0 < 5
    assert score(get_scorer("exact_number"), p, "1", timeout_s=5).passed


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("```\nprint(1)\n```\n```python\ndef g(): pass\n```") == "def g(): pass\n"
    assert extract_code("def h(): return 2") == "def h(): return 2"


CODE = Probe(id="c", query="q", scorer="code_tests", tests=["assert f(2) == 4", "assert f(3) == 9"])


def _run(answer, **kw):
    return score(get_scorer("code_tests", **kw), CODE, answer)


def test_code_tests_pass_and_fail():
    assert _run("```python\ndef f(x):\n    return x * x\n```").passed
    out = _run("def f(x):\n    return x + x")
    assert not out.passed and out.reason == "AssertionError"
    assert _run("def g(x): return x").reason == "NameError: name 'f' is not defined"
    assert _run("import sys\nsys.exit(0)").reason == "the program exited before the last assert"


# answers as the SmolLM2 LoRAs write them (code, then rambling), and the length of the prefix at
# which code_tests may stop generating (None: only the whole answer is scorable)
RIGHT = "```python\ndef f(x):\n    return x * x\n```"
WRONG = "```python\ndef f(x):\n    return x + x\n```"
SETTLING = [
    ("Here is a Python function:\n" + RIGHT + "\nThis function squares x.\nThe `sorted` function is used "
     "to sort.\nExample usage:\n```python\nprint(f(3))\n```\n", len("Here is a Python function:\n" + RIGHT)),
    (WRONG + "\nOr better:\n" + RIGHT, len(WRONG)),                 # the first defining block is the one run
    ("```python\nprint(f(2))\n```\nwhere\n" + RIGHT + "\nmore", len("```python\nprint(f(2))\n```\nwhere\n" + RIGHT)),
    ("```text\ndef f(x): return 0\n```\nIn Python:\n```\ndef f(x): return x * x\n```\n...",
     len("```text\ndef f(x): return 0\n```\nIn Python:\n```\ndef f(x): return x * x\n```")),
    ("```py3\ndef f(x): return x * x\n```", None),                  # not a Python fence: a later one would win
    ("def f(x):\n    return x * x\n\n# Test\nassert f(2) == 4", None),   # no fence: the whole answer runs
    ("```python\ndef f(x):\n    return x * x\n", None),            # never closed
]


@pytest.mark.parametrize("answer, stop", SETTLING)
def test_code_tests_settle_once_the_code_it_runs_is_closed(answer, stop):
    from coe.scoring.code_tests import code_settled

    scorer = get_scorer("code_tests")
    settled = [n for n in range(len(answer) + 1) if scorer.settled(CODE, answer[:n])]
    assert (settled[0] if settled else None) == stop
    assert settled == list(range(stop, len(answer) + 1)) if stop is not None else not settled
    # every settled prefix runs the code the whole answer runs, and scores the same in the sandbox
    assert all(extract_code(answer[:n]) == extract_code(answer) for n in settled)
    if stop is not None:
        at_stop, whole = _run(answer[:stop]), _run(answer)
        assert code_settled(answer[:stop]) and (at_stop.score, at_stop.reason) == (whole.score, whole.reason)


def test_scorers_that_read_the_end_or_no_answer_never_settle():
    p = Probe(id="g", query="q", scorer="exact_number", answer="18")
    # the answer is the number after the last ####: a continuation may add another
    assert not get_scorer("exact_number").settled(p, "9 * 2 = 18\n#### 18\n")
    assert not get_scorer("exact_number").settled(p, "1,000,000,000 and 2,000,000,000,000,000")
    # nor a greedy loop: that stop is a measured heuristic of the profile (profile_measure.stop_reason),
    # not the guarantee settled() gives
    assert not get_scorer("exact_number").settled(p, "Step 1: " + "So she has 9 * 2 = 18 apples.\n" * 5)
    assert not get_scorer("choice").settled(p, "A") and not get_scorer("reference_nll").settled(p, "x")


def test_code_tests_setup_code_runs_before_asserts():
    p = Probe(id="s", query="q", scorer="code_tests", test_setup="K = 3", tests=["assert f() == 3"])
    assert score(get_scorer("code_tests"), p, "def f(): return K").passed


def test_code_never_runs_in_this_process():
    assert _run(f"import os\nassert os.getpid() != {os.getpid()}\ndef f(x): return x * x").passed


def test_loop_is_killed_at_the_wall_clock_limit():
    t0 = time.monotonic()
    out = _run("def f(x):\n    while True: pass", timeout_s=1.5)
    assert not out.passed and out.reason.startswith("timed out after 1.5 s")
    assert time.monotonic() - t0 < 10


def test_unbounded_allocation_hits_the_memory_limit():
    out = _run("def f(x):\n    return len(bytearray(8 * 2**30))", memory_mb=256)
    assert not out.passed and out.reason.startswith("memory limit (256 MiB)")


def test_writes_outside_the_scratch_folder_are_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    out = _run(f"open({str(target)!r}, 'w').write('x')\ndef f(x): return x * x")
    assert not out.passed and "outside the scratch folder" in out.reason
    assert not target.exists()
    # the scratch folder itself is writable, and is cwd and HOME
    ok = _run("import os\nopen('a.txt', 'w').write('1')\nassert os.path.expanduser('~') == os.getcwd()\n"
              "def f(x): return x * x")
    assert ok.passed, ok.reason


def test_no_network():
    out = _run("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\ndef f(x): return x * x")
    assert not out.passed
    assert out.detail["network"] in ("netns", "userns+netns", "audit-hook")


def test_forks_are_contained_and_die_with_the_group():
    # the child would outlive its parent by sleeping; the group kill (or the fork refusal) stops it
    prog = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\ndef f(x): return x * x"
    out = _run(prog, timeout_s=5)
    if out.detail["user"] == "caller":  # not root: fork is refused outright
        assert not out.passed and "os.fork is not allowed" in out.reason
    time.sleep(0.2)
    assert not _sandboxes_alive()


def test_fork_bomb_is_contained():
    t0 = time.monotonic()
    out = _run("import os\nwhile True:\n    os.fork()\ndef f(x): return x", timeout_s=3)
    assert not out.passed and time.monotonic() - t0 < 15
    time.sleep(0.2)
    assert not _sandboxes_alive()


def _sandboxes_alive() -> list[str]:
    """Command lines of live sandbox processes (their argv names the coe-sandbox- scratch folder)."""
    alive = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().decode(errors="replace") if p.name.isdigit() else ""
            state = (p / "stat").read_text().split()[2] if cmd else ""
        except OSError:
            continue
        if "coe-sandbox-" in cmd and state != "Z":
            alive.append(cmd)
    return alive
