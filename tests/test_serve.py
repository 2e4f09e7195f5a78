"""`manage.py serve` keeps its workers alive: a worker that dies is started again, with a growing
pause if it keeps dying; the web server dying stops everything."""

import io
import sys
import time

from webapp.jobs.management.commands.serve import Child

EXIT_AT_ONCE = [sys.executable, "-c", "raise SystemExit(3)"]


def wait_until_exited(child: Child) -> None:
    child.process.wait(timeout=30)


def test_a_worker_that_dies_is_started_again_after_a_growing_pause():
    out = io.StringIO()
    child = Child("train worker", EXIT_AT_ONCE, restart=True)
    child.FIRST_PAUSE = 0.2
    child.pause = 0.2
    first = child.process
    wait_until_exited(child)

    assert child.check(out) and child.process is None
    assert "train worker stopped (exit code 3); starting it again" in out.getvalue()
    assert child.check(out) and child.process is None  # still pausing
    time.sleep(0.25)
    assert child.check(out) and child.process is not None and child.process is not first

    wait_until_exited(child)
    assert child.check(out) and child.pause == 0.8  # it keeps dying: each pause doubles
    assert out.getvalue().count("starting it again") == 2


def test_the_pause_is_capped():
    child = Child("cpu worker", EXIT_AT_ONCE, restart=True)
    child.pause = child.LONGEST_PAUSE
    wait_until_exited(child)
    child.check(io.StringIO())
    assert child.pause == child.LONGEST_PAUSE


def test_the_web_server_dying_stops_everything():
    out = io.StringIO()
    child = Child("web", EXIT_AT_ONCE)
    wait_until_exited(child)
    assert child.check(out) is False
    assert "web stopped (exit code 3); stopping everything" in out.getvalue()


def test_a_running_child_is_left_alone():
    child = Child("train worker", [sys.executable, "-c", "import time; time.sleep(30)"], restart=True)
    try:
        assert child.check(io.StringIO()) and child.process.poll() is None
    finally:
        child.process.kill()
        child.process.wait()
