"""Serve one service of the Bento on its own, to scale the GPU runner and the API apart.

`python -m nnunet_bento.serve_one ModelRunner --port 3001` on the GPU machines;
`python -m nnunet_bento.serve_one SegmentationService --runner-url http://runner:3001` on the
API machines. Both load the same service definition (``service:SegmentationService`` from the
working directory, or a Bento tag) and the same MODEL_SERVE_SPEC. The runner speaks pickle:
its port must stay on the internal network.

BentoML 1.4 has no command-line flag to serve a single service, so this calls the function
that `bentoml serve` itself calls, with its ``service_name`` and ``dependency_map``.
"""

import argparse

RUNNER = "ModelRunner"
ENTRY = "SegmentationService"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_bento.serve_one",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("service", choices=[RUNNER, ENTRY])
    parser.add_argument(
        "--bento",
        default=f"service:{ENTRY}",
        help="service import path (from the working directory) or Bento tag",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--runner-url", help=f"URL of the {RUNNER} service (for {ENTRY})")
    args = parser.parse_args(argv)
    if args.service == ENTRY and not args.runner_url:
        parser.error(f"{ENTRY} needs --runner-url, the address of a running {RUNNER}")
    from _bentoml_impl.server.serving import serve_http
    from bentoml._internal.service.loader import load

    load(bento_identifier=args.bento, working_dir=".").inject_config()
    if args.service == RUNNER:
        serve_http(args.bento, host=args.host, port=args.port, service_name=RUNNER)
    else:
        serve_http(
            args.bento, host=args.host, port=args.port, dependency_map={RUNNER: args.runner_url}
        )


if __name__ == "__main__":
    main()
