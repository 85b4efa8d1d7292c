import json

import pytest
from PIL import Image

from python_coreml_sd import parity


def test_parity_report_on_tiny(capsys, tmp_path, tiny_models_dir):
    out = tmp_path / "report"
    assert parity.main(["--prompt", "a red fox", "-i", str(tiny_models_dir), "-o", str(out), "--seeds", "1", "2",
                        "--num-inference-steps", "3", "--scheduler", "DDIM"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["threshold_db"] == 30.0 and len(report["results"]) == 2
    for entry in report["results"]:
        values = entry["psnr_db"]
        assert set(values) == {"text_embeddings", "first_noise_pred", "final_latents", "decoded_image", "final_image"}
        # fp16 conversion against the fp32 reference: well above the floor, yet not identical.
        assert all(35 <= v < 150 for v in values.values()), values
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (3 * 128, 2 * 128)
    printed = capsys.readouterr().out
    assert "final_image" in printed and "ok" in printed


def test_parity_library_api_takes_a_typed_job(tmp_path, tiny_models_dir):
    from python_coreml_sd.generation.jobs import Models, ParityJob, requests_for, run_parity
    job = ParityJob(Models("mil", tiny_models_dir), requests_for(["a red fox"], [4], num_inference_steps=2),
                    tmp_path / "report", threshold_db=35.0)
    report = run_parity(job)
    assert report["passed"] and report["threshold_db"] == 35.0 and report["backend"] == "mil"
    assert [entry["seed"] for entry in report["results"]] == [4]
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["grid.png", "report.json"]


def test_parity_fails_with_exit_1_under_the_threshold(capsys, tmp_path, tiny_models_dir):
    with pytest.raises(SystemExit) as exit_info:
        parity.main(["--prompt", "a red fox", "-i", str(tiny_models_dir), "-o", str(tmp_path),
                     "--num-inference-steps", "2", "--psnr-threshold", "200"])
    assert exit_info.value.code == 1
    assert "PSNR under 200.0 dB" in capsys.readouterr().err
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is False


def test_parity_refuses_bad_input_before_loading_anything(capsys, tmp_path, tiny_models_dir, monkeypatch):
    from python_coreml_sd.generation import setup
    monkeypatch.setattr(setup, "open_pipeline", lambda *a, **k: pytest.fail("models were loaded"))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "report.json").write_text("{}")
    (tmp_path / "a_file").write_text("")
    base = ["--prompt", "a red fox", "-i", str(tiny_models_dir), "--num-inference-steps", "2"]
    for extra, message in (
            (["-o", str(tmp_path / "done")], "report.json exists; pass --overwrite"),
            (["-o", str(tmp_path / "a_file")], "a_file is a file"),
            (["-o", str(tmp_path / "new"), "--seeds", "1", "-1"], "--seed -1 is outside"),
            (["-o", str(tmp_path / "new"), "--guidance-scale", "nan"], "--guidance-scale must be a finite number")):
        with pytest.raises(SystemExit) as exit_info:
            parity.main(base + extra)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 0, (extra, err)
    assert (tmp_path / "done" / "report.json").read_text() == "{}" and not (tmp_path / "new").exists()
