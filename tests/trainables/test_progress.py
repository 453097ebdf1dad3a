"""Progress lines of a long extraction: how far, how fast, how long is left; short work says
nothing; a failing sink never fails the work."""

from __future__ import annotations

from difftune.trainables.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_say_images_per_second_and_time_left():
    clock, lines = Clock(), []
    p = Progress("extract train t=90", 1000, lines.append, every_s=10, clock=clock)
    clock.now += 5
    p.update(100)  # 5 s in: not yet a line
    assert lines == []
    clock.now += 5
    p.update(100)  # 10 s, 200 images: 20 img/s, 800 left -> 40 s
    assert lines == ["extract train t=90: 200/1,000 images, 20 img/s, 40s left"]
    clock.now += 10
    p.update(300)  # 20 s, 500 images: 25 img/s, 500 left -> 20 s
    assert lines[-1] == "extract train t=90: 500/1,000 images, 25 img/s, 20s left"
    clock.now += 60
    p.update(500)  # the last batch: the closing line says it, not an update line
    p.close()
    assert lines[-1] == "extract train t=90: 1,000 images in 1m20s, 12 img/s"
    assert len(lines) == 3


def test_work_of_one_line_needs_no_closing_line():
    clock, lines = Clock(), []
    p = Progress("extract train t=0", 100, lines.append, every_s=10, clock=clock)
    clock.now += 10
    p.update(60)
    clock.now += 3
    p.update(40)
    p.close()
    assert lines == ["extract train t=0: 60/100 images, 6 img/s, 7s left"]


def test_short_work_says_nothing_and_every_s_zero_says_everything():
    clock, lines = Clock(), []
    p = Progress("extract val t=0", 50, lines.append, every_s=10, clock=clock)
    clock.now += 2
    p.update(50)
    p.close()
    assert lines == []
    p = Progress("extract val t=0", 50, lines.append, every_s=0, clock=clock)
    for _ in range(2):
        clock.now += 1
        p.update(20)
    clock.now += 1
    p.update(10)
    p.close()
    assert [x.split(":")[1].split(",")[0].strip() for x in lines] == [
        "20/50 images", "40/50 images", "50 images in 3s"]


def test_a_failing_sink_does_not_fail_the_work():
    def sink(line: str) -> None:
        raise ConnectionError("driver gone")

    clock = Clock()
    p = Progress("x", 10, sink, every_s=0, clock=clock)
    clock.now += 1
    p.update(5)
    p.close()
    assert p.lines == 2
