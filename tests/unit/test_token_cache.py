"""The in-process record cache: what it keeps, for how long, and what makes it let go."""

from __future__ import annotations

from collections.abc import Callable

from sidecar.tokens.cache import RecordCache
from tests.support import make_tokens

NOW = 1_800_000_000.0


class Notices:
    """A stand-in for the coordinator's subscription."""

    def __init__(self) -> None:
        self.subscribed = True
        self.generation = 1
        self.callbacks: list[Callable[[str], None]] = []

    def on_change(self, callback: Callable[[str], None]) -> None:
        self.callbacks.append(callback)

    def notice(self, user_key: str) -> None:
        for callback in self.callbacks:
            callback(user_key)


def cache_with(notices: Notices, **kw: float) -> RecordCache:
    return RecordCache(notices, ttl_s=kw.get("ttl_s", 30.0), wait_skew_s=30.0)


def test_a_record_read_with_no_notice_since_is_kept_and_served() -> None:
    notices = Notices()
    cache = cache_with(notices)
    record = make_tokens(now=NOW, expires_in=3600)
    cache.remember("u1", record, cache.mark(), NOW)
    assert cache.get("u1", NOW + 1) is record


def test_a_notice_for_the_user_drops_the_copy() -> None:
    notices = Notices()
    cache = cache_with(notices)
    cache.remember("u1", make_tokens(now=NOW), cache.mark(), NOW)
    notices.notice("u1")
    assert cache.get("u1", NOW) is None


def test_a_read_overtaken_by_a_notice_is_not_kept() -> None:
    """The notice of another replica's write arrived while this read was in flight."""
    notices = Notices()
    cache = cache_with(notices)
    mark = cache.mark()
    notices.notice("u1")  # e.g. a disconnect elsewhere
    cache.remember("u1", make_tokens(now=NOW), mark, NOW)
    assert cache.get("u1", NOW) is None


def test_copies_are_not_trusted_while_notices_do_not_flow_or_after_they_restarted() -> None:
    notices = Notices()
    cache = cache_with(notices)
    cache.remember("u1", make_tokens(now=NOW), cache.mark(), NOW)
    notices.subscribed = False
    assert cache.get("u1", NOW) is None
    cache.remember("u2", make_tokens(now=NOW), cache.mark(), NOW)
    notices.subscribed = True
    assert cache.get("u2", NOW) is None, "nothing is kept while unsubscribed"
    cache.remember("u3", make_tokens(now=NOW), cache.mark(), NOW)
    notices.generation += 2  # dropped and came back: notices may have been missed
    assert cache.get("u3", NOW) is None


def test_a_copy_lives_at_most_ttl_and_never_past_the_refresh_point() -> None:
    notices = Notices()
    cache = cache_with(notices, ttl_s=30.0)
    long_lived = make_tokens(now=NOW, expires_in=3600)
    cache.remember("u1", long_lived, cache.mark(), NOW)
    assert cache.get("u1", NOW + 29) is long_lived
    assert cache.get("u1", NOW + 30) is None
    near_refresh = make_tokens(now=NOW, expires_in=40)  # refresh due 10 s from now
    cache.remember("u2", near_refresh, cache.mark(), NOW)
    assert cache.get("u2", NOW + 9) is near_refresh
    assert cache.get("u2", NOW + 10) is None
    due = make_tokens(now=NOW, expires_in=20)  # already inside the refresh window
    cache.remember("u3", due, cache.mark(), NOW)
    assert len(cache) == 0


def test_the_cache_is_bounded_and_lets_the_oldest_go() -> None:
    notices = Notices()
    cache = RecordCache(notices, ttl_s=30.0, wait_skew_s=30.0, max_entries=3)
    for n in range(5):
        cache.remember(f"u{n}", make_tokens(now=NOW), cache.mark(), NOW)
    assert len(cache) == 3
    assert cache.get("u0", NOW) is None
    assert cache.get("u4", NOW) is not None
