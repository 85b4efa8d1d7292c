"""scripts/run_coremltools_op_tests.py: --shard slices, --json / --merge, and one real sharded run
of coremltools' random-op smoke tests through the runtime."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support import ROOT, load_script

runner = load_script("run_coremltools_op_tests")


def collected(tally, nodeids):
    items = [SimpleNamespace(nodeid=n) for n in nodeids]
    dropped = []
    config = SimpleNamespace(hook=SimpleNamespace(pytest_deselected=lambda items: dropped.extend(items)))
    tally.pytest_collection_modifyitems(config, items)
    assert len(items) + len(dropped) == len(nodeids)
    return [it.nodeid for it in items]


def test_shards_partition_the_sampled_cases_and_share_every_family():
    ids = [f"t.py::Test{f}::test_x[{i}]" for f in "AB" for i in range(9)]
    sampled = collected(runner.Tally(every=2), ids)
    assert sampled == [f"t.py::Test{f}::test_x[{i}]" for f in "AB" for i in (0, 2, 4, 6, 8)]
    shards = [collected(runner.Tally(every=2, shard=(i, 3)), ids) for i in (1, 2, 3)]
    assert sorted(sum(shards, [])) == sorted(sampled) and [len(s) for s in shards] == [4, 3, 3]
    assert all({n.split("::")[1] for n in s} == {"TestA", "TestB"} for s in shards)


@pytest.mark.parametrize("text", ["0/2", "3/2", "2", "a/b", "1/0"])
def test_bad_shard_is_one_argparse_line(text, capsys):
    with pytest.raises(SystemExit) as e:
        runner.main(["--shard", text])
    assert e.value.code == 2 and "expected I/N" in capsys.readouterr().err


def write(path, shard, counts, paths=("t.py",)):
    path.write_text(json.dumps({"paths": list(paths), "every": 1, "shard": shard, "counts": counts}))
    return str(path)


def test_merge_adds_shards_and_refuses_a_shard_twice(tmp_path, capsys):
    a = write(tmp_path / "a.json", "1/2", {"iOS14/TestA": {"passed": 3, "failed": 1}})
    b = write(tmp_path / "b.json", "2/2", {"iOS14/TestA": {"passed": 2}, "iOS15/TestB": {"unsupported": 4}})
    md = tmp_path / "t.md"
    assert runner.main(["--merge", a, b, "--markdown", str(md)]) == 0
    rows = md.read_text().splitlines()
    assert "| iOS14/TestA | 5 | 0 | 1 | 0 | 0 | 0 | 0 |" in rows
    assert rows[-1] == "| **total** | 5 | 0 | 1 | 4 | 0 | 0 | 0 |"
    capsys.readouterr()
    assert runner.main(["--merge", a, write(tmp_path / "c.json", "1/2", {})]) == 2
    assert "shard 1/2 of the same run is already in" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert runner.main(["--merge", a, str(tmp_path / "bad.json")]) == 2
    assert "not a --json file of this runner" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main(["--merge", a, "--shard", "1/2"])


def test_sharded_run_of_coremltools_random_tests_merges_to_all_passed(tmp_path):
    import coremltools

    tests = Path(coremltools.__file__).parent / "converters/mil/mil/ops/tests/iOS14/test_random.py"
    if not tests.is_file():
        pytest.skip("coremltools' op tests are not installed")
    script = ROOT / "scripts" / "run_coremltools_op_tests.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outs = [str(tmp_path / f"s{i}.json") for i in (1, 2)]
    for i, out in enumerate(outs, 1):
        subprocess.run([sys.executable, str(script), str(tests), "--shard", f"{i}/2", "--json", out,
                        "--", "-k", "smoke", "-p", "no:warnings"], check=True, env=env, capture_output=True)
    counts = runner.merge(outs)
    assert {f: dict(c) for f, c in counts.items()} == {
        f"iOS14/TestRandom{k}": {"passed": 1, "statistical": 1} for k in ("Bernoulli", "Categorical", "Normal", "Uniform")}
