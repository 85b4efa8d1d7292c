"""Parity report: generate with the reference (original PyTorch modules) and with converted models
on the same prompts and seeds; print PSNR per stage, write a JSON report and a comparison grid, and
exit 1 when any PSNR is under the threshold.

    python -m python_coreml_sd.parity --prompt "a red fox" -i MODELS -o REPORT_DIR
"""

if __name__ == "__main__":  # before the imports below, which take seconds: Ctrl-C then ends in one line
    from python_coreml_sd.console import handle_interrupts, quiet_start
    handle_interrupts("parity")
    quiet_start()

import argparse
import sys

from .console import OneLineErrorParser, quiet_third_party, run_cli
from .errors import CheckFailed
from .generation.jobs import ParityJob, run_parity
from .pipeline import add_generation_arguments, models_from_args, requests_from_args
from .runtime import RUNTIME_BACKENDS

PROG = "parity"


def parser_spec() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_arguments(p)
    p.add_argument("--backend", choices=RUNTIME_BACKENDS, default="mil",
                   help="backend of the converted models under test (default: mil)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to compare (default: --seed)")
    p.add_argument("--psnr-threshold", type=float, default=30.0,
                   help="PSNR floor in dB for every stage and the final image (default: 30)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report.json and grid.png")
    return p


def job_from_args(args) -> ParityJob:
    requests = requests_from_args(args, args.seeds or [args.seed])
    return ParityJob(models_from_args(args), requests, args.output_dir, args.psnr_threshold, args.torch_precision,
                     args.overwrite)


def print_report(report) -> None:
    for entry in report["results"]:
        print(f"seed {entry['seed']} ({entry['scheduler']}, {entry['steps']} steps):")
        for stage, value in entry["psnr_db"].items():
            mark = "ok" if value >= report["threshold_db"] else "FAIL"
            print(f"  {stage:30s} {value:7.1f} dB  {mark}")


def main(argv=None) -> int:
    args = parser_spec().parse_args(argv)
    quiet_third_party(args.verbose)
    return run_cli(PROG, lambda: check(args, run_parity(job_from_args(args))))


def check(args, report) -> int:
    print_report(report)
    if not report["passed"]:
        raise CheckFailed(f"PSNR under {report['threshold_db']} dB (report: {args.output_dir / 'report.json'})")
    print(f"parity passed; report and grid in {args.output_dir}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
