"""A big YAML that has not changed is not parsed again at the next start or reload: the
parse child's answer is kept, and used only while the file, the code and the libraries
that read it are what they were, and only from a file nobody else could have written."""

from __future__ import annotations

import os
import subprocess

import pytest

from router import config_child, policy_cache
from router.config import load_policy

from .conftest import BASE


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(BASE.format(state_dir=tmp_path))
    return path


class ChildRuns:
    """Counts the parse children started."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = subprocess.Popen

        def counted(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(config_child.subprocess, "Popen", counted)


def test_an_unchanged_file_is_parsed_once_and_gives_the_same_policy(cache, yaml_file, monkeypatch):
    runs = ChildRuns(monkeypatch)
    first = config_child.load_policy_apart(str(yaml_file))
    again = config_child.load_policy_apart(str(yaml_file))
    assert runs.count == 1
    assert first == again == load_policy(str(yaml_file))
    entry = policy_cache.entry_path(str(yaml_file))
    assert entry.parent == cache and oct(entry.stat().st_mode & 0o777) == "0o600"


def test_an_edited_file_is_parsed_again_and_its_edit_is_seen(cache, yaml_file, monkeypatch):
    runs = ChildRuns(monkeypatch)
    config_child.load_policy_apart(str(yaml_file))
    yaml_file.write_text(yaml_file.read_text().replace('extension: "1002"', 'extension: "1003"'))
    edited = config_child.load_policy_apart(str(yaml_file))
    assert runs.count == 2
    assert edited.user("minh").extension == "1003"
    config_child.load_policy_apart(str(yaml_file))
    assert runs.count == 2                       # the edited file is now the one kept


def test_a_small_file_is_not_kept(cache, yaml_file, monkeypatch):
    monkeypatch.setattr(policy_cache, "MIN_SIZE", 1 << 20)
    runs = ChildRuns(monkeypatch)
    config_child.load_policy_apart(str(yaml_file))
    config_child.load_policy_apart(str(yaml_file))
    assert runs.count == 2 and not cache.exists()


@pytest.mark.parametrize("spoil", ["others_may_write", "folder_others_may_write", "foreign_content"])
def test_an_entry_anyone_else_could_have_written_is_not_used(cache, yaml_file, monkeypatch, spoil):
    runs = ChildRuns(monkeypatch)
    config_child.load_policy_apart(str(yaml_file))
    entry = policy_cache.entry_path(str(yaml_file))
    if spoil == "others_may_write":
        entry.chmod(0o666)
    elif spoil == "folder_others_may_write":
        cache.chmod(0o777)
    else:
        entry.write_bytes(b"not a cache entry")
    assert config_child.load_policy_apart(str(yaml_file)) == load_policy(str(yaml_file))
    assert runs.count == 2


def test_a_damaged_entry_is_not_used_and_is_replaced_by_a_good_one(cache, yaml_file, monkeypatch):
    runs = ChildRuns(monkeypatch)
    config_child.load_policy_apart(str(yaml_file))
    entry = policy_cache.entry_path(str(yaml_file))
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x01                 # one bit of the pickle, behind a good key
    entry.write_bytes(bytes(data))
    assert config_child.load_policy_apart(str(yaml_file)) == load_policy(str(yaml_file))
    assert runs.count == 2
    config_child.load_policy_apart(str(yaml_file))
    assert runs.count == 2                       # the good answer is kept again


def test_a_cache_that_fails_is_a_miss_never_a_failed_start(cache, yaml_file, monkeypatch):
    def broken() -> bytes:
        raise FileNotFoundError("a source file removed by an upgrade under way")
    monkeypatch.setattr(policy_cache, "_code_identity", broken)
    runs = ChildRuns(monkeypatch)
    assert config_child.load_policy_apart(str(yaml_file)) == load_policy(str(yaml_file))
    assert runs.count == 1 and not cache.exists()


def test_a_file_with_errors_gives_the_same_errors_from_the_cache(cache, yaml_file):
    from router.errors import ConfigError
    yaml_file.write_text(yaml_file.read_text().replace("receive_method: ip_phone", "receive_method: phone"))
    with pytest.raises(ConfigError) as first:
        config_child.load_policy_apart(str(yaml_file))
    with pytest.raises(ConfigError) as again:
        config_child.load_policy_apart(str(yaml_file))
    assert first.value.problems == again.value.problems and "'phone' is not one of" in first.value.problems[0]


def test_at_most_a_few_entries_are_kept(cache, tmp_path, yaml_file):
    for i in range(policy_cache.KEEP + 3):
        other = tmp_path / f"r{i}.yaml"
        other.write_text(yaml_file.read_text())
        config_child.load_policy_apart(str(other))
        os.utime(policy_cache.entry_path(str(other)), (1000 + i, 1000 + i))
    assert len(list(cache.glob("*.policy"))) == policy_cache.KEEP
