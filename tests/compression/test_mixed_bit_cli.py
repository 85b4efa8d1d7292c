"""The documented hand-off: the mixed-bit CLI writes a recipe, torch2coreml applies it to the same model.

Also: bad input to either CLI ends in one line and exit code 2 before any analysis or conversion,
with nothing written.
"""
import contextlib
import io
import json

import numpy as np
import pytest

import python_coreml_sd.convert as conversion
from python_coreml_sd import torch2coreml
from python_coreml_sd.compression import mixed_bit

ct = pytest.importorskip("coremltools")
UNET = "Stable_Diffusion_version_tiny_unet"


def lut_bits(package) -> dict:
    """{weight const name: bits} from the LUT size of each constexpr_lut_to_dense op of a package."""
    from python_coreml_sd.package_io import mil_program

    out = {}
    for function in mil_program(ct.models.MLModel(str(package), skip_model_load=True)).functions.values():
        for op in function.operations:
            if op.op_type == "constexpr_lut_to_dense":
                lut = op.lut.val
                entries = lut.shape[0] if lut.ndim == 1 else lut.shape[-2]
                out[op.name.removesuffix("_palettized")] = int(np.log2(entries))
    return out


def expected_bits(recipe: dict) -> dict:
    return {name.replace(".", "_") + "_weight_to_fp16": bits for name, bits in recipe.items() if bits != 16}


@pytest.fixture(scope="module")
def cli_recipe(tmp_path_factory):
    """A recipe written by the mixed-bit CLI for `tiny`, with a small analysis setting (two candidate
    bit widths) on the real code path; and what the CLI printed."""
    recipe_file = tmp_path_factory.mktemp("recipe") / "r.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert mixed_bit.main(["--model-version", "tiny", "--bits", "4,2", "--target-bits", "3.5",
                               "--out", str(recipe_file)]) == 0
    return recipe_file, printed.getvalue()


def test_cli_recipe_names_every_layer_canonically(cli_recipe):
    recipe_file, printed = cli_recipe
    assert "pre-analysis: 90 layers x 2 bit widths in" in printed
    doc = json.loads(recipe_file.read_text())
    recipe = doc["layers"]
    assert len(recipe) == 90 and set(recipe.values()) == {16, 4, 2}  # a real mix, every layer named
    assert all(not name.startswith("unet.") for name in recipe)  # canonical: the UNet's own paths
    assert 3.3 < doc["average_bits"] <= 3.5 and doc["measured_psnr"] > 20
    assert doc["model"] == "tiny" and doc["candidate_bits"] == [4, 2] and doc["analysis_seconds"] > 0


@pytest.mark.parametrize("attention, chunk", [("SPLIT_EINSUM", False), ("ORIGINAL", True), ("SPLIT_EINSUM_V2", False)])
def test_cli_recipe_converts_through_torch2coreml(cli_recipe, tmp_path, attention, chunk):
    recipe_file, _ = cli_recipe
    recipe = json.loads(recipe_file.read_text())["layers"]
    out = tmp_path / "out"
    assert torch2coreml.main(["--model-version", "tiny", "--convert-unet", "--attention-implementation", attention,
                              *(["--chunk-unet"] if chunk else []),
                              "--mixed-bit-recipe", str(recipe_file), "-o", str(out)]) == 0
    assert lut_bits(out / f"{UNET}.mlpackage") == expected_bits(recipe)
    if chunk:  # the chunks are cut from the palettized package: between them, every LUT of the recipe
        chunks = [lut_bits(out / f"{UNET}_chunk{i}.mlpackage") for i in (1, 2)]
        assert chunks[0] and chunks[1] and {**chunks[0], **chunks[1]} == expected_bits(recipe)


def run_cli(capsys, main, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def assert_one_line(code, err, prog, fragment):
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith(f"{prog}: error:"), err
    assert fragment in err, err


@pytest.fixture
def no_analysis(monkeypatch):
    monkeypatch.setattr(mixed_bit, "sensitivity", lambda *a, **k: pytest.fail("the analysis started"))


@pytest.mark.parametrize("argv, fragment", [
    (["--model-version", "{tmp}/nope"], "does not exist"),
    (["--unet-dir", "{tmp}"], "is not a diffusers UNet folder"),
    (["--out", "{tmp}/no/such/folder/r.json"], "does not exist or is not writable"),
    (["--out", "{tmp}"], "is a folder"),
    (["--scores", "{tmp}"], "--scores {tmp} is a folder"),
    (["--scores", "{tmp}/no/such/folder/s.json"], "does not exist or is not writable"),
    (["--apply", "{tmp}/missing.mlpackage", "{tmp}/dst.mlpackage"], "is not an .mlpackage"),
    (["--plot", "{tmp}/plot.jpg"], "name it *.png"),
    (["--bits", "5"], "bit widths must be among"),
    (["--target-bits", "0.5"], "--target-bits must be between 1 and 16"),
    (["--max-memory", "0"], "--max-memory must be a positive number of GB"),
    (["--model-version", "tiny", "--config", "tiny"], "not allowed with argument"),
])
def test_bad_input_is_one_line_before_the_analysis(capsys, tmp_path, no_analysis, argv, fragment):
    argv = [a.format(tmp=tmp_path) for a in argv]
    defaults = ["--target-bits", "3"] if "--target-bits" not in argv else []
    defaults += ["--out", str(tmp_path / "r.json")] if "--out" not in argv else []
    assert_one_line(*run_cli(capsys, mixed_bit.main, *argv, *defaults), "mixed_bit", fragment.format(tmp=tmp_path))
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "dst.mlpackage").exists()


