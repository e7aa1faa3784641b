"""`nanoseek serve`: the OpenAI/DeepSeek-compatible API and the web chat, on uvicorn."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from nanoseek.device import add_device_arguments, device_arguments
from nanoseek.errors import NanoseekError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model: OpenAI/DeepSeek-compatible API with reasoning_content, and a web chat",
        description="Endpoints: GET / (web chat), GET /v1/models, POST /v1/chat/completions, POST /v1/completions, "
        "GET /health, GET /metrics (Prometheus).",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (HF format + tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("NANOSEEK_API_KEY"),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $NANOSEEK_API_KEY, else none)",
    )
    p.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: DIR's name)")
    p.add_argument("--max-batch-size", type=int, default=16, help="completions decoded together (default 16)")
    p.add_argument("--max-seq-len", type=int, default=4096, help="context: prompt + completion tokens (default 4096)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="completions that may wait for a batch row; more get 429 (default 256)",
    )
    p.add_argument(
        "--prefix-cache-tokens",
        type=int,
        metavar="N",
        help="prefix cache: the cache of up to N tokens of past requests, reused by prompts that start the same "
        "way (usage.prompt_cache_hit_tokens), in blocks of 16 (default 4 x --max-seq-len; 0: off)",
    )
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    add_device_arguments(p)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)


def _listen(host: str, port: int) -> socket.socket:
    """Bind here, so that a taken port or a bad address is one clear line, not a uvicorn traceback."""
    if not 0 <= port <= 65535:
        raise NanoseekError(f"--port {port}: expected 0..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise NanoseekError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise NanoseekError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from nanoseek.serve.app import create_app
    except ModuleNotFoundError as e:
        raise NanoseekError(f"nanoseek serve needs {e.name}: pip install 'nanoseek[serve]'") from None
    from nanoseek.infer.engine import Engine

    if args.max_queue < 0 or args.max_batch_size < 1:
        raise NanoseekError("--max-queue must be >= 0 and --max-batch-size >= 1")
    if args.api_key is not None and not args.api_key.strip():
        raise NanoseekError("--api-key is empty")
    device, dtype = device_arguments(args)
    sock = _listen(args.host, args.port)
    try:
        engine = Engine.from_pretrained(
            args.model,
            device=device,
            dtype=dtype,
            max_batch_size=args.max_batch_size,
            max_seq_len=args.max_seq_len,
            speculative=args.speculative,
            prefix_cache_tokens=args.prefix_cache_tokens,
        )
        name = args.served_model_name or Path(args.model).resolve().name
        app = create_app(engine, name, api_key=args.api_key, max_queue=args.max_queue)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"nanoseek serve: model '{name}' at http://{shown}:{port}  (web chat /, API /v1, metrics /metrics; "
        f"batch {engine.max_batch_size}, context {engine.max_seq_len}, "
        f"prefix cache {engine.prefix_cache_tokens} tokens, {engine.device.type} "
        f"{str(engine.dtype).removeprefix('torch.')})",
        flush=True,
    )
    if args.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
        print("warning: listening beyond this machine with no --api-key", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn has shut down gracefully, then re-raises Ctrl-C
        pass
    print("nanoseek serve: stopped", flush=True)
    return 0
