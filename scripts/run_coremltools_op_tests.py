"""Run coremltools' own MIL op tests with their Core ML prediction step routed to our MIL runtime.

    python scripts/run_coremltools_op_tests.py [TEST_PATH ...] [--markdown OUT.md] [--every K]
        [--shard I/N] [--json OUT.json] [-- PYTEST_ARGS]
    python scripts/run_coremltools_op_tests.py --merge SHARD.json ... [--markdown OUT.md]

TEST_PATH defaults to the op tests of the installed coremltools
(coremltools/converters/mil/mil/ops/tests). Only the mlprogram backend is collected
(PYMIL_TEST_TARGETS=mlprogram). Each test's `MLModel.predict` saves the converted package and runs it
with `python_coreml_sd.runtime.mil.MILModel`; coremltools then compares the outputs with its own
expected values and tolerances, exactly as on macOS. A program the runtime refuses
(UnsupportedOpError) is counted as "unsupported", not as a failure. Results are tallied per test
class (one op family each, e.g. TestScatter) and printed; --markdown writes the table too.
--shard I/N runs the I-th of N round-robin slices of the collected cases (after --every), --json
saves the counts, and --merge adds the counts of such files into one table.
A program with random ops (registry.STATISTICAL) also predicts twice: shapes and dtypes must
repeat, and values too where every random op is seeded; its passes are counted as "statistical"
as well, since they match Core ML in distribution only.
Nothing of coremltools is copied: the tests run from its installed package.
"""
import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's runtime, not an installed one

UNSUPPORTED = "UNSUPPORTED by the MIL runtime: "
KINDS = ["passed", "statistical", "failed", "unsupported", "skipped", "xfailed", "xpassed"]
_CURRENT = {"statistical": False}  # whether the running test's program had random ops


def _route_prediction_to_runtime():
    """Make coremltools' test helpers believe they can predict, and predict with our runtime."""
    import numpy as np
    import pytest
    import coremltools as ct
    from coremltools.converters.mil import testing_utils
    from coremltools.models import utils as ct_utils

    from python_coreml_sd.errors import UserError
    from python_coreml_sd.runtime.mil import MILModel
    from python_coreml_sd.runtime.mil.ops.registry import STATISTICAL
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
            if STATISTICAL & set(model.op_types) and state is None:
                return _check_statistical(model, path, inputs)
            return model.predict(inputs, state=None if state is None else state.mil)
        except UnsupportedOpError as e:
            pytest.skip(UNSUPPORTED + str(e))
        except UserError as e:  # a run-time failure the program asks for (validate_indices): Core ML's exception
            raise RuntimeError(f"Unable to compute the prediction using ML Program: {e}") from e

    ct.models.MLModel.predict = predict
    ct.models.MLModel.make_state = lambda self: LazyState()


def _check_statistical(model, path, inputs):
    """Two predictions of a program with random ops: same shapes and dtypes; same values when seeded."""
    import numpy as np
    from python_coreml_sd.runtime.mil.model import load_program
    from python_coreml_sd.runtime.mil.ops.registry import STATISTICAL

    _CURRENT["statistical"] = True
    ops = [op for op in load_program(path)[1].operations if op.op_type in STATISTICAL]
    seeded = all(int(op.seed.val) >= 0 for op in ops)
    first, second = model.predict(inputs), model.predict(inputs)
    for name, y in first.items():
        assert (y.shape, y.dtype) == (second[name].shape, second[name].dtype), f"{name}: a second call changed shape or dtype"
        assert not seeded or np.array_equal(y, second[name]), f"{name}: seeded random ops gave other values on a second call"
    return first


def parse_shard(text):
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. 2/4")
    return int(i), int(n)


class Tally:
    def __init__(self, every=1, shard=(1, 1)):
        self.counts = defaultdict(lambda: defaultdict(int))
        self.every, self.shard = every, shard

    def pytest_collection_modifyitems(self, config, items):
        """--every K: keep every K-th parametrization of each test function (the first one always),
        so every op family is sampled when the full cross product would take hours."""
        seen, kept, dropped = defaultdict(int), [], []
        for item in items:
            key = item.nodeid.split("[")[0]
            (kept if seen[key] % self.every == 0 else dropped).append(item)
            seen[key] += 1
        i, n = self.shard  # round-robin after sampling: every shard gets a slice of every family
        dropped += [it for k, it in enumerate(kept) if k % n != i - 1]
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept[i - 1::n]

    def pytest_runtest_setup(self, item):
        _CURRENT["statistical"] = False

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
            if _CURRENT["statistical"] and kind == "passed":
                self.counts[family]["statistical"] += 1
        elif report.failed:
            kind = "failed"
        elif hasattr(report, "wasxfail"):
            kind = "xfailed"
        else:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            kind = "unsupported" if UNSUPPORTED in reason else "skipped"
        self.counts[family][kind] += 1



def table(counts):
    rows = ["| op family | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    totals = defaultdict(int)
    for family in sorted(counts):
        c = counts[family]
        rows.append(f"| {family} | " + " | ".join(str(c.get(k, 0)) for k in KINDS) + " |")
        for k in KINDS:
            totals[k] += c.get(k, 0)
    rows.append("| **total** | " + " | ".join(str(totals[k]) for k in KINDS) + " |")
    return "\n".join(rows)


def merge(files):
    """Counts of several --json files added up; a shard given twice is refused (ValueError)."""
    counts, shards = defaultdict(lambda: defaultdict(int)), {}
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
            key = (tuple(data["paths"]), data["every"], data["shard"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--merge {f}: not a --json file of this runner ({type(e).__name__}: {e})") from None
        if key in shards:
            raise ValueError(f"--merge {f}: shard {key[2]} of the same run is already in {shards[key]}")
        shards[key] = f
        for family, c in data["counts"].items():
            for k, v in c.items():
                counts[family][k] += v
    return counts


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--markdown", help="write the per-family table to this file")
    parser.add_argument("--every", type=int, default=1, metavar="K",
                        help="run every K-th parametrization of each test function (default: all)")
    parser.add_argument("--shard", type=parse_shard, default=(1, 1), metavar="I/N",
                        help="run only the I-th of N round-robin slices of the cases (1 <= I <= N)")
    parser.add_argument("--json", metavar="OUT", help="write the counts (for --merge) to this file")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="add up --json files; runs no tests")
    args = parser.parse_args(argv)
    if args.merge and (args.paths or extra or args.json or args.shard != (1, 1)):
        parser.error("--merge takes only --json files (and --markdown); it runs no tests")
    if args.every < 1:
        parser.error(f"--every {args.every}: must be at least 1")
    if args.merge:
        try:
            counts = merge(args.merge)
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
        return _report(counts, args.markdown)

    os.environ.setdefault("PYMIL_TEST_TARGETS", "mlprogram")
    import pytest
    import coremltools

    default = Path(coremltools.__file__).parent / "converters/mil/mil/ops/tests"
    if not args.paths and not default.is_dir():
        print(f"coremltools' op tests are not installed ({default}); nothing to run", file=sys.stderr)
        return 2
    tally = Tally(args.every, args.shard)
    paths = args.paths or [str(default)]
    rc = pytest.main([*paths, "-q", "-p", "no:cacheprovider", *extra], plugins=[tally])
    if args.json:
        record = {"paths": paths + extra, "every": args.every, "shard": "%d/%d" % args.shard, "counts": tally.counts}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    _report(tally.counts, args.markdown)
    return 0 if rc in (0, 1, 5) else rc


def _report(counts, markdown):
    text = table(counts)
    print(text)
    if markdown:
        Path(markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