def test_existing_recipe_is_kept_without_overwrite(capsys, tmp_path, no_analysis):
    out = tmp_path / "r.json"
    out.write_text("precious")
    code, err = run_cli(capsys, mixed_bit.main, "--target-bits", "3", "--out", str(out))
    assert_one_line(code, err, "mixed_bit", "exists; pass --overwrite")
    assert out.read_text() == "precious" and list(tmp_path.iterdir()) == [out]


def test_a_broken_scores_file_is_one_line_before_the_analysis(capsys, tmp_path, no_analysis):
    scores = tmp_path / "s.json"
    scores.write_text("{not json")
    code, err = run_cli(capsys, mixed_bit.main, "--target-bits", "3", "--out", str(tmp_path / "r.json"),
                        "--scores", str(scores))
    assert_one_line(code, err, "mixed_bit", f"{scores} is not a scores file of this analysis")
    assert scores.read_text() == "{not json" and not (tmp_path / "r.json").exists()


def test_a_second_target_reads_the_scores_of_the_first(capsys, tmp_path):
    scores, first, second = tmp_path / "s.json", tmp_path / "r1.json", tmp_path / "r2.json"
    for out, target in ((first, "3.5"), (second, "3")):
        assert mixed_bit.main(["--config", "tiny", "--bits", "4,2", "--target-bits", target, "--out", str(out),
                               "--scores", str(scores)]) == 0
    err = capsys.readouterr().err
    assert "90 of 90 layers' scores read from" in err and err.count("scores read from") == 1
    one, two = (json.loads(f.read_text()) for f in (first, second))
    assert one["sensitivity"] == two["sensitivity"] and one["average_bits"] > two["average_bits"]
    assert len(json.loads(scores.read_text())["layers"]) == 90


def test_missing_target_is_one_line(capsys, tmp_path, no_analysis):
    code, err = run_cli(capsys, mixed_bit.main, "--out", str(tmp_path / "r.json"))
    assert_one_line(code, err, "mixed_bit", "give --target-bits and/or --target-psnr")


@pytest.fixture
def no_conversion(monkeypatch):
    monkeypatch.setattr(conversion, "converter", lambda component: pytest.fail("conversion started"))


@pytest.mark.parametrize("content, fragment", [
    ('{"down_blocks.0.resnets.0.conv1": 4, "down_blocks.9.resnets.0.conv1": 4}',
     "names 1 layer(s) not in the UNet of 'tiny', e.g. down_blocks.9.resnets.0.conv1"),
    ('{"layers": {"down_blocks.0.resnets.0.conv1": 5}}', "unsupported bits"),
    ('{"down_blocks.0.resnets.0.conv1": true}', "unsupported bits"),
    ("{not json", "cannot read mixed-bit recipe"),
    ('{"layers": {}}', "non-empty JSON object"),
    ('{"down_blocks.0.resnets.0.conv1": 3}', "3 bits needs --min-deployment-target iOS18 or macOS15"),
])
def test_bad_recipe_fails_before_any_conversion(capsys, tmp_path, no_conversion, content, fragment):
    recipe = tmp_path / "r.json"
    recipe.write_text(content)
    code, err = run_cli(capsys, torch2coreml.main, "--convert-text-encoder", "--convert-unet",
                        "--mixed-bit-recipe", str(recipe), "-o", str(tmp_path / "o"))
    assert_one_line(code, err, "torch2coreml", fragment)
    assert not (tmp_path / "o").exists()


def test_recipe_names_are_checked_against_the_unet_before_converting(monkeypatch, tmp_path):
    """Canonical names and old `unet.`-prefixed ones pass the pre-check (and nothing else does)."""
    import python_coreml_sd.convert as conversion
    from python_coreml_sd.convert import ConversionOptions, convert

    converted = []
    monkeypatch.setattr(conversion, "converter", lambda component: lambda source, options: converted.append(1) or [])
    for name in ("down_blocks.0.resnets.0.conv1", "unet.down_blocks.0.resnets.0.conv1",
                 "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "time_embedding.linear_1"):
        recipe = tmp_path / "r.json"
        recipe.write_text(json.dumps({"layers": {name: 4}}))
        convert(ConversionOptions("tiny", tmp_path / "o", mixed_bit_recipe=str(recipe)), ["unet"])
    assert len(converted) == 4
