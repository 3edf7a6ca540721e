"""Importing de_plugin_inc never fails; using it without a usable INC names what is installed and the
extra to install. Runs in both CI environments (INC 3.7 in the main one, INC 3.8+ in .venv-inc)."""
import pytest

import de_plugin_inc
from de_plugin_inc import route_for


@pytest.mark.parametrize("version, route", [("3.7.1", "legacy"), ("3.7", "legacy"), ("3.8", "inc3"),
                                            ("3.10", "inc3"), ("3.8.1", "inc3"), ("3.10.1rc1", "inc3")])
def test_each_release_takes_its_route(version, route):
    assert route_for(version) == (route, "")


def test_old_or_missing_inc_says_what_to_install():
    route, msg = route_for("3.5")
    assert route is None and "neural-compressor 3.5 has neither route" in msg and "de-plugin[inc]" in msg
    route, msg = route_for(None)
    assert route is None and "de-plugin[inc]" in msg and "de-plugin[inc-legacy]" in msg


def test_the_other_routes_names_say_which_inc_they_need():
    assert de_plugin_inc.INC_AVAILABLE, de_plugin_inc.INC_ERROR
    if de_plugin_inc.ROUTE == "legacy":
        with pytest.raises(ImportError, match=rf"INC 3.8 or newer.*de-plugin\[inc\].*{de_plugin_inc.INC_VERSION}"):
            de_plugin_inc.prune_and_quantize
    else:
        with pytest.raises(ImportError, match=rf"INC 3.7's pruning API.*inc-legacy.*{de_plugin_inc.INC_VERSION}"):
            de_plugin_inc.search_config
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        de_plugin_inc.nope
