"""Agent phones and hotlines: canonical 84xxxxxxxxx, anything else refused with a hint."""

import pytest

from router.errors import InvalidNumber
from router.policy.numbers import canonical


@pytest.mark.parametrize("number", ["84912345678", "84987654321", "842873001234"])
def test_canonical_vietnamese_numbers_are_accepted_unchanged(number):
    assert canonical(number) == number


@pytest.mark.parametrize("raw, hint", [
    ("+84912345678", "write it as 84912345678"),
    ("0912345678", "write it as 84912345678"),
    ("84 912 345 678", "write it as 84912345678"),
    ("091-234-5678", "write it as 84912345678"),
    ("912345678", "write it as 84912345678"),
    ("８４９１２３４５６７８", "write it as 84912345678"),      # fullwidth digits, as an IME types them
    ("٨٤٩١٢٣٤٥٦٧٨", "write it as 84912345678"),              # Arabic-Indic digits
])
def test_other_forms_are_refused_with_the_canonical_form_to_type(raw, hint):
    with pytest.raises(InvalidNumber, match=hint):
        canonical(raw)


def test_a_number_of_another_country_is_refused():
    with pytest.raises(InvalidNumber, match="not a VN number .* start with 84"):
        canonical("12025550123")


@pytest.mark.parametrize("raw", ["84123", "849", "8400000000000"])
def test_an_invalid_vietnamese_number_is_refused_with_an_example(raw):
    with pytest.raises(InvalidNumber, match=r"not a valid VN number; write it in the form 84\d+"):
        canonical(raw)


def test_garbage_is_refused():
    with pytest.raises(InvalidNumber, match="not a phone number"):
        canonical("call me")


def test_the_country_is_configurable():
    assert canonical("12025550123", "US") == "12025550123"
    with pytest.raises(InvalidNumber, match="not a US number"):
        canonical("84912345678", "US")


def test_an_unknown_country_is_an_error():
    with pytest.raises(InvalidNumber, match="unknown country"):
        canonical("84912345678", "XX")
