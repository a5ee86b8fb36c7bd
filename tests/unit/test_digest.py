"""Digest: the computations of RFC 7616/8760, nonces that expire, and replay protection."""

from __future__ import annotations

import dataclasses

from router.sip import digest
from router.sip.digest import Credentials, NonceBook, Verdict


def creds(book: NonceBook, nonce: str, algorithm: str = "MD5", password: str = "secret",
          nc: str = "00000001") -> tuple[Credentials, str]:
    ha1 = digest.ha1(algorithm, "dev", "pbx.test", password)
    response = digest.response(algorithm, ha1, nonce, "REGISTER", "sip:pbx.test", "auth", nc, "cn")
    return Credentials("dev", "pbx.test", nonce, "sip:pbx.test", response, algorithm, "auth", nc, "cn"), \
        digest.ha1(algorithm, "dev", "pbx.test", "secret")


def test_rfc_2617_example_response_without_qop():
    # RFC 2617 §3.5 HA1/HA2 construction, checked against an independent computation
    ha1 = digest.ha1("MD5", "Mufasa", "testrealm@host.com", "Circle Of Life")
    assert ha1 == "939e7578ed9e3c518a452acee763bce9"


def test_a_correct_md5_and_sha256_answer_is_accepted():
    book = NonceBook(ttl=60)
    for algorithm in ("MD5", "SHA-256"):
        c, ha1 = creds(book, book.issue(100.0), algorithm)
        assert book.check(c, "REGISTER", ha1, 101.0) == Verdict.OK


def test_a_wrong_password_is_bad():
    book = NonceBook(ttl=60)
    c, ha1 = creds(book, book.issue(100.0), password="guess")
    assert book.check(c, "REGISTER", ha1, 101.0) == Verdict.BAD


def test_a_nonce_we_did_not_issue_is_bad():
    book, other = NonceBook(ttl=60), NonceBook(ttl=60)
    c, ha1 = creds(book, other.issue(100.0))
    assert book.check(c, "REGISTER", ha1, 101.0) == Verdict.BAD


def test_a_nonce_one_worker_issued_is_good_at_another_that_shares_its_secret():
    issuing, owning = NonceBook(ttl=60, secret=b"w" * 32), NonceBook(ttl=60, secret=b"w" * 32)
    c, ha1 = creds(owning, issuing.issue(100.0))
    assert owning.check(c, "REGISTER", ha1, 101.0) == Verdict.OK
    assert owning.check(c, "REGISTER", ha1, 101.5) == Verdict.BAD         # the same count again: a replay


def test_an_old_nonce_with_the_right_password_is_stale():
    book = NonceBook(ttl=60)
    c, ha1 = creds(book, book.issue(100.0))
    assert book.check(c, "REGISTER", ha1, 161.0) == Verdict.STALE


def test_a_replayed_nonce_count_is_refused_and_a_higher_one_accepted():
    book = NonceBook(ttl=60)
    nonce = book.issue(100.0)
    first, ha1 = creds(book, nonce, nc="00000001")
    assert book.check(first, "REGISTER", ha1, 101.0) == Verdict.OK
    assert book.check(first, "REGISTER", ha1, 102.0) == Verdict.BAD
    second, _ = creds(book, nonce, nc="00000002")
    assert book.check(second, "REGISTER", ha1, 103.0) == Verdict.OK


def test_pruning_forgets_only_expired_nonces():
    book = NonceBook(ttl=60)
    old, new = book.issue(100.0), book.issue(150.0)
    for nonce, at in ((old, 101.0), (new, 151.0)):
        c, ha1 = creds(book, nonce)
        book.check(c, "REGISTER", ha1, at)
    book.prune(170.0)
    assert set(book.counts) == {new}


def test_challenges_list_the_algorithms_in_the_order_given():
    values = digest.challenge("pbx.test", "n1", ("SHA-256", "MD5"), stale=True)
    assert values == ['Digest realm="pbx.test", nonce="n1", algorithm=SHA-256, qop="auth", stale=true',
                      'Digest realm="pbx.test", nonce="n1", algorithm=MD5, qop="auth", stale=true']


def test_a_response_with_non_ascii_characters_is_bad_not_an_error():
    """Found by fuzzing: hmac.compare_digest raised TypeError on a non-ASCII str."""
    book = NonceBook(ttl=60)
    c, ha1 = creds(book, book.issue(100.0))
    for forged in ("\u00e9" * 32, "\u00e9", ""):
        assert book.check(dataclasses.replace(c, response=forged), "REGISTER", ha1, 101.0) == Verdict.BAD


def test_credentials_in_an_algorithm_we_never_offer_are_no_credentials():
    params = {"username": "dev", "realm": "pbx.test", "nonce": "n", "uri": "sip:pbx.test", "response": "r"}
    assert Credentials.from_params(params).algorithm == "MD5"
    assert Credentials.from_params({**params, "algorithm": "sha-256"}).algorithm == "SHA-256"
    for other in ("SHA-512-256", "MD5-sess", ""):
        assert Credentials.from_params({**params, "algorithm": other}) is None


def test_a_nonce_first_used_after_younger_ones_is_answered_stale_then_forgotten_with_them():
    book = NonceBook(ttl=60)
    young, old = book.issue(150.0), book.issue(100.0)
    first, ha1 = creds(book, young)
    assert book.check(first, "REGISTER", ha1, 151.0) == Verdict.OK
    late, _ = creds(book, old)
    assert book.check(late, "REGISTER", ha1, 152.0) == Verdict.OK
    assert book.check(late, "REGISTER", ha1, 153.0) == Verdict.BAD        # its replay
    book.prune(170.0)                  # expired, but queued behind the young one: kept for now
    assert book.check(late, "REGISTER", ha1, 170.0) == Verdict.STALE       # which changes nothing
    book.prune(211.0)
    assert book.counts == {}
