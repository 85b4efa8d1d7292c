"""Run coremltools' own MIL op tests with their Core ML prediction step routed to our MIL runtime.

    python scripts/run_coremltools_op_tests.py [TEST_PATH ...] [--markdown OUT.md] [--every K] [-- PYTEST_ARGS]

TEST_PATH defaults to the op tests of the installed coremltools
(coremltools/converters/mil/mil/ops/tests). Only the mlprogram backend is collected
(PYMIL_TEST_TARGETS=mlprogram). Each test's `MLModel.predict` saves the converted package and runs it
with `python_coreml_sd.runtime.mil.MILModel`; coremltools then compares the outputs with its own
expected values and tolerances, exactly as on macOS. A program the runtime refuses
(UnsupportedOpError) is counted as "unsupported", not as a failure. Results are tallied per test
class (one op family each, e.g. TestScatter) and printed; --markdown writes the table too.
Nothing of coremltools is copied: the tests run from its installed package.
"""
import argparse
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's runtime, not an installed one

UNSUPPORTED = "UNSUPPORTED by the MIL runtime: "


def _route_prediction_to_runtime():
    """Make coremltools' test helpers believe they can predict, and predict with our runtime."""
    import numpy as np
    import pytest
    import coremltools as ct
    from coremltools.converters.mil import testing_utils
    from coremltools.models import utils as ct_utils

    from python_coreml_sd.errors import UserError
    from python_coreml_sd.runtime.mil import MILModel
    from python_coreml_sd.runtime.mil.plan import UnsupportedOpError

    testing_utils._IS_MACOS = True
    ct_utils._is_macos = lambda: True
    ct_utils._macos_version = lambda: (15, 0)

    class LazyState:
        """What make_state hands the test; the runtime's MILState is made by the first predict."""
        mil = None

    def predict(self, data, state=None):
        tmp = tempfile.mkdtemp(prefix="ct_op_test_")
        path = os.path.join(tmp, "model.mlpackage")
        self.save(path)
        try:
            model = MILModel(path)
        except UnsupportedOpError as e:
            pytest.skip(UNSUPPORTED + str(e))
        except UserError as e:  # a refusal with its reason (e.g. flexible input shapes), not a wrong answer
            if "not an ML Program" in str(e):
                pytest.skip("neuralnetwork model: out of the runtime's scope")
            pytest.skip(UNSUPPORTED + str(e))
        # coremltools' helper hands every input over as float32 (Core ML casts): cast to the declared dtype.
        declared = {n: d.dtype for n, d in model.input_description.items()}
        inputs = {k: np.asarray(v).astype(declared.get(k, np.asarray(v).dtype)) for k, v in data.items()}
        if state is not None and state.mil is None:
            state.mil = model.make_state()
        try:
            return model.predict(inputs, state=None if state is None else state.mil)
        except UnsupportedOpError as e:
            pytest.skip(UNSUPPORTED + str(e))
        except UserError as e:  # a run-time failure the program asks for (validate_indices): Core ML's exception
            raise RuntimeError(f"Unable to compute the prediction using ML Program: {e}") from e

    ct.models.MLModel.predict = predict
    ct.models.MLModel.make_state = lambda self: LazyState()


class Tally:
    def __init__(self, every=1):
        self.counts = defaultdict(lambda: defaultdict(int))
        self.every = every

    def pytest_collection_modifyitems(self, config, items):
        """--every K: keep every K-th parametrization of each test function (the first one always),
        so every op family is sampled when the full cross product would take hours."""
        if self.every <= 1:
            return
        seen, kept, dropped = defaultdict(int), [], []
        for item in items:
            key = item.nodeid.split("[")[0]
            (kept if seen[key] % self.every == 0 else dropped).append(item)
            seen[key] += 1
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept

    def pytest_configure(self, config):
        self.rootpath = Path(config.rootpath)
        _route_prediction_to_runtime()

    def pytest_runtest_logreport(self, report):
        if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
            return
        parts = report.nodeid.split("::")
        # The opset folder from the file's own path: node ids are relative to pytest's rootdir,
        # which is the opset folder itself when one file is run.
        family = f"{(self.rootpath / parts[0]).resolve().parent.name}/{parts[1] if len(parts) > 2 else Path(parts[0]).stem}"
        if report.passed:
            kind = "xpassed" if hasattr(report, "wasxfail") else "passed"
        elif report.failed:
            kind = "failed"
        elif hasattr(report, "wasxfail"):
            kind = "xfailed"
        else:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            kind = "unsupported" if UNSUPPORTED in reason else "skipped"
        self.counts[family][kind] += 1

    def table(self):
        kinds = ["passed", "failed", "unsupported", "skipped", "xfailed", "xpassed"]
        rows = ["| op family | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        totals = defaultdict(int)
        for family in sorted(self.counts):
            c = self.counts[family]
            rows.append(f"| {family} | " + " | ".join(str(c[k]) for k in kinds) + " |")
            for k in kinds:
                totals[k] += c[k]
        rows.append("| **total** | " + " | ".join(str(totals[k]) for k in kinds) + " |")
        return "\n".join(rows)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--markdown", help="write the per-family table to this file")
    parser.add_argument("--every", type=int, default=1, metavar="K",
                        help="run every K-th parametrization of each test function (default: all)")
    args = parser.parse_args(argv)

    os.environ.setdefault("PYMIL_TEST_TARGETS", "mlprogram")
    import pytest
    import coremltools

    default = Path(coremltools.__file__).parent / "converters/mil/mil/ops/tests"
    if not args.paths and not default.is_dir():
        print(f"coremltools' op tests are not installed ({default}); nothing to run", file=sys.stderr)
        return 2
    tally = Tally(args.every)
    rc = pytest.main([*(args.paths or [str(default)]), "-q", "-p", "no:cacheprovider", *extra], plugins=[tally])
    table = tally.table()
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0 if rc in (0, 1) else rc


if __name__ == "__main__":
    sys.exit(main())
