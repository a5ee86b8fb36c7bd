"""sip-router: a SIP call router for contact centres."""

__version__ = "0.1.0"
