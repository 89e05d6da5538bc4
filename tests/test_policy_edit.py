"""What a policy PUT from the browser may change: rules yes; credentials and [settings] never."""

from __future__ import annotations

import pytest

from capsem_kernel.server.policy_edit import PolicyEditRefused, check_credentials_kept
from capsem_vm.policy import parse_policy

RULE = '[[rule]]\nname = "pypi"\nhost = "pypi.org"\naction = "allow"\n'

# every TOML spelling of switching a setting on: a table, an inline table, a dotted key, any order
SWITCHED_ON = [
    '[settings]\n{key} = true\n' + RULE,
    RULE + '[settings]\n{key} = true\n',
    'settings = {{ {key} = true }}\n' + RULE,
    'settings.{key} = true\n' + RULE,
    '[settings]\n"{key}" = true\n' + RULE,
]


@pytest.mark.parametrize("key", ["allow_doh", "observe"])
@pytest.mark.parametrize("spelling", SWITCHED_ON)
def test_a_setting_switched_on_or_off_from_the_browser_is_refused_and_nothing_written(tmp_path, key, spelling):
    target = tmp_path / "policy.toml"
    new = spelling.format(key=key)
    parse_policy(new, "new.toml")  # a valid policy: only the edit rule refuses it
    for current in ("", RULE, RULE + "[settings]\n"):  # no file, no table, an empty table
        if current:
            target.write_text(current)
        with pytest.raises(PolicyEditRefused, match=key):
            check_credentials_kept(target, new)
        assert target.read_text() == current if current else not target.exists()
    # and off again, once the host switched it on
    target.write_text(new)
    with pytest.raises(PolicyEditRefused, match=key):
        check_credentials_kept(target, RULE)


def test_rules_may_change_while_the_settings_stay(tmp_path):
    target = tmp_path / "policy.toml"
    target.write_text('[settings]\nobserve = true\n' + RULE)
    other = RULE.replace("pypi.org", "files.pythonhosted.org")
    check_credentials_kept(target, 'settings.observe = true\n' + other)  # same value, other spelling
    target.write_text(RULE)
    check_credentials_kept(target, '[settings]\nobserve = false\nallow_doh = false\n' + other)  # false = absent
