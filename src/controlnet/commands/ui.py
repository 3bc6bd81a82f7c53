"""``controlnet ui``: serve the web UI (gradio; the optional extra ``controlnet-kit[ui]``)."""

from __future__ import annotations

import argparse

from controlnet.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ui`` command."""
    from controlnet.ui import DEFAULT_HOST, DEFAULT_PORT, INSTALL_HINT  # controlnet.ui imports gradio lazily

    parser = subparsers.add_parser(
        "ui",
        help=f"serve the web UI (needs: {INSTALL_HINT})",
        description="Serve a web page with the original demos' controls and up to three ControlNet units. "
        "Binds to 127.0.0.1 (this machine only) unless --host says otherwise.",
    )
    parser.add_argument("--base", default=None, metavar="PATH",
                        help="a diffusers Stable Diffusion folder (default: the embedded tiny model)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (0.0.0.0 serves the network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port")
    parser.add_argument("--outputs", default=None, metavar="DIR",
                        help="folder for the generated PNGs (default: a new temporary folder)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no startup messages from the server")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from controlnet.ui import UiConfig, launch

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    launch(UiConfig(base=args.base, host=args.host, port=args.port, output_dir=args.outputs), block=True,
           quiet=args.quiet)
    return 0
