"""The htu comparison (RFC 9449 §4.3 step 9) and its RFC 3986 §6.2.2/§6.2.3 normalization."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trustplane.dpop.htu import HtuError, normalize_htu, remove_dot_segments


@pytest.mark.parametrize(
    ("uri", "normal"),
    [
        ("https://as.example/token", "https://as.example/token"),
        ("HTTPS://As.Example/token", "https://as.example/token"),
        ("https://as.example:443/token", "https://as.example/token"),
        ("http://as.example:80/token", "http://as.example/token"),
        ("https://as.example:/token", "https://as.example/token"),
        ("https://as.example:8443/token", "https://as.example:8443/token"),
        ("http://as.example:443/token", "http://as.example:443/token"),
        ("https://as.example", "https://as.example/"),
        ("https://as.example/token?a=1#f", "https://as.example/token"),
        ("https://as.example/%7euser/%2fx", "https://as.example/~user/%2Fx"),
        ("https://as.example/a%20b/é", "https://as.example/a%20b/%C3%A9"),
        ("https://as.example/a/./b/../c", "https://as.example/a/c"),
        ("https://[::1]:443/token", "https://[::1]/token"),
        ("https://as.example/Token", "https://as.example/Token"),  # path case matters
    ],
)
def test_normal_forms(uri: str, normal: str) -> None:
    assert normalize_htu(uri) == normal


@pytest.mark.parametrize(
    "uri",
    [
        "/token",
        "as.example/token",
        "ftp://as.example/token",
        "https:///token",
        "https://user@as.example/token",
        "https://as.example:99999/token",
        "https://as.example:x/token",
        "https://as.example/%zz",
        "https://as.example/%2",
        "https://as.example/to\tken",
        "https://as.example/token\n",
        "https://" + "a" * 5000,
    ],
)
def test_what_no_request_could_have_been_sent_to_is_refused(uri: str) -> None:
    with pytest.raises(HtuError):
        normalize_htu(uri)


def test_rfc3986_dot_segment_examples() -> None:
    """RFC 3986 §5.2.4 walk-throughs."""
    assert remove_dot_segments("/a/b/c/./../../g") == "/a/g"
    assert remove_dot_segments("mid/content=5/../6") == "mid/6"


SEGMENT = st.text(alphabet=string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@%é", max_size=8)
HOSTS = st.sampled_from(["as.example", "rs.example", "127.0.0.1", "[::1]"])


def variants(scheme: str, host: str, path: str) -> st.SearchStrategy[str]:
    default = {"http": 80, "https": 443}[scheme]
    return st.tuples(
        st.sampled_from([scheme, scheme.upper(), scheme.capitalize()]),
        st.sampled_from([host, host.upper()]),
        st.sampled_from(["", f":{default}", ":"]),
        st.sampled_from(["", "?q=1", "#frag", "?q#f"]),
    ).map(lambda v: f"{v[0]}://{v[1]}{v[2]}{path}{v[3]}")


@given(
    st.sampled_from(["http", "https"]),
    HOSTS,
    st.lists(SEGMENT.filter(lambda s: "%" not in s), max_size=4).map(lambda p: "/" + "/".join(p)),
    st.data(),
)
def test_equivalent_spellings_normalize_alike(
    scheme: str, host: str, path: str, data: st.DataObject
) -> None:
    """Case of scheme and host, a default or empty port, and query/fragment never change the result."""
    one = data.draw(variants(scheme, host, path))
    other = data.draw(variants(scheme, host, path))
    assert normalize_htu(one) == normalize_htu(other)


@given(
    st.sampled_from(["http", "https"]),
    HOSTS,
    st.lists(SEGMENT, max_size=4).map(lambda p: "/" + "/".join(p)),
)
def test_normalization_is_idempotent(scheme: str, host: str, path: str) -> None:
    try:
        once = normalize_htu(f"{scheme}://{host}{path}")
    except HtuError:
        return  # a stray "%" not followed by two hex digits
    assert normalize_htu(once) == once


@given(st.text(alphabet=string.ascii_letters + string.digits + "-._~", min_size=1, max_size=12))
def test_percent_encoded_unreserved_characters_are_the_characters(segment: str) -> None:
    encoded = "".join(f"%{ord(c):02x}" for c in segment)
    assert normalize_htu(f"https://as.example/{encoded}") == normalize_htu(
        f"https://as.example/{segment}"
    )
