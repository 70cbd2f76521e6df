"""smtpdup.policy, table by table: what an attempt's replies mean for a
copy (per-recipient 2xx/4xx/5xx, expiry, back-off delays, site failures).
Pure functions: no peers needed; tests/test_durability.py shows the same
decisions end to end."""

import pytest

from smtpdup.policy import (
    DEAD,
    DEFERRED,
    DELIVERED,
    Outcome,
    Retry,
    is_expired,
    is_site_failure,
    outcome,
    recipient_fate,
    retry_delay,
)
from smtpdup.reply import Reply

RETRY = Retry(initial_seconds=60, max_interval_seconds=900, max_age_seconds=86400)
T0 = 1_700_000_000.0  # a message's arrival


@pytest.mark.parametrize("code, fate", [
    (250, DELIVERED), (251, DELIVERED), (220, DELIVERED),
    (354, DEFERRED),  # DATA's go-ahead where a verdict was due: try again
    (421, DEFERRED), (450, DEFERRED), (451, DEFERRED), (452, DEFERRED),
    (500, DEAD), (550, DEAD), (552, DEAD), (554, DEAD),
])
def test_recipient_fate_by_reply_class(code, fate):
    assert recipient_fate(Reply(code, "", "text")) == fate


@pytest.mark.parametrize("mail, site_failure", [
    (None, True),  # no session at all: refused, timed out, broken
    (Reply(421, "4.3.2", "shutting down"), True),
    (Reply(451, "4.3.0", "try later"), True),
    (Reply(452, "4.3.1", "full"), True),
    (Reply(550, "5.7.1", "sender refused"), False),  # about this message
    (Reply(553, "5.1.8", "bad sender"), False),
    (Reply(250, "2.1.0", "ok"), False),
])
def test_site_failure(mail, site_failure):
    assert is_site_failure(mail) is site_failure


@pytest.mark.parametrize("failures, delay", [
    (1, 60), (2, 120), (3, 240), (4, 480), (5, 900), (6, 900), (30, 900),
])
def test_retry_delay_doubles_up_to_the_maximum_interval(failures, delay):
    assert retry_delay(failures, RETRY) == delay


@pytest.mark.parametrize("age, expired", [
    (0, False), (86399.9, False), (86400, True), (90000, True),
])
def test_expiry_at_the_maximum_age(age, expired):
    assert is_expired(T0 + age, T0, RETRY) is expired


def judge(age: float = 10, attempts: int = 1, refused=(), dead=(), deferred=(), reply="451 4.3.0 later"):
    return outcome(refused=list(refused), dead=list(dead), deferred=list(deferred), reply=reply,
                   attempts=attempts, now=T0 + age, received_at=T0, retry=RETRY)


@pytest.mark.parametrize("case, expected", [
    # every recipient delivered
    (dict(reply="250 2.0.0 ok"), Outcome(DELIVERED, [], [], "", None)),
    # 4xx for all: try again after the first delay
    (dict(deferred=["a", "b"]), Outcome(DEFERRED, [], ["a", "b"], "", T0 + 10 + 60)),
    # the third attempt waits four times the initial delay
    (dict(deferred=["a"], attempts=3), Outcome(DEFERRED, [], ["a"], "", T0 + 10 + 240)),
    # never past the maximum age: the last try is at that age
    (dict(deferred=["a"], age=86000, attempts=9), Outcome(DEFERRED, [], ["a"], "", T0 + 86400)),
    # a 5xx to one RCPT, another recipient deferred
    (dict(refused=[("a", "550 5.1.1 no such user")], deferred=["b"]),
     Outcome(DEFERRED, ["a"], ["b"], "550 5.1.1 no such user", T0 + 10 + 60)),
    # 5xx for the whole transaction
    (dict(dead=["a", "b"], reply="554 5.7.1 rejected"), Outcome(DEAD, ["a", "b"], [], "554 5.7.1 rejected", None)),
    # RCPT refusals with the same reply are one reason
    (dict(refused=[("a", "550 5.1.1 unknown"), ("b", "550 5.1.1 unknown")], reply="250 ok"),
     Outcome(DEAD, ["a", "b"], [], "550 5.1.1 unknown", None)),
    # deferred past the maximum age: dead, saying so
    (dict(deferred=["a"], age=86400, attempts=7),
     Outcome(DEAD, ["a"], [], "expired after 7 attempts: 451 4.3.0 later", None)),
    # a refusal and an expiry: both reasons, in order
    (dict(refused=[("a", "550 5.1.1 unknown")], deferred=["b"], age=90000, attempts=2),
     Outcome(DEAD, ["a", "b"], [], "550 5.1.1 unknown; expired after 2 attempts: 451 4.3.0 later", None)),
    # expiry does not touch what was delivered or refused in the same attempt
    (dict(dead=["a"], reply="552 5.3.4 too big", age=90000), Outcome(DEAD, ["a"], [], "552 5.3.4 too big", None)),
])
def test_outcome_of_an_attempt(case, expected):
    assert judge(**case) == expected
