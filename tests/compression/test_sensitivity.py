"""The batched sensitivity analysis measures what the one-layer-at-a-time loop measured.

No coremltools here: these also run on a GPU machine that has only PyTorch and diffusers.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from python_coreml_sd.compression import testbed
from python_coreml_sd.compression.kmeans import palettize_array
from python_coreml_sd.compression import sensitivity
from python_coreml_sd.compression.sensitivity import Palette, Probe, analyse, fit_memory, palettizable_layers
from python_coreml_sd.errors import UserError
from python_coreml_sd.metrics import psnr


def one_at_a_time(module, inputs, layers, recipe):
    """The old measurement: weights replaced by their palettized values, one plain forward pass."""
    saved = {n: layers[n].weight.data.clone() for n in recipe}
    try:
        with torch.no_grad():
            reference = module(*inputs.values()).numpy()
            for name, bits in recipe.items():
                w16 = saved[name].to(torch.float16).numpy()
                lut, indices = palettize_array(w16, bits)
                layers[name].weight.data = torch.from_numpy(lut[indices].astype(np.float32))
            return psnr(reference, module(*inputs.values()).numpy())
    finally:
        for name, weight in saved.items():
            layers[name].weight.data = weight


def assert_same_db(actual, expected, tolerance=0.01):
    """Equal within ``tolerance`` dB, or both above 100 dB: there the error is float32 rounding of the
    whole network (fp32 holds ~140 dB), which batching or thread counts move by tenths of a dB while
    it adds under 1e-10 of the peak power to any recipe's predicted noise."""
    for a, e in zip(np.ravel(actual), np.ravel(expected)):
        assert a == e or abs(a - e) <= tolerance or min(a, e) > 100, (a, e)


@pytest.fixture(scope="module")
def tiny():
    model, inputs = testbed.unet("tiny")
    return model, inputs, palettizable_layers(model.unet)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_palette_is_the_palettizers_lut(bits):
    weight = torch.randn(64, 48, 3, 3, generator=torch.Generator().manual_seed(bits))
    lut, indices = palettize_array(weight.to(torch.float16).numpy(), bits)
    dense = Palette(weight, (bits,)).dense(weight, bits)
    assert dense.dtype == torch.float32 and dense.shape == weight.shape
    np.testing.assert_array_equal(dense.numpy(), lut[indices].astype(np.float32))
    assert len(np.unique(dense.numpy())) <= 1 << bits


def test_batched_recipes_measure_like_one_at_a_time(tiny):
    model, inputs, layers = tiny
    names = list(layers)
    recipes = [{names[0]: 1}, {names[5]: 2, names[40]: 4}, {names[17]: 16}, {n: 2 for n in names}, {names[-1]: 6},
               {names[33]: 1, names[34]: 1}]
    before = {n: p.clone() for n, p in model.named_parameters()}
    batched = Probe(model, inputs, layers, bits=(), batch=4).measure(recipes)
    expected = [one_at_a_time(model, inputs, layers, {n: b for n, b in r.items() if b != 16}) for r in recipes]
    assert batched[2] == float("inf") == expected[2]  # nothing palettized: the untouched output, exactly
    assert_same_db(batched, expected)  # float rounding of batched kernels, not more
    assert len({round(v, 1) for v in batched}) == len(recipes)  # and the recipes did differ
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # weights never touched


def test_workers_and_paths_agree(tiny):
    model, inputs, layers = tiny
    subset = dict(list(layers.items())[:6])
    runs = [analyse(Probe(model, inputs, subset, (4, 1), batch=4), workers=w, log=None, score_in_workers=s)
            for w, s in ((2, True), (1, True), (2, False))]
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for name in subset:
            assert_same_db([other[name][b] for b in (4, 1)], [runs[0][name][b] for b in (4, 1)])
    name = next(iter(subset))
    assert runs[0][name][4] == pytest.approx(one_at_a_time(model, inputs, layers, {name: 4}), abs=0.01)
    assert runs[0][name][1] < runs[0][name][4]


class Interrupted(Exception):
    pass


def test_a_score_file_resumes_an_interrupted_analysis(tiny, tmp_path, monkeypatch):
    """Scores are saved group by group; an analysis stopped after two groups measures only the rest on the
    next run (on either path), and ends with the uninterrupted scores."""
    model, inputs, layers = tiny
    subset = dict(list(layers.items())[:7])
    scores_file = tmp_path / "scores.json"
    whole = analyse(Probe(model, inputs, subset, (4, 1), batch=4), workers=1, log=None)  # groups of two layers
    measured = []
    real = Probe.sensitivity

    def stops_at_the_third_group(self, names):
        if len(measured) == 4:
            raise Interrupted
        measured.extend(names)
        return real(self, names)

    monkeypatch.setattr(Probe, "sensitivity", stops_at_the_third_group)
    with pytest.raises(Interrupted):
        analyse(Probe(model, inputs, subset, (4, 1), batch=4), workers=1, log=None, score_file=scores_file)
    assert set(json.loads(scores_file.read_text())["layers"]) == set(measured) == set(list(subset)[:4])
    measured.clear()
    said = []
    resumed = analyse(Probe(model, inputs, subset, (4, 1), batch=4), workers=1, log=said.append,
                      score_in_workers=False, score_file=scores_file)
    assert measured == list(subset)[4:] and said[1] == f"4 of 7 layers' scores read from {scores_file}"
    assert list(resumed) == list(subset)
    for name in subset:
        assert_same_db([resumed[name][b] for b in (4, 1)], [whole[name][b] for b in (4, 1)])
    measured.clear()  # every width asked for is in the file now: nothing is measured, a subset of widths neither
    probe = Probe(model, inputs, subset, (1,), batch=4)
    assert analyse(probe, workers=1, log=None, score_file=scores_file) == {n: {1: resumed[n][1]} for n in subset}
    assert measured == [] and set(probe.palettes) == set(subset)  # palettes made all the same, for the recipes


