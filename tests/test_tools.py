"""The Debian tools the tests name are the ones `make tools` installs."""

import pytest

from tests.helpers import REPO
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


# slow: runs pytest itself in two xdist workers (≈9 s); it guards test-all's grouping
@pytest.mark.slow
def test_tests_sharing_a_costly_session_fixture_run_in_one_worker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`make test-all` runs two pytest-xdist workers with --dist loadgroup; conftest's hook puts
    every test that uses the demo, the trained model or the federation in one group. If an
    upgrade of pytest or xdist breaks the grouping, each worker would build them again."""
    import subprocess
    import sys

    (tmp_path / "conftest.py").write_text(
        "import os\nimport pytest\nfrom tests.conftest import pytest_collection_modifyitems  # noqa: F401\n\n"
        "@pytest.fixture(scope='session')\ndef trained_site():\n    return os.environ['PYTEST_XDIST_WORKER']\n")
    (tmp_path / "test_grouped.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('i', range(6))\ndef test_uses(trained_site, i):\n"
        "    print('WORKER', trained_site)\n\n@pytest.mark.parametrize('i', range(6))\ndef test_plain(i):\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p",
                          "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env={**__import__("os").environ,
                                                                                     "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    grouped = [line.split()[0] for line in out.stdout.splitlines() if "PASSED" in line and "test_uses" in line]
    assert len(grouped) == 6 and len(set(grouped)) == 1, out.stdout[-2000:]
    assert all("@trained_site" in line for line in out.stdout.splitlines() if "PASSED" in line and "test_uses" in line)
