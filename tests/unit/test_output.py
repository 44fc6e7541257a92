"""An instance's output ring and its followers: bounded, and never waiting for a reader."""

from __future__ import annotations

import asyncio

from disaggd.supervise.output import OutputRing


def test_ring_keeps_the_last_lines_with_stream_time_and_sequence() -> None:
    ticks = iter(range(100, 200))
    ring = OutputRing(3, wallclock=lambda: float(next(ticks)))
    for i in range(5):
        ring.append("stdout" if i % 2 == 0 else "stderr", f"line {i}")
    assert ring.texts() == ("line 2", "line 3", "line 4")
    last = ring.tail(2)
    assert [(x.seq, x.time, x.stream, x.text) for x in last] == [
        (4, 103.0, "stderr", "line 3"),
        (5, 104.0, "stdout", "line 4"),
    ]
    assert ring.tail(0) == [] and len(ring.tail(10)) == 3
    assert last[0].as_dict() == {"seq": 4, "time": 103.0, "stream": "stderr", "line": "line 3"}


def test_a_slow_follower_loses_lines_and_is_told_how_many() -> None:
    async def main() -> None:
        ring = OutputRing(100)
        follower = ring.follow(limit=3)
        for i in range(10):  # nobody reads: appending never waits
            ring.append("stdout", f"l{i}")
        batch = await follower.next()
        assert [x.text for x in batch.lines] == ["l0", "l1", "l2"]
        assert (batch.dropped, batch.ended) == (7, None)
        ring.append("stderr", "late")
        batch = await follower.next()
        assert [x.text for x in batch.lines] == ["late"] and batch.dropped == 0
        ring.unfollow(follower)
        ring.append("stdout", "unseen")
        assert not follower._queue

    asyncio.run(main())


def test_end_wakes_a_waiting_follower() -> None:
    async def main() -> None:
        ring = OutputRing(10)
        follower = ring.follow()
        waiting = asyncio.ensure_future(follower.next())
        await asyncio.sleep(0)
        assert not waiting.done()
        ring.append("stdout", "last words")
        ring.end("instance removed")
        batch = await asyncio.wait_for(waiting, 1)
        if not batch.ended:  # the line and the end may come in two batches
            batch = await asyncio.wait_for(follower.next(), 1)
        assert batch.ended == "instance removed"

    asyncio.run(main())