def test_a_score_file_of_another_model_is_refused(tiny, tmp_path):
    model, inputs, layers = tiny
    subset = dict(list(layers.items())[:2])
    scores_file = tmp_path / "scores.json"
    analyse(Probe(model, inputs, subset, (2,)), workers=1, log=None, score_file=scores_file)
    other_inputs = {k: v + 0.5 if v.is_floating_point() else v for k, v in inputs.items()}
    with pytest.raises(UserError, match="holds the scores of another model or other sample inputs"):
        analyse(Probe(model, other_inputs, subset, (2,)), workers=1, log=None, score_file=scores_file)
    scores_file.write_text('{"layers": {}}')
    with pytest.raises(UserError, match=r"is not a scores file of this analysis \('reference_sample'\)"):
        analyse(Probe(model, inputs, subset, (2,)), workers=1, log=None, score_file=scores_file)


linux_proc = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux's /proc")


@linux_proc
def test_memory_fit_measures_a_forward_pass_and_keeps_a_request_that_fits(tiny):
    model, inputs, layers = tiny
    probe = Probe(model, inputs, dict(list(layers.items())[:6]), (4, 1), batch=16)
    assert fit_memory(probe, 2, max_memory=10 ** 12, log=None) == (2, 16)
    assert probe._reference is not None  # the measured pass is the reference, computed once
    with pytest.raises(UserError, match=r"needs about .* GB even with one worker at batch 2; 0.0 GB is available"):
        fit_memory(probe, 2, max_memory=1, log=None)


@linux_proc
def test_memory_fit_trims_the_batch_then_the_workers(tiny, monkeypatch):
    model, inputs, layers = tiny
    subset = dict(list(layers.items())[:6])
    # a forward pass that peaks 100 MB over a 1 GB process: each batch entry of each worker costs 100 MB
    monkeypatch.setattr(sensitivity, "_rss_bytes", lambda peak=False, reset_peak=False: 11 * 10 ** 8 if peak else 10 ** 9)
    fixed = 11 * 10 ** 8 + 50 * 10 ** 6  # the peak plus room for the palettes and transients of this small model
    said = []
    plans = [fit_memory(Probe(model, inputs, subset, (4, 1), batch=16), 2, fixed + extra, said.append)
             for extra in (33 * 10 ** 8, 17 * 10 ** 8, 9 * 10 ** 8, 5 * 10 ** 8, 3 * 10 ** 8)]
    assert plans == [(2, 16), (2, 8), (2, 4), (2, 2), (1, 2)]
    assert said[0].startswith("memory: 2 workers at batch 16 need about 4.3 GB of 2.9 GB; using 2 at batch 8 (about 2.7 GB)")


class FoldsTheBatch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x.reshape(-1, 64))  # (B, 2, 64) -> (2B, 64): batch entries no longer on axis 0 alone


def test_refuses_modules_that_mix_the_batch_axis():
    module = FoldsTheBatch()
    probe = Probe(module, {"x": torch.randn(1, 2, 64)}, palettizable_layers(module), (2,))
    with pytest.raises(RuntimeError, match="batch entries are not on the first axis"):
        probe.measure([{"fc": 2}, {"fc": 16}])


@pytest.mark.cuda
def test_cuda_scores_match_the_cpu(tiny):
    model, inputs, layers = tiny
    subset = dict(list(layers.items())[:8])
    cpu = analyse(Probe(model, inputs, subset, (8, 2)), "cpu", workers=1, log=None)
    cuda = analyse(Probe(model, inputs, subset, (8, 2)), "cuda", log=None)
    model.to("cpu")
    for name in subset:
        for bits in (8, 2):
            assert_same_db(cuda[name][bits], cpu[name][bits], tolerance=0.05)


def test_the_cli_runs_without_coremltools_or_transformers(tmp_path):
    """The GPU machine has PyTorch and diffusers only: hide the converters' libraries (a site-packages
    of links to everything else, Python started without its own site) and run the analysis there."""
    import os
    import site
    import subprocess
    import sys
    from pathlib import Path

    hidden = {"coremltools", "transformers", "peft", "sklearn", "scikit_learn"}  # peft needs transformers
    packages = tmp_path / "site"
    packages.mkdir()
    for root in map(Path, site.getsitepackages()):
        for entry in root.iterdir() if root.is_dir() else ():
            if entry.name.split("-")[0].split(".")[0].lower() not in hidden and entry.suffix != ".pth" \
                    and not (packages / entry.name).exists():
                (packages / entry.name).symlink_to(entry)
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "r.json"
    code = ("import importlib.util, sys\n"
            "assert all(importlib.util.find_spec(m) is None for m in ('coremltools', 'transformers'))\n"
            "from python_coreml_sd.compression import mixed_bit\n"
            f"code = mixed_bit.main(['--config', 'tiny', '--bits', '1', '--target-bits', '8', '--out', {str(out)!r}])\n"
            "assert not {'coremltools', 'transformers'} & set(sys.modules), 'imported'\n"
            "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{packages}"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pre-analysis: 90 layers x 1 bit widths" in result.stdout
    assert set(json.loads(out.read_text())["layers"].values()) == {1, 16}
