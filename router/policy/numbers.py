"""Phone numbers in the router's canonical form.

Canonical form is the country calling code followed by the national number,
digits only: no ``+``, no trunk prefix ``0``, no spaces.  For Vietnam that is
``84xxxxxxxxx``.  Anything else is refused, and the error shows the canonical
form to type instead whenever the input can be understood.
"""

from __future__ import annotations

import phonenumbers

from router.errors import InvalidNumber


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
    return f"{number.country_code}{number.national_number}"


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
    example = _example(region, code)
    if not text.isdigit():
        guess = _guess(text, region)
        if guess is not None and phonenumbers.is_valid_number(guess):
            raise InvalidNumber(
                f"{text!r} is not in canonical form; write it as {_canonical_of(guess)} "
                "(country code and number, digits only, no '+', no leading 0)")
        raise InvalidNumber(
            f"{text!r} is not a phone number; write digits only in the form {example}")
    if text.startswith("0"):
        guess = _guess(text, region)
        if guess is not None and phonenumbers.is_valid_number(guess):
            raise InvalidNumber(
                f"{text!r} starts with the trunk prefix 0; write it as {_canonical_of(guess)}")
        raise InvalidNumber(
            f"{text!r} starts with 0 and is not a valid {region} number; "
            f"write it in the form {example}")
    try:
        parsed = phonenumbers.parse("+" + text, None)
    except phonenumbers.NumberParseException:
        parsed = None
    if parsed is None and text.startswith(str(code)):
        raise InvalidNumber(
            f"{text!r} is not a valid {region} number; write it in the form {example}")
    if parsed is None or parsed.country_code != code:
        # Maybe a national number written without its 0: "912345678".
        guess = _guess(text, region)
        if guess is not None and phonenumbers.is_valid_number(guess) and guess.country_code == code:
            raise InvalidNumber(
                f"{text!r} lacks the country code; write it as {_canonical_of(guess)}")
        raise InvalidNumber(
            f"{text!r} is not a {region} number (it must start with {code}); "
            f"write it in the form {example}")
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidNumber(
            f"{text!r} is not a valid {region} number; write it in the form {example}")
    return text
