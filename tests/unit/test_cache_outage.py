from proxy.cache.outage import Outage
from tests.support.clock import FakeClock


def test_a_failure_skips_redis_for_the_pause_then_tries_again():
    clock = FakeClock()
    outage = Outage(pause=1.0, clock=clock)
    assert not outage.skipping()
    outage.failed()
    assert outage.skipping()
    clock.advance(0.99)
    assert outage.skipping()
    clock.advance(0.02)
    assert not outage.skipping()
    outage.failed()  # tried again and failed: another pause from now
    clock.advance(0.5)
    assert outage.skipping()
