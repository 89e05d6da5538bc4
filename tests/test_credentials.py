"""Credentials without the proxy: where a secret may be placed (pure, hypothesis), and where a
credential file may live and how it is read (real files, directories, symlinks, shares).
The proxy end to end is tests/test_proxy_credentials.py; a real VM, tests/test_egress_vm.py."""

from __future__ import annotations

import os
import textwrap
from urllib.parse import quote

import pytest
from hypothesis import given, settings, strategies as st

from capsem_vm.policy import PolicyError, load_kernel_policy, parse_policy
from capsem_vm.policy.secret_file import SecretFileError, location_problem, read_secret
from capsem_vm.proxy.placement import place_in_query, query_value

PH = b"capsem-placeholder-svc"
SECRET = b"S3CR3T-value"
NAME = b"api_key"

# --- placement (pure) ------------------------------------------------------------------------------

_piece = st.sampled_from([PH, NAME, b"=", b"&", b"?", b"#", b";", b"/", b"%", b"%61", b"a", b"api", b"key",
                          b"api%5Fkey", b"%63apsem-placeholder-svc", b"+", b" ", b"..", b"x=" + PH])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_piece, max_size=14).map(b"".join))
def test_the_secret_lands_only_as_the_whole_value_of_the_declared_parameter(raw):
    target = b"/" + raw
    out, n = place_in_query(target, NAME, PH, SECRET)
    # nothing but the declared parameter changed: putting the placeholder back gives the input
    assert out.replace(SECRET, PH) == target
    # every secret is the whole value of a parameter of exactly that name, in the query
    if n:
        path, query = out.split(b"?", 1)
        assert SECRET not in path and b"#" not in out
        params = query.split(b"&")
        assert out.count(SECRET) == n == sum(p == NAME + b"=" + SECRET for p in params)
    else:
        assert out == target


def test_placement_examples():
    assert place_in_query(b"/x?api_key=" + PH, NAME, PH, SECRET) == (b"/x?api_key=" + SECRET, 1)
    assert place_in_query(b"/x?a=1&api_key=" + PH + b"&api_key=" + PH, NAME, PH, SECRET)[1] == 2
    for target in (b"/x/" + PH, b"/x?other=" + PH, b"/x?api_key=x" + PH, b"/x?api_key=" + PH + b"x",
                   b"/x?xapi_key=" + PH, b"/x?api%5Fkey=" + PH, b"/x?api_key=%63apsem-placeholder-svc",
                   b"/x?a=1;api_key=" + PH, b"/x?api_key=" + PH + b"#f", b"/x#?api_key=" + PH,
                   b"/x;api_key=" + PH, b"/api_key=" + PH):
        assert place_in_query(target, NAME, PH, SECRET) == (target, 0), target
    assert query_value("a b/c+d=e&f") == quote("a b/c+d=e&f", safe="-._~").encode() == b"a%20b%2Fc%2Bd%3De%26f"


# --- credential files ------------------------------------------------------------------------------

@pytest.fixture
def home(tmp_path):
    """A private directory chain (tmp_path sits under root-owned, sticky or 0700 directories)."""
    d = tmp_path / "conf"
    d.mkdir(mode=0o700)
    return d


def secret_at(path, text="tok-123\n", mode=0o600):
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_a_private_file_is_read(home):
    f = secret_at(home / "tok")
    assert location_problem(f) is None and read_secret(f) == "tok-123"


@pytest.mark.parametrize("setup,words", [
    (lambda d: secret_at(d / "tok", mode=0o620), "writable by other users (mode 0620)"),
    (lambda d: secret_at(d / "tok", mode=0o602), "writable by other users (mode 0602)"),
    (lambda d: (d.chmod(0o770), secret_at(d / "tok"))[1], "is writable by other users (mode 0770)"),
    (lambda d: (d.chmod(0o707), secret_at(d / "tok"))[1], "is writable by other users (mode 0707)"),
    (lambda d: ((d / "sub").mkdir(mode=0o777), (d / "sub").chmod(0o777), secret_at(d / "sub" / "tok"))[2],
     "sub is writable by other users (mode 0777)"),
    (lambda d: (secret_at(d / "real"), os.symlink(d / "real", d / "tok"), str(d / "tok"))[2], "symbolic link"),
    (lambda d: (secret_at(d / "real"), os.link(d / "real", d / "tok"), str(d / "tok"))[2], "2 hard links"),
    (lambda d: (os.mkfifo(d / "tok"), str(d / "tok"))[1], "not a regular file"),
])
def test_unsafe_files_are_refused_at_load_and_at_read(home, setup, words):
    f = setup(home)
    problem = location_problem(f)
    assert problem and words in problem, problem
    with pytest.raises(SecretFileError) as ei:
        read_secret(f)
    assert words in str(ei.value), str(ei.value)


