"""``controlnet ui``: serve the web UI (gradio; the optional extra ``controlnet-kit[ui]``)."""

from __future__ import annotations

import argparse

from controlnet.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ui`` command."""
    from controlnet.ui import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TIMEOUT, INSTALL_HINT  # gradio is imported lazily

    parser = subparsers.add_parser(
        "ui",
        help=f"serve the web UI (needs: {INSTALL_HINT})",
        description="Serve a web page with the original demos' controls and up to three ControlNet units. "
        "Binds to 127.0.0.1 (this machine only) unless --host says otherwise.",
    )
    parser.add_argument("--base", default=None, metavar="PATH",
                        help="a diffusers Stable Diffusion folder (default: the embedded tiny model)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to bind (0.0.0.0 serves the network: a warning is printed; consider --auth)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="ask for this login on the page")
    parser.add_argument("--outputs", default=None, metavar="DIR",
                        help="the PNGs go to a new folder made inside DIR, the only one served "
                        "(default: a new temporary folder)")
    parser.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                        help="a folder whose models the page's model-path field may name (repeatable; bundled "
                        "names and the Hugging Face cache are always allowed)")
    parser.add_argument("--allow-any-path", action="store_true",
                        help="let the model-path field name any file on the server (trusted users only)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="stop a generation that runs longer")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="largest output, in pixels per image (default: the device's memory / 4096 bytes per "
                        "pixel)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no startup messages from the server")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from controlnet.ui import UiConfig, launch

    auth = None
    if args.auth is not None:
        user, colon, password = args.auth.partition(":")
        if not (user and colon and password):
            raise UserError("--auth must be USER:PASSWORD, both non-empty")
        auth = (user, password)
    config = UiConfig(base=args.base, host=args.host, port=args.port, output_dir=args.outputs,
                      models_dirs=tuple(args.models_dir), allow_any_path=args.allow_any_path, auth=auth,
                      timeout=args.timeout, max_pixels=args.max_pixels)
    config.check()  # before gradio is imported or anything is loaded
    launch(config, block=True, quiet=args.quiet)
    return 0
