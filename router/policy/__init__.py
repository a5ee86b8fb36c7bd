"""The pure policy core: model, phone numbers, decide(), authorization.

Nothing in this package performs I/O or imports a SIP stack, socket or
database module; ``tests/unit/test_purity.py`` proves it.
"""
