"""The replay buffer of asynchronous stages (locallearn/transport.py), without processes."""

import threading
import time

import pytest

from locallearn.transport import ReplayBuffer, fill

# Events: "a" adds the next sample (stamps 0, 1, 2, ...), "d" draws one.
SCRIPT = "adadadddddaadadddaddddadadaaaddaddaddadadddadadaddadddaaddda"
# The draws of the reference code's Buffer (github.com/eugenium/DGL,
# buffer_experiments/cifar_buffer.py, sample method priority_lifo) on SCRIPT, run on CPU,
# with one comparison corrected: it shifts the ring's slots `> buffer_counter` to count as
# older, which leaves the slot at `buffer_counter` (the oldest, once the ring is full)
# counted as the newest; with `>=` its draws are these. Its use counter starts at 1, so its
# max_buffer_reuse K allows K - 1 draws: K = 3 there is max_reuse 2 here.
REFERENCE = {
    (4, None): [0, 1, 2, 2, 1, 0, 2, 4, 5, 3, 5, 6, 6, 4, 3, 7, 8, 11, 10, 12, 9, 13, 13, 14,
                15, 15, 14, 16, 17, 18, 18, 19, 19, 17, 21, 20, 21],
    (3, 2): [0, 1, 2, 2, 1, 0, None, 4, 5, 3, 5, 6, 6, 4, None, 7, 8, 11, 10, 12, 12, 13, 13,
             14, 15, 15, 14, 16, 17, 18, 18, 19, 19, 17, 21, 20, 21],
}


def _play(buffer: ReplayBuffer, script: str) -> list:
    draws, stamp = [], 0
    for event in script:
        if event == "a":
            buffer.add(stamp, stamp)
            stamp += 1
        elif stamp:  # the reference draws only once something was added
            buffer.ended = True  # nothing more will come: draw returns None, not wait
            draws.append(buffer.draw())
            buffer.ended = False
    return draws


@pytest.mark.parametrize("size, max_reuse", sorted(REFERENCE, key=str))
def test_draws_are_the_reference_codes_priority_lifo(size, max_reuse):
    assert _play(ReplayBuffer(size, max_reuse), SCRIPT) == REFERENCE[size, max_reuse]


def test_the_least_drawn_newest_sample_comes_first_and_the_oldest_is_evicted():
    buffer = ReplayBuffer(3)
    for stamp in range(3):
        buffer.add(f"s{stamp}", stamp)
    buffer.ended = True
    assert [buffer.draw() for _ in range(4)] == ["s2", "s1", "s0", "s2"]
    buffer.add("s3", 3)  # evicts s0, drawn once
    buffer.add("s4", 4)  # evicts s1, drawn once
    # s2 (drawn twice) waits: s4 and s3 have been drawn fewer times, then s4 is the newer.
    assert [buffer.draw() for _ in range(3)] == ["s4", "s3", "s4"]
    summary = buffer.summary()
    # Draws per sample: s0 1, s1 1 (evicted); s2 2, s3 1, s4 2 (left at the end).
    assert summary == {"received": 5, "unused": 0, "draws_mean": 1.4, "draws_max": 2,
                       # ages: the newest stamp by then minus the drawn one's
                       "age_mean": round((0 + 1 + 2 + 0 + 0 + 1 + 0) / 7, 4), "age_max": 2}


def test_samples_evicted_before_any_draw_count_as_unused():
    buffer = ReplayBuffer(2, max_reuse=1)
    for stamp in range(5):
        buffer.add(stamp, stamp)
    buffer.ended = True
    assert [buffer.draw(), buffer.draw(), buffer.draw()] == [4, 3, None]  # each once
    summary = buffer.summary()
    assert summary["received"] == 5 and summary["unused"] == 3
    assert summary["draws_max"] == 1 and summary["age_max"] == 1


def test_a_draw_waits_for_the_filling_thread_and_ends_with_it():
    buffer = ReplayBuffer(2)
    arrivals = iter([("a", 0), ("b", 1), None])

    def receive():
        time.sleep(0.05)  # the sender is slower than the drawer
        return next(arrivals)

    thread = fill(buffer, receive)
    first = buffer.draw()  # waits for "a"
    assert first == "a"
    thread.join(5)
    assert not thread.is_alive()
    assert buffer.draw() == "b"  # the newer, not yet drawn
    assert buffer.draw() == "b"  # no cap: drawn again (fewest draws, then newest)
    capped = ReplayBuffer(2, max_reuse=1)
    for sample in ("a", "b"):
        capped.add(sample, 0)
    capped.end()
    assert [capped.draw(), capped.draw(), capped.draw()] == ["b", "a", None]


def test_an_error_while_receiving_reaches_the_drawing_thread():
    buffer = ReplayBuffer(2)

    def receive():
        raise ConnectionError("peer gone")

    fill(buffer, receive).join(5)
    with pytest.raises(RuntimeError, match="receiving from the previous stage failed") as err:
        buffer.draw()
    assert isinstance(err.value.__cause__, ConnectionError)


def test_draw_blocks_until_a_sample_arrives():
    buffer = ReplayBuffer(1)
    got = []
    drawer = threading.Thread(target=lambda: got.append(buffer.draw()))
    drawer.start()
    time.sleep(0.05)
    assert drawer.is_alive() and not got  # nothing to draw yet
    buffer.add("x", 0)
    drawer.join(5)
    assert got == ["x"]
