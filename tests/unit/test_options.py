"""options: the vm marker, the image matrix and option values, parsed without a pytest session."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_vmfixtures.options import (
    DEFAULT_CPUS,
    DEFAULT_IMAGE,
    DEFAULT_MEMORY_MB,
    MARKER_KEYS,
    MarkerSpec,
    OptionError,
    image_matrix,
    parse_accel,
    parse_backend,
    parse_count,
    parse_marker,
    parse_positive,
    parse_standby,
)
from pytest_vmfixtures.slot import STANDBY_AUTO

WHERE = "tests/test_x.py::test_y"


def mark(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def parse(*marks: tuple[tuple[Any, ...], dict[str, Any]]) -> MarkerSpec:
    return parse_marker(WHERE, marks)


# -- parse_marker -------------------------------------------------------------


def test_no_marker_gives_the_defaults() -> None:
    spec = parse()
    assert spec == MarkerSpec()
    assert (spec.image, spec.images, spec.memory_mb, spec.cpus, spec.network) == (
        None,
        None,
        DEFAULT_MEMORY_MB,
        DEFAULT_CPUS,
        "restricted",
    )
    assert spec.explicit == frozenset()


def test_positional_image_pins_the_test() -> None:
    spec = parse(mark("alpine-3"))
    assert spec.image == "alpine-3"
    assert spec.explicit == frozenset({"image"})


def test_closest_marker_wins_and_others_fill_in() -> None:
    # iter_markers yields the test's own marker first, then its class's, then its module's.
    test_mark = mark(memory_mb=1024)
    class_mark = mark("debian-13", memory_mb=2048, cpus=2)
    module_mark = mark(image="debian-12", cpus=4, network="nat")
    spec = parse(test_mark, class_mark, module_mark)
    assert spec.image == "debian-13"
    assert spec.memory_mb == 1024
    assert spec.cpus == 2
    assert spec.network == "nat"
    assert spec.explicit == frozenset({"image", "memory_mb", "cpus", "network"})


def test_positional_and_keyword_image_in_one_marker_is_an_error() -> None:
    with pytest.raises(OptionError, match="both positionally and as image="):
        parse(mark("a", image="b"))


def test_more_than_one_positional_argument_is_an_error() -> None:
    with pytest.raises(OptionError, match="at most one positional"):
        parse(mark("a", "b"))


def test_unknown_key_names_the_key_and_the_allowed_ones() -> None:
    with pytest.raises(OptionError) as info:
        parse(mark(memory=1024))
    message = str(info.value)
    assert message.startswith(WHERE + ":")
    assert "'memory'" in message
    assert "allowed: " + ", ".join(MARKER_KEYS) in message
    assert "\n" not in message


def test_unknown_key_in_a_farther_marker_is_still_reported() -> None:
    with pytest.raises(OptionError, match="'ram'"):
        parse(mark(memory_mb=1024), mark(ram=1))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"memory_mb": "512"}, "memory_mb must be an integer, got '512'"),
        ({"memory_mb": 512.0}, "memory_mb must be an integer"),
        ({"memory_mb": True}, "memory_mb must be an integer, got True"),
        ({"cpus": None}, "cpus must be an integer"),
        ({"cpus": "2"}, "cpus must be an integer"),
        ({"memory_mb": 63}, r"memory_mb=63 is out of range; use 64\.\."),
        ({"memory_mb": 0}, "memory_mb=0 is out of range"),
        ({"memory_mb": (1 << 20) + 1}, "out of range"),
        ({"cpus": 0}, r"cpus=0 is out of range; use 1\.\.256"),
        ({"cpus": 257}, "cpus=257 is out of range"),
        ({"image": ""}, "image must be an image name"),
        ({"image": 12}, "image must be an image name"),
        ({"image": ["a"]}, "image must be an image name"),
        ({"images": "debian-12"}, "images must be a list of image names"),
        ({"images": ["a", ""]}, "images must be a list of image names"),
        ({"images": ["a", 1]}, "images must be a list of image names"),
        ({"network": "bridge"}, "network='bridge' is not one of restricted, nat"),
        ({"network": None}, "network=None is not one of"),
    ],
)
def test_bad_values_are_one_line_option_errors(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(OptionError, match=pattern) as info:
        parse(mark(**kwargs))
    assert "\n" not in str(info.value)


def test_non_iterable_images_is_an_option_error_not_a_crash() -> None:
    # A user typo such as images=5 must give the one-line message, not a TypeError traceback.
    with pytest.raises(OptionError, match="images must be a list of image names"):
        parse(mark(images=5))


@pytest.mark.parametrize(("memory_mb", "cpus"), [(64, 1), (1 << 20, 256), (4096, 8)])
def test_range_limits_are_inclusive(memory_mb: int, cpus: int) -> None:
    spec = parse(mark(memory_mb=memory_mb, cpus=cpus))
    assert (spec.memory_mb, spec.cpus) == (memory_mb, cpus)


def test_images_restricts_the_matrix_and_becomes_a_tuple() -> None:
    spec = parse(mark(images=["debian-12", "debian-13"]))
    assert spec.images == ("debian-12", "debian-13")
    assert spec.image is None


def test_image_and_images_together_conflict() -> None:
    with pytest.raises(OptionError, match="either image= .* or images= .*, not both"):
        parse(mark(image="a", images=["a", "b"]))


def test_image_and_images_from_different_levels_also_conflict() -> None:
    with pytest.raises(OptionError, match="not both"):
        parse(mark(images=["a"]), mark("b"))


@pytest.mark.parametrize("network", ["restricted", "nat"])
def test_network_values(network: str) -> None:
    assert parse(mark(network=network)).network == network


# -- image_matrix ---------------------------------------------------------------


def test_matrix_defaults_to_debian_12() -> None:
    assert image_matrix([], []) == [DEFAULT_IMAGE] == ["debian-12"]


def test_matrix_cli_wins_over_ini() -> None:
    assert image_matrix(["b"], ["a", "c"]) == ["b"]


def test_matrix_falls_back_to_ini() -> None:
    assert image_matrix([], ["a", "c"]) == ["a", "c"]


def test_matrix_splits_commas_strips_and_dedupes_keeping_order() -> None:
    assert image_matrix(["b,a", " c , b", "a"], []) == ["b", "a", "c"]


def test_matrix_ignores_empty_entries() -> None:
    assert image_matrix(["", "a,,b,"], ["x"]) == ["a", "b"]
    assert image_matrix([""], ["x"]) == ["x"]


# -- single option values -------------------------------------------------------


@pytest.mark.parametrize("value", ["auto", "kvm", "tcg"])
def test_parse_accel_accepts_the_three_values(value: str) -> None:
    assert parse_accel(value) == value


@pytest.mark.parametrize("value", ["bogus", "", "KVM"])
def test_parse_accel_rejects_others_naming_the_option(value: str) -> None:
    with pytest.raises(OptionError, match=f"--vm-accel {value!r} is not one of auto, kvm, tcg"):
        parse_accel(value)


def test_parse_backend() -> None:
    assert parse_backend("qemu") == "qemu"
    with pytest.raises(OptionError, match="--vm-backend 'hyperv' is not one of qemu, libvirt"):
        parse_backend("hyperv")


@pytest.mark.parametrize(("value", "expected"), [("600", 600.0), ("0.5", 0.5), (30, 30.0), ("1e3", 1000.0)])
def test_parse_positive_accepts_numbers(value: Any, expected: float) -> None:
    assert parse_positive("--vm-boot-timeout", value) == expected


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("ten", "--vm-boot-timeout must be a number of seconds, got 'ten'"),
        (None, "must be a number of seconds, got None"),
        ("", "must be a number of seconds"),
        ("0", "--vm-boot-timeout must be positive, got '0'"),
        ("-5", "must be positive"),
        (0, "must be positive, got 0"),
    ],
)
def test_parse_positive_rejects(value: Any, pattern: str) -> None:
    with pytest.raises(OptionError, match=pattern):
        parse_positive("--vm-boot-timeout", value)


def test_parse_positive_rejects_nan() -> None:
    # NaN passes "<= 0" unnoticed; as a timeout it makes every deadline never expire.
    with pytest.raises(OptionError, match="--vm-boot-timeout"):
        parse_positive("--vm-boot-timeout", "nan")


@pytest.mark.parametrize(("value", "expected"), [("900", 900.0), ("2", 2.0), ("0.25", 0.25), (" 60 ", 60.0)])
def test_command_timeout_accepts_seconds(value: Any, expected: float) -> None:
    assert parse_positive("--vm-command-timeout", value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        # Nothing turns the default deadline off: 0 or "none" would let a hung command hang the run again.
        ("0", "--vm-command-timeout must be positive, got '0'"),
        ("none", "--vm-command-timeout must be a number of seconds, got 'none'"),
        ("inf", "--vm-command-timeout must be positive, got 'inf'"),
        ("nan", "--vm-command-timeout must be positive, got 'nan'"),
        ("-1", "--vm-command-timeout must be positive, got '-1'"),
        ("15m", "--vm-command-timeout must be a number of seconds, got '15m'"),
        ("", "--vm-command-timeout must be a number of seconds, got ''"),
    ],
)
def test_command_timeout_rejects_with_one_line(value: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_positive("--vm-command-timeout", value)
    assert str(info.value) == message


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("3", 3), (2, 2), (" 4 ", 4)])
def test_parse_count_accepts_whole_numbers(value: Any, expected: int) -> None:
    assert parse_count("--vm-standby", value) == expected


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("1.5", "--vm-standby must be a whole number, got '1.5'"),
        ("two", "must be a whole number"),
        (None, "must be a whole number, got None"),
        ("-1", "--vm-standby must be 0 or more, got '-1'"),
    ],
)
def test_parse_count_rejects(value: Any, pattern: str) -> None:
    with pytest.raises(OptionError, match=pattern):
        parse_count("--vm-standby", value)


def test_standby_is_auto_or_a_count() -> None:
    assert parse_standby("auto") == STANDBY_AUTO and parse_standby("2") == 2 and parse_standby("0") == 0
    with pytest.raises(OptionError, match=r"^--vm-standby must be a whole number or auto, got 'some'$"):
        parse_standby("some")


def test_option_error_is_a_value_error() -> None:
    assert issubclass(OptionError, ValueError)


# -- needs= ---------------------------------------------------------------------


def test_needs_names_capabilities_and_the_closest_marker_wins() -> None:
    assert parse().needs == frozenset()
    assert parse(mark(needs=["qmp", "agent"])).needs == frozenset({"qmp", "agent"})
    assert parse(mark(needs=("console",)), mark(needs=["qmp"])).needs == frozenset({"console"})


@pytest.mark.parametrize(("value", "message"), [
    (["qmp", "monitor"], "needs='monitor' is not a capability; known: saved_state, qmp, agent, console, port_forward"),
    ("qmp", 'needs must be a list of capabilities, like needs=\\["qmp"\\]'),
    (3, "needs must be a list of capabilities"),
])
def test_needs_with_an_unknown_capability_says_which_exist(value: Any, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse(mark(needs=value))
