"""settings.py's tuple settings, which the experiments' lists use: declared
once, parsed from "1,2,4", every item checked, at least one item."""

import argparse
import dataclasses

import pytest

from jaxbatch.errors import JaxbatchError
from jaxbatch.settings import check, parse, setting


@dataclasses.dataclass
class Config:
    sizes: tuple = setting((1, 2, 4), "batch sizes", at_least=1, at_most=64, kind="batch size")
    scales: tuple = setting((0.5,), "input scales", above=0, below=1)
    names: tuple = setting(("a",), "names", choices=("a", "b"), kind="name")


def meta(name):
    return next(f.metadata for f in dataclasses.fields(Config) if f.name == name)


def test_a_tuple_default_declares_a_tuple_of_its_items_type():
    assert meta("sizes")["type"] is tuple and meta("sizes")["item"] is int
    assert meta("scales")["item"] is float and meta("names")["item"] is str
    with pytest.raises(TypeError, match="item="):
        setting((), "an empty default says nothing of its items")


def test_parse_splits_on_commas_and_checks_every_item():
    assert parse("1, 2,,64", meta("sizes")) == (1, 2, 64)
    assert parse("0.25,0.75", meta("scales")) == (0.25, 0.75)
    assert parse("b,a", meta("names")) == ("b", "a")
    for name, text, message in [("sizes", "1,x", "expected comma-separated int values, got '1,x'"),
                                ("sizes", "1,65", "must be 64 or less, got 65"),
                                ("sizes", " , ", "must list at least one batch size"),
                                ("scales", "0.5,1", "must be less than 1, got 1"),
                                ("scales", "inf", "expected a finite number, got inf"),
                                ("names", "a,c", "unknown name 'c'; choose one of: a, b")]:
        with pytest.raises(argparse.ArgumentTypeError, match=f"^{message}$".replace("(", r"\(")):
            parse(text, meta(name))


def test_check_holds_the_library_to_the_same_rules():
    check(Config(sizes=[2, 8]))  # a list is a sequence of items too
    for settings, message in [(dict(sizes=(1, 0)), "sizes must be 1 or more, got 0"),
                              (dict(sizes=()), "sizes must list at least one batch size"),
                              (dict(sizes=(1, True)), "sizes expected a whole number, got True"),
                              (dict(names="a"), "names must be a tuple, got 'a'"),
                              (dict(names=()), "names must list at least one name; choose from: a, b"),
                              (dict(names=("c",)), "unknown name 'c'; choose one of: a, b")]:
        with pytest.raises(JaxbatchError) as err:
            check(Config(**settings))
        assert str(err.value) == message
        assert err.value.setting == next(iter(settings))
