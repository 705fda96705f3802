"""`kaapana dicomweb`: the DICOMweb service (QIDO-RS, WADO-RS, STOW-RS when enabled, and the
OHIF viewer when its build is given) over a home's archive and index."""

from __future__ import annotations

import argparse
from pathlib import Path

from kaapana_assets.cli.common import SubParsers, console, home_of


def cmd_dicomweb(args: argparse.Namespace) -> int:
    import uvicorn

    from kaapana_assets.access.audit import AuditLog
    from kaapana_assets.dicomweb.app import create_app
    from kaapana_assets.dicomweb.config import DICOMWEB_ROOT, DicomwebConfig
    from kaapana_assets.environment import Environment
    from kaapana_assets.lake import Lake

    home = home_of(args).ensure()
    viewer = Path(args.viewer) if args.viewer else None
    if viewer is not None and not (viewer / "index.html").is_file():
        console.print(f"[red]--viewer {viewer}: no index.html there (the OHIF build's dist/ folder)")
        return 2
    # The lake where the code location writes it: KAAPANA_LAKE_URI (on k8s an object store, with
    # its options) when set, else the home's own (as build_resources does).
    environment = Environment.read(home=home.root)
    lake = Lake.of(environment)
    identity_secret = Path(args.identity_secret_file).read_text().strip().encode() if args.identity_secret_file else None
    # Behind the gateway: every request carries its signed identity, and each access is audited.
    audit = AuditLog(lake) if identity_secret else None
    config = DicomwebConfig(lake, home.archive, home.incoming, stow=args.stow, viewer_dir=viewer,
                            identity_secret=identity_secret, audit=audit)
    base = f"http://{args.host}:{args.port}"
    console.print(f"DICOMweb on {base}{DICOMWEB_ROOT} ({'STOW-RS enabled' if args.stow else 'read-only'}) over {home.root}"
                  + (f"; viewer on {base}/" if viewer else "") + " (Ctrl-C stops)")
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
    return 0


def add_parsers(sub: SubParsers) -> None:
    p = sub.add_parser(
        "dicomweb", help="serve the archive over DICOMweb (QIDO-RS, WADO-RS; STOW-RS with --stow)",
        description="Serve a home's archive and index over DICOMweb (PS3.18) under /dicom-web: QIDO-RS "
                    "searches answered from the index, WADO-RS retrieves from the archive, and STOW-RS "
                    "into the spool when --stow is given. Bound to loopback unless --host says otherwise.",
    )
    p.add_argument("--home", default=None, help="default: $KAAPANA_HOME")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--stow", action="store_true", help="accept STOW-RS (POST /studies) into the spool; read-only otherwise")
    p.add_argument("--viewer", default=None, metavar="DIR", help="the OHIF viewer's built dist/ folder, served at /")
    p.add_argument("--identity-secret-file", default=None, metavar="FILE",
                   help="behind `kaapana gateway`: the secret of its signed identity header; every request must "
                        "then carry one and sees only its projects' series (docs/access.md)")
    p.set_defaults(func=cmd_dicomweb)
