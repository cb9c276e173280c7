"""Small findings of the second security review (L-numbers refer to it), each with the case that broke."""

from __future__ import annotations

from xml.etree import ElementTree

import pytest

pytest.importorskip("libvirt")


def test_the_libvirt_network_name_is_escaped_in_the_domain_xml() -> None:
    """L9: a network name with a quote or an ampersand stays one attribute value, no element is injected."""
    from pytest_vmfixtures.backends.libvirt.network import interface_xml

    name = "net' /><filterref filter='clean-traffic'/><x a='&"
    element = ElementTree.fromstring(interface_xml(name, "52:54:00:12:34:56"))
    source = element.find("source")
    assert source is not None and source.get("network") == name
    assert element.find("filterref") is None and [child.tag for child in element] == ["source", "mac", "model"]
