"""Finding the trunk: an address is used as given, without asking DNS."""

from router.dns import resolve_trunk
from router.policy.model import Trunk


def test_an_ip_trunk_is_used_as_given():
    assert resolve_trunk(Trunk(host="192.0.2.10", port=5080)) == ("192.0.2.10", 5080)
    assert resolve_trunk(Trunk(host="::1", port=5070, nameserver="127.0.0.1:9")) == ("::1", 5070)
