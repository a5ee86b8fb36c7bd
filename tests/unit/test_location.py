"""The location service's indexes: who is registered where, as calls read it."""

from router.policy.model import Binding, DeviceKind, Policy
from router.sip.location import Location

NOW = 1_000_000.0


def binding(user: str, device: str, expires_in: float = 3600, kind: DeviceKind = DeviceKind.IP_PHONE) -> Binding:
    return Binding(user, device, kind, f"sip:{device}@192.0.2.10:5060", NOW + expires_in)


def devices(location: Location, user: str, now: float = NOW) -> list[str]:
    return [b.device_id for b in location.bindings(now, user)]


def test_an_agent_with_a_desk_phone_and_an_app_registered_reaches_both_in_device_order() -> None:
    location = Location([binding("lan", "lan-mobile", kind=DeviceKind.APP), binding("lan", "lan-desk")], NOW)
    assert devices(location, "lan") == ["lan-desk", "lan-mobile"]
    location.put("lan", "lan-aaa-web", [binding("lan", "lan-aaa-web", kind=DeviceKind.WEB)])
    assert devices(location, "lan") == ["lan-aaa-web", "lan-desk", "lan-mobile"]


def test_a_device_that_unregisters_leaves_the_others_and_the_last_one_leaves_no_entry() -> None:
    location = Location([binding("lan", "lan-desk"), binding("lan", "lan-mobile")], NOW)
    location.put("lan", "lan-mobile", [])
    assert devices(location, "lan") == ["lan-desk"]
    assert location.of_device("lan-mobile") == ()
    location.put("lan", "lan-desk", [])
    assert devices(location, "lan") == []
    assert location.devices_of("lan") == ()


def test_a_refreshed_registration_replaces_the_device_set_without_listing_it_twice() -> None:
    location = Location([binding("lan", "lan-desk")], NOW)
    location.put("lan", "lan-desk", [binding("lan", "lan-desk", expires_in=7200)])
    assert devices(location, "lan") == ["lan-desk"]
    assert location.of_device("lan-desk")[0].expires_at == NOW + 7200


def test_a_desk_phone_given_to_another_agent_rings_for_that_agent_only() -> None:
    location = Location([binding("lan", "lan-desk"), binding("lan", "lan-mobile")], NOW)
    changed = location.follow_moves({"lan-desk": ("minh", DeviceKind.IP_PHONE)})
    assert [(c.user_id, c.device_id) for c in changed] == [("minh", "lan-desk")]
    assert devices(location, "lan") == ["lan-mobile"]
    assert devices(location, "minh") == ["lan-desk"]


def test_an_expired_binding_is_dropped_and_its_user_no_longer_lists_the_device() -> None:
    location = Location([binding("lan", "lan-desk", expires_in=60), binding("lan", "lan-mobile")], NOW)
    saves = location.expire(NOW + 61)
    assert [(s.device_id, s.bindings) for s in saves] == [("lan-desk", ())]
    assert devices(location, "lan", NOW + 61) == ["lan-mobile"]
    assert location.devices_of("lan") == ("lan-mobile",)


def test_a_restart_loads_three_devices_out_of_order_and_a_phone_with_two_contacts_as_the_registrar_left_them(
) -> None:
    second = Binding("lan", "lan-desk", DeviceKind.IP_PHONE, "sip:lan-desk@192.0.2.11:5060", NOW + 600)
    loaded = [binding("lan", "lan-web", kind=DeviceKind.WEB), binding("lan", "lan-desk"),
              binding("minh", "minh-desk"), second, binding("lan", "lan-app", kind=DeviceKind.APP),
              binding("lan", "lan-old", expires_in=-1)]
    location = Location(loaded, NOW)
    assert location.devices_of("lan") == ("lan-app", "lan-desk", "lan-web")
    assert location.devices_of("minh") == ("minh-desk",)
    assert [b.contact for b in location.of_device("lan-desk")] == ["sip:lan-desk@192.0.2.10:5060",
                                                                   "sip:lan-desk@192.0.2.11:5060"]
    assert location.of_device("lan-old") == ()
    assert location.next_timer() == NOW + 600            # the earliest expiry of any device
    assert [s.device_id for s in location.expire(NOW + 601)] == ["lan-desk"]
    assert [b.contact for b in location.of_device("lan-desk")] == ["sip:lan-desk@192.0.2.10:5060"]


def test_at_a_restart_a_phone_no_longer_in_the_yaml_is_dropped_and_one_that_changed_hands_or_kind_follows(
        policy: Policy) -> None:
    # the YAML: lan has lan-desk (ip_phone), lan-app, lan-web; minh has minh-desk
    loaded = [binding("lan", "lan-desk"), binding("lan", "gone-phone"), binding("lan", "minh-desk"),
              binding("lan", "lan-app", kind=DeviceKind.IP_PHONE), binding("lan", "lan-web", kind=DeviceKind.WEB)]
    location = Location(loaded, NOW)
    changed = {c.device_id: c for c in location.follow(policy)}
    assert set(changed) == {"gone-phone", "minh-desk", "lan-app"}
    assert changed["gone-phone"].bindings == ()
    assert devices(location, "minh") == ["minh-desk"]
    assert devices(location, "lan") == ["lan-app", "lan-desk", "lan-web"]
    assert location.of_device("lan-app")[0].kind is DeviceKind.APP
