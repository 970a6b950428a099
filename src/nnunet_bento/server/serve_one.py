"""Serve one service of the Bento on its own, to scale the GPU runner and the API apart.

`python -m nnunet_bento.server.serve_one ModelRunner --port 3001` on the GPU machines;
`python -m nnunet_bento.server.serve_one SegmentationService --runner-url http://runner:3001`
on the API machines. Both load the same service definition (``service:SegmentationService``
from the working directory, or a Bento tag) and the same MODEL_SERVE_SPEC.

The runner unpickles what it is sent: whoever reaches its port runs code. It binds to
127.0.0.1 unless ``--host`` says otherwise, and warns when it is bound elsewhere; on a
network, put it behind a policy that only the API reaches (docs/deployment.md).

BentoML 1.4 has no command-line flag to serve a single service, so ``serve_service`` calls
the function that `bentoml serve` itself calls, with its ``service_name`` and
``dependency_map``. It is the only place that imports BentoML's private modules; it holds
for bentoml 1.4.40 (the version pyproject.toml pins), and tests/test_serve_one.py fails when
a BentoML release moves them.
"""

import argparse
import logging

RUNNER = "ModelRunner"
ENTRY = "SegmentationService"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

logger = logging.getLogger("nnunet_bento")


def serve_service(
    bento: str,
    host: str,
    port: int,
    service_name: str = "",
    dependency_map: dict[str, str] | None = None,
) -> None:
    """Serve one service of ``bento`` (BentoML's private serving API, bentoml 1.4.40)."""
    from _bentoml_impl.server.serving import serve_http
    from bentoml._internal.service.loader import load

    load(bento_identifier=bento, working_dir=".").inject_config()
    serve_http(
        bento,
        host=host,
        port=port,
        service_name=service_name,
        dependency_map=dependency_map or {},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_bento.server.serve_one",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("service", choices=[RUNNER, ENTRY])
    parser.add_argument(
        "--bento",
        default=f"service:{ENTRY}",
        help="service import path (from the working directory) or Bento tag",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: loopback only)"
    )
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--runner-url", help=f"URL of the {RUNNER} service (for {ENTRY})")
    args = parser.parse_args(argv)
    if args.service == ENTRY and not args.runner_url:
        parser.error(f"{ENTRY} needs --runner-url, the address of a running {RUNNER}")
    if args.service == RUNNER:
        if args.host not in LOOPBACK:
            logging.basicConfig(level=logging.WARNING)
            logger.warning(
                "%s is bound to %s: it unpickles what it is sent, so anyone who reaches port "
                "%d runs code; allow only the API service to reach it",
                RUNNER,
                args.host,
                args.port,
            )
        serve_service(args.bento, args.host, args.port, service_name=RUNNER)
    else:
        serve_service(args.bento, args.host, args.port, dependency_map={RUNNER: args.runner_url})


if __name__ == "__main__":
    main()
