"""The Kamailio + rtpengine edge in front of the router: its configuration, certificates
and command lines, rendered from the ``edge:`` section of the policy."""
