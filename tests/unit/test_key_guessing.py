"""The memory of keys a bucket does not hold: short-lived and bounded in size."""

from __future__ import annotations

import time

from gateway.auth.view import Absent


def test_an_absent_key_is_remembered_until_its_time_is_up() -> None:
    absent = Absent(seconds=0.05)
    absent.add("key.0123456789abcdef")

    assert "key.0123456789abcdef" in absent
    time.sleep(0.06)
    assert "key.0123456789abcdef" not in absent
    assert len(absent) == 0


def test_a_flood_of_absent_keys_keeps_only_the_most_recently_asked() -> None:
    absent = Absent(entries=3)
    for n in range(3):
        absent.add(f"key.{n}")
    assert "key.0" in absent  # asked again: now the most recent

    for n in range(3, 1000):
        absent.add(f"key.{n}")

    assert len(absent) == 3
    assert [f"key.{n}" in absent for n in (0, 1, 2, 997, 998, 999)] == [
        False,
        False,
        False,
        True,
        True,
        True,
    ]


def test_a_key_that_appears_is_forgotten_as_absent() -> None:
    absent = Absent()
    absent.add("key.0123456789abcdef")

    absent.discard("key.0123456789abcdef")

    assert "key.0123456789abcdef" not in absent
