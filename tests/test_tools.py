"""The Debian tools the tests name are the ones `make tools` installs."""

from tests.tools import TOOLS, listed_packages, missing_message


def test_every_tool_a_test_names_is_installed_by_make_tools() -> None:
    assert set(TOOLS.values()) <= listed_packages()


def test_a_missing_tool_is_named_with_its_package_and_the_install_command() -> None:
    TOOLS["no-such-tool-here"] = "dcmtk"
    try:
        message = missing_message("no-such-tool-here")
    finally:
        del TOOLS["no-such-tool-here"]
    assert message is not None and "no-such-tool-here" in message and "make tools" in message
    assert "apt-get install -y --no-install-recommends dcmtk" in message and "\n" not in message