def test_file_of_another_user_is_refused(home):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file to another uid")  # pragma: no cover
    f = secret_at(home / "tok")
    os.chown(f, 4242, 4242)
    assert "owned by uid 4242" in location_problem(f)
    with pytest.raises(SecretFileError, match="owned by uid 4242"):
        read_secret(f)
    os.chown(f, 0, 0)
    os.chown(home, 4242, 4242)
    assert f"directory {home} is owned by uid 4242" in location_problem(f)
    with pytest.raises(SecretFileError, match="owned by uid 4242"):
        read_secret(f)


def test_sticky_root_directory_is_fine_and_swapping_in_a_symlink_after_load_is_refused_at_read(tmp_path):
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    f = secret_at(sticky / "tok")
    assert location_problem(f) is None and read_secret(f) == "tok-123"
    # checked again on every read: a file that became a symlink, or writable, is refused then
    os.rename(f, sticky / "real")
    os.symlink(sticky / "real", f)
    with pytest.raises(SecretFileError, match="symbolic link"):
        read_secret(f)
    os.unlink(f)
    secret_at(sticky / "tok", mode=0o666)
    with pytest.raises(SecretFileError, match="writable by other users"):
        read_secret(f)


def test_contents_are_bounded_and_single_line(home):
    with pytest.raises(SecretFileError, match="larger than"):
        read_secret(secret_at(home / "big", "x" * (64 * 1024 + 1)))
    with pytest.raises(SecretFileError, match="control characters"):
        read_secret(secret_at(home / "two", "a\nInjected: yes\n"))
    with pytest.raises(SecretFileError, match="empty"):
        read_secret(secret_at(home / "empty", "\n"))
    with pytest.raises(SecretFileError, match="cannot be opened"):
        read_secret(str(home / "missing"))


def _policy(tmp_path, secret_path: str):
    p = tmp_path / "policy.toml"
    p.write_text(textwrap.dedent(f"""
        [[credential]]
        name = "svc"
        hosts = ["api.test.example"]
        file = "{secret_path}"
        header = "Authorization"
    """))
    p.chmod(0o600)
    return p


def test_a_credential_file_inside_any_share_stops_the_kernel(tmp_path, home):
    share = tmp_path / "notebooks"
    (share / "deep").mkdir(parents=True)
    policy = _policy(tmp_path, secret_at(share / "deep" / "tok"))
    with pytest.raises(PolicyError) as ei:
        load_kernel_policy(policy, [str(share)])
    msg = str(ei.value)
    assert "credential 'svc'" in msg and str(share / "deep" / "tok") in msg and "shared with the VM" in msg
    # not there yet counts too: the guest could create it
    policy = _policy(tmp_path, str(share / "later"))
    with pytest.raises(PolicyError, match="shared with the VM"):
        load_kernel_policy(policy, [str(share)])
    # a path outside that leads inside (a symlinked directory)
    os.symlink(share, home / "link")
    policy = _policy(tmp_path, str(home / "link" / "deep" / "tok"))
    with pytest.raises(PolicyError, match="shared with the VM"):
        load_kernel_policy(policy, [str(share)])
    # and a share given by a symlinked spelling
    policy = _policy(tmp_path, str(share / "deep" / "tok"))
    with pytest.raises(PolicyError, match="shared with the VM"):
        load_kernel_policy(policy, [str(home / "link")])
    # the same policy with the file outside every share loads
    policy = _policy(tmp_path, secret_at(home / "tok"))
    assert load_kernel_policy(policy, [str(share)]).credentials[0].value() == "tok-123"


def test_a_world_writable_credential_file_stops_the_kernel(tmp_path, home):
    policy = _policy(tmp_path, secret_at(home / "tok", mode=0o666))
    with pytest.raises(PolicyError, match=r"credential 'svc'.*tok is writable by other users"):
        load_kernel_policy(policy, [])
    # parse_policy alone (the proxy side) does not refuse; the proxy's read does
    cred = parse_policy(policy.read_text(), "p").credentials[0]
    assert cred.read() == (None, f"file {home / 'tok'} is writable by other users (mode 0666)")
