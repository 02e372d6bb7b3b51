"""``ultragen serve``: load the model once, then serve the Gradio page (``pip install -e ".[web]"``)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"
LOOPBACK_NAMES = {"localhost"}


def add_serve_parser(commands) -> None:
    commands.add_parser("serve", help="a web page (Gradio) to generate images, with live progress per stage",
                        description="ultragen serve [--model ID] [--host 127.0.0.1] [--port 7860] [--lora FILE] "
                                    "[--auth USER:PASS]; needs pip install -e \".[web]\"",
                        add_arguments=_serve_arguments)


def _serve_arguments(serve: argparse.ArgumentParser) -> None:
    from ultragen.cli import whole_number

    serve.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"Hugging Face id, local diffusers folder, or tiny-random (default {DEFAULT_MODEL})")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    serve.add_argument("--port", type=whole_number, default=7860, help="port (default 7860)")
    serve.add_argument("--lora", help="guide LoRA .safetensors selected at start; its folder is listed in the picker")
    serve.add_argument("--lora-dir", help="folder of guide LoRAs for the picker (default: the folder of --lora)")
    serve.add_argument("--lora-force", action="store_true", help="use a LoRA even if its settings differ")
    serve.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password (HTTP basic auth)")
    serve.add_argument("--out", default="ultragen-images", help="folder for the images (default ./ultragen-images)")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    serve.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float16, ...")
    serve.set_defaults(run=run_serve)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"--auth {text!r} must be USER:PASS with both parts non-empty, e.g. --auth alice:s3cret")
    return user, password


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int, auth: tuple[str, str] | None) -> str | None:
    """What to tell the user when the page can be reached from other machines."""
    if is_loopback(host):
        return None
    if auth is None:
        return (f"warning: --host {host} makes the page reachable from other machines and it has NO authentication: "
                f"anyone who can reach port {port} can run jobs on this GPU and read the images. Add --auth USER:PASS, "
                f"or keep the default --host 127.0.0.1 and use an SSH tunnel (ssh -L {port}:127.0.0.1:{port} HOST)")
    return (f"note: --host {host} with --auth: the password travels unencrypted over plain HTTP; use it on a trusted "
            f"network or behind an HTTPS proxy")


def check_args(args: argparse.Namespace) -> tuple[tuple[str, str] | None, Path | None, str]:
    """(auth, LoRA folder, default LoRA name) from the arguments; ValueError with the fix for bad ones."""
    auth = parse_auth(args.auth)
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} must be in [1, 65535], e.g. --port 7860")
    lora_dir = Path(args.lora_dir) if args.lora_dir else None
    default_lora = "none"
    if args.lora is not None:
        lora = Path(args.lora)
        if not lora.is_file():
            raise ValueError(f"LoRA file {args.lora!r} does not exist; pass the path of a .safetensors guide LoRA")
        lora_dir = lora_dir or lora.parent
        if lora.resolve().parent != lora_dir.resolve():
            raise ValueError(f"--lora {args.lora!r} is not in --lora-dir {str(lora_dir)!r}; put it there or leave "
                             f"--lora-dir out")
        default_lora = lora.name
    if lora_dir is not None and not lora_dir.is_dir():
        raise ValueError(f"--lora-dir {str(lora_dir)!r} is not a folder; pass the folder that holds the LoRA files")
    return auth, lora_dir, default_lora


def run_serve(args: argparse.Namespace) -> int:
    auth, lora_dir, default_lora = check_args(args)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no version check, no telemetry
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError('ultragen serve needs Gradio; install it with: pip install -e ".[web]"') from None
    from ultragen.pipeline.job import DTYPES, resolve_device
    from ultragen.pipeline.outputs import check_writable
    from ultragen.pipeline.two_stage import UltraGenPipeline
    from ultragen.web.page import PageContext, build_page, launch
    from ultragen.web.runner import JobRunner

    out_dir = Path(args.out).expanduser()
    check_writable(out_dir)
    device, dtype = resolve_device(args.device, args.dtype)
    print(f"loading {args.model} ({device}, {dtype})", file=sys.stderr)
    pipe = UltraGenPipeline.from_pretrained(args.model, dtype=DTYPES[dtype]).to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = PageContext(JobRunner(pipe, lora_allow_mismatch=args.lora_force), args.model, out_dir.resolve(), lora_dir,
                      default_lora, device, dtype)
    if (warning := exposure_warning(args.host, args.port, auth)) is not None:
        print(warning, file=sys.stderr)
    launch(build_page(ctx), ctx, args.host, args.port, auth)
    return 0
