"""The receiver's event-driven reactors subclass and copy pynetdicom's private internals
(kaapana_assets/network/pynetdicom_internals.py): they hold only for the pynetdicom they were
copied from. These tests fail, saying what to re-check, when another pynetdicom is installed
or a private name they use is gone."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import socket
import tomllib

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

from kaapana_assets.network import pynetdicom_internals
from kaapana_assets.network.pynetdicom_internals import PYNETDICOM_VERSION, RELIES_ON
from tests.helpers import REPO

RECHECK = (
    "kaapana_assets/network/pynetdicom_internals.py was copied from pynetdicom {copied}: re-read "
    "Association._run_reactor, DULServiceProvider (run_reactor, _process_recv_primitive, kill_dul, stop_dul, its "
    "queues and timers), DIMSEServiceProvider.send_msg and RequestHandler._create_association/handle in the "
    "installed pynetdicom's association.py, dul.py, dimse.py and transport.py against that module and receiver.py "
    "(the module docstring lists what it overrides), then update PYNETDICOM_VERSION and the pin in pyproject.toml "
    "together"
)


def _pinned() -> str:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in dependencies if re.match(r"pynetdicom\b", d)]
    assert len(pins) == 1 and pins[0].startswith("pynetdicom=="), (
        f"pyproject.toml must pin pynetdicom exactly (pynetdicom=={PYNETDICOM_VERSION}), not {pins}: "
        + RECHECK.format(copied=PYNETDICOM_VERSION))
    return pins[0].removeprefix("pynetdicom==")


def test_the_installed_pynetdicom_is_the_one_the_internals_were_copied_from() -> None:
    installed = importlib.metadata.version("pynetdicom")
    assert _pinned() == PYNETDICOM_VERSION, (
        f"pyproject.toml pins pynetdicom {_pinned()}, the module says {PYNETDICOM_VERSION}: "
        + RECHECK.format(copied=PYNETDICOM_VERSION))
    assert installed == PYNETDICOM_VERSION, (
        f"pynetdicom {installed} is installed: " + RECHECK.format(copied=PYNETDICOM_VERSION))
    assert pynetdicom_internals.EVENT_DRIVEN, "the event-driven reactors are off for the pinned pynetdicom"


def test_the_private_names_the_internals_use_exist() -> None:
    """Every name in RELIES_ON, on an instance of its pynetdicom class (instance attributes
    are set in __init__): an acceptor association that never connects, its providers, an
    unconnected socket, the AE."""
    ae = AE()
    assoc = Association(ae, "acceptor")
    raw = socket.socket()
    try:
        instances: dict[str, object] = {
            "association.Association": assoc,
            "dul.DULServiceProvider": assoc.dul,
            "dimse.DIMSEServiceProvider": assoc.dimse,
            "acse.ACSE": assoc.acse,
            "transport.AssociationSocket": AssociationSocket(assoc, client_socket=raw),
            "timer.Timer": assoc.dul.artim_timer,
            "transport.RequestHandler": None,  # a class only: it needs a connection to exist
            "ae.ApplicationEntity": ae,
        }
        assert set(RELIES_ON) == set(instances), "a class in RELIES_ON has no instance here"
        missing = []
        for qualified, names in RELIES_ON.items():
            module, name = qualified.rsplit(".", 1)
            cls = getattr(importlib.import_module(f"pynetdicom.{module}"), name)
            instance = instances[qualified]
            assert instance is None or isinstance(instance, cls), qualified
            missing += [f"pynetdicom.{qualified}.{attribute}" for attribute in names
                        if not hasattr(cls, attribute) and (instance is None or not hasattr(instance, attribute))]
    finally:
        raw.close()
    assert not missing, (f"pynetdicom {importlib.metadata.version('pynetdicom')} lacks {', '.join(missing)}: "
                         + RECHECK.format(copied=PYNETDICOM_VERSION))
