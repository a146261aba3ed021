"""Command-line entry point: ``numpyro-pma demo``, ``benchmark`` and ``performance``."""

import argparse
import sys

from numpyro_pma import demo


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand."""
    parser = argparse.ArgumentParser(
        prog="numpyro-pma",
        description="Brenier-map guides for NumPyro trained by PMA mirror steps.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="fit eight schools with PMA and NUTS and compare with reference"
    )
    demo.add_arguments(demo_parser)
    commands.add_parser(
        "benchmark",
        help="run the reference-posterior benchmark (see `benchmark --help`)",
        add_help=False,
    )
    commands.add_parser(
        "performance",
        help="time a PMA step against an ELBO step (see `performance --help`)",
        add_help=False,
    )
    argv = sys.argv[1:] if argv is None else argv
    # The two benchmarks parse their own arguments; import them only when used.
    if argv and argv[0] == "benchmark":
        from numpyro_pma.benchmark import benchmark_main

        return benchmark_main(argv[1:]) or 0
    if argv and argv[0] == "performance":
        from numpyro_pma.performance import performance_main

        return performance_main(argv[1:]) or 0
    args = parser.parse_args(argv)
    if args.num_steps < 1:
        parser.error(f"--num-steps must be a positive integer, got {args.num_steps}")
    demo.run_demo(
        num_steps=args.num_steps,
        seed=args.seed,
        output_dir=args.output_dir,
        progress_bar=not args.no_progress_bar,
    )
    return 0
