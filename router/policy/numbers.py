"""Phone numbers in the router's canonical form.

Canonical form is the country calling code followed by the national number,
digits only: no ``+``, no trunk prefix ``0``, no spaces.  For Vietnam that is
``84xxxxxxxxx``.  What an operator *writes* (the YAML, ``set-phone``) must be
canonical: anything else is refused by ``canonical``, and the error shows the
canonical form to type instead whenever the input can be understood.

What a caller *dialled* is another matter: an upstream PBX writes the called
number however it likes (``+84...``, ``tel:+84-28-...``, ``028...`` with the
trunk prefix, ``sip:+84...@host;user=phone``).  ``dialled`` reads all of those
with the same ``phonenumbers`` rules and gives the canonical form, or None --
it never raises, because a number nobody can read simply matches no queue.
"""

from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers

from router.errors import InvalidNumber


@lru_cache(maxsize=64)
def _country_code(region: str) -> int:
    code = phonenumbers.country_code_for_region(region)
    if code == 0:
        raise InvalidNumber(f"unknown country {region!r}; use an ISO 3166 code such as VN")
    return code


def _guess(raw: str, region: str) -> phonenumbers.PhoneNumber | None:
    """Best-effort parse of a non-canonical input, only to build a hint."""
    try:
        return phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None


def _canonical_of(number: phonenumbers.PhoneNumber) -> str:
    # E.164 without its "+": keeps a national number's leading zeros (Italy's 06...)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)[1:]


@lru_cache(maxsize=64)
def _example(region: str, code: int) -> str:
    sample = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
    return f"{code}{sample.national_number}" if sample is not None else f"{code}..."


def canonical(raw: str, region: str = "VN") -> str:
    """Return ``raw`` if it is a valid canonical number of ``region``; else raise.

    >>> canonical("84912345678")
    '84912345678'
    """
    code = _country_code(region)
    text = str(raw).strip()
    if not (text.isascii() and text.isdigit()):      # isdigit alone takes "１２" and "١٢" too
        guess = _guess(text, region)
        if guess is not None and phonenumbers.is_valid_number(guess):
            raise InvalidNumber(
                f"{text!r} is not in canonical form; write it as {_canonical_of(guess)} "
                "(country code and number, digits only, no '+', no leading 0)")
        raise InvalidNumber(
            f"{text!r} is not a phone number; write digits only in the form {_example(region, code)}")
    if text.startswith("0"):
        guess = _guess(text, region)
        if guess is not None and phonenumbers.is_valid_number(guess):
            raise InvalidNumber(
                f"{text!r} starts with the trunk prefix 0; write it as {_canonical_of(guess)}")
        raise InvalidNumber(
            f"{text!r} starts with 0 and is not a valid {region} number; "
            f"write it in the form {_example(region, code)}")
    try:
        parsed = phonenumbers.parse("+" + text, None)
    except phonenumbers.NumberParseException:
        parsed = None
    if parsed is None and text.startswith(str(code)):
        raise InvalidNumber(
            f"{text!r} is not a valid {region} number; write it in the form {_example(region, code)}")
    if parsed is None or parsed.country_code != code:
        # Maybe a national number written without its 0: "912345678".
        guess = _guess(text, region)
        if guess is not None and phonenumbers.is_valid_number(guess) and guess.country_code == code:
            raise InvalidNumber(
                f"{text!r} lacks the country code; write it as {_canonical_of(guess)}")
        raise InvalidNumber(
            f"{text!r} is not a {region} number (it must start with {code}); "
            f"write it in the form {_example(region, code)}")
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidNumber(
            f"{text!r} is not a valid {region} number; write it in the form {_example(region, code)}")
    return text


# ----------------------------------------------------------------------------- dialled numbers

MAX_DIALLED = 64                       # longer than any number written with separators and context
_VISUAL = str.maketrans("", "", " -.()\t")   # RFC 3966 visual separators, and spaces people type
_NUMBER = re.compile(r"^\+?[0-9]{1,17}$")   # ASCII digits only: E.164 is 15, "00" + 15 is 17
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def _number_and_context(raw: str) -> tuple[str, str] | None:
    """The number and its ``phone-context`` out of a bare number, a tel: URI or a
    sip:/sips: URI (or ``<uri>`` as in a header); None if there is no number part."""
    text = raw.strip()
    if "<" in text:                                   # "Name" <sip:...>: the URI inside
        text = text[text.find("<") + 1:].partition(">")[0].strip()
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if colon and scheme in ("sip", "sips"):
        user, at, _host = rest.partition("?")[0].rpartition("@")
        if not at:
            return None                               # sip:host names no number
        text = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), user.partition(":")[0])
    elif colon and scheme == "tel":
        text = rest
    number, _, params = text.partition(";")
    context = ""
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "phone-context":
            context = value.strip().translate(_VISUAL)
    return number.translate(_VISUAL), context


def _parsed(text: str, region: str | None) -> str | None:
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    return _canonical_of(number) if phonenumbers.is_valid_number(number) else None


@lru_cache(maxsize=4096)
def dialled(raw: str, region: str = "VN") -> str | None:
    """The canonical form of a dialled number however it is written, or None.

    Understood: canonical digits (``842873001234``), ``+842873001234``, the
    national form with the trunk prefix (``02873001234``) or the international
    prefix (``00842873001234``), any of those with visual separators
    (``+84-28-7300-1234``, ``(028) 7300 1234``), inside a ``tel:`` URI (with a
    ``phone-context`` for a local number) or as the user part of a ``sip:``/
    ``sips:`` URI.  Only numbers ``phonenumbers`` finds valid come back.  Never
    raises: anything else, including an unknown ``region``, gives None.

    >>> dialled("tel:+84-28-7300-1234")
    '842873001234'
    """
    if not isinstance(raw, str) or len(raw) > MAX_DIALLED:
        return None
    found = _number_and_context(raw)
    if found is None:
        return None
    number, context = found
    if not _NUMBER.match(number):
        return None
    if number.startswith("+"):
        return _parsed(number, None)
    if _NUMBER.match(context) and context.startswith("+"):
        # RFC 3966 local number: the context's digits come first (phonenumbers drops a
        # trunk prefix that follows the country code: +84 028... is +84 28...)
        in_context = _parsed(context + number, None)
        if in_context is not None:
            return in_context
    if not number.startswith("0"):
        canonical_form = _parsed("+" + number, None)   # the router's own form first
        if canonical_form is not None:
            return canonical_form
    return _parsed(number, region)
