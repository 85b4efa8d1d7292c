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
import json
import sys

from .console import OneLineErrorParser, fail, quiet_third_party
from .errors import CheckFailed, UserError
from .pipeline import add_generation_arguments
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
    p.set_defaults(prog=PROG)
    return p


def run_parity(args) -> dict:
    """Library entry point: returns the report and writes report.json and grid.png to -o."""
    from .generation import parity
    from .generation.images import load_image
    from .generation.setup import open_pipeline
    from .package_io import check_output_dir, prepare_output_dir, replace_atomically
    requests = parity.requests_for([args.prompt], args.seeds or [args.seed], negative_prompt=args.negative_prompt,
                                   num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                   scheduler=args.scheduler, image=load_image(args.image) if args.image else None,
                                   strength=args.strength)
    for request in requests:  # everything that can fail is checked before the models load
        request.validate()
    check_output_dir(args.output_dir)
    outputs = [args.output_dir / name for name in ("report.json", "grid.png")]
    for path in outputs:
        if path.exists() and not args.overwrite:
            raise UserError(f"{path} exists; pass --overwrite to replace it or choose another -o")
    converted = open_pipeline(args.backend, args.models_dir, args.model_version, args.device, args.compute_unit,
                              img2img=args.image is not None, progress=False)
    reference = open_pipeline("torch", args.models_dir, args.model_version, args.device, progress=False,
                              torch_precision=args.torch_precision)
    report, pairs = parity.run(reference, converted, requests, args.psnr_threshold)
    report.update(backend=args.backend, device=args.device, model_version=args.model_version,
                  models_dir=str(args.models_dir))
    prepare_output_dir(args.output_dir)
    replace_atomically(lambda tmp: tmp.write_text(json.dumps(report, indent=2)), outputs[0], args.overwrite)
    replace_atomically(lambda tmp: parity.grid(pairs).save(tmp, format="PNG"), outputs[1], args.overwrite)
    return report


def print_report(report) -> None:
    for entry in report["results"]:
        print(f"seed {entry['seed']} ({entry['scheduler']}, {entry['steps']} steps):")
        for stage, value in entry["psnr_db"].items():
            mark = "ok" if value >= report["threshold_db"] else "FAIL"
            print(f"  {stage:18s} {value:7.1f} dB  {mark}")


def main(argv=None) -> int:
    args = parser_spec().parse_args(argv)
    quiet_third_party(args.verbose)
    try:
        report = run_parity(args)
    except (UserError, CheckFailed) as exc:
        fail(PROG, str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail(PROG, "interrupted; no partial output was kept", 130)
    print_report(report)
    if not report["passed"]:
        fail(PROG, f"PSNR under {report['threshold_db']} dB (report: {args.output_dir / 'report.json'})", 1)
    print(f"parity passed; report and grid in {args.output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
