from helpers import run_cli

from ghostproj import GradProjectionEngine
from ghostproj.engines.calls import LayerTap


def test_naive_check_passes_on_gpt2_and_llama(capsys, gpt2_dir, llama_dir, data_file):
    for model_dir in (gpt2_dir, llama_dir):
        code, out, err = run_cli(["naive-check", "--model", model_dir, "--data", data_file, "--samples", "6",
                                  "--max-length", "24", "--rank", "64"], capsys)
        assert code == 0, out + err
        assert "OK" in out and "max rel err" in out


def test_naive_check_fails_when_the_engine_is_wrong(capsys, gpt2_dir, data_file, monkeypatch):
    real = GradProjectionEngine.collect

    def skewed(self):
        v = real(self)
        return v * 1.001  # a 0.1% error must be caught
    monkeypatch.setattr(GradProjectionEngine, "collect", skewed)
    code, out, _ = run_cli(["naive-check", "--model", gpt2_dir, "--data", data_file, "--max-length", "24"], capsys)
    assert code == 1 and "FAILED" in out


def test_non_interf_passes(capsys, gpt2_dir, data_file):
    code, out, err = run_cli(["non-interf", "--model", gpt2_dir, "--data", data_file, "--steps", "2",
                              "--max-length", "24"], capsys)
    assert code == 0, out + err
    assert "OK" in out


def test_non_interf_fails_when_the_engine_interferes(capsys, gpt2_dir, data_file, monkeypatch):
    real = LayerTap.backward

    def meddling(ctx, grad):
        out = real(ctx, grad)
        return (out[0] * 1.01,) + out[1:]  # changes the gradient flowing below the layer
    monkeypatch.setattr(LayerTap, "backward", staticmethod(meddling))
    code, out, _ = run_cli(["non-interf", "--model", gpt2_dir, "--data", data_file, "--steps", "1",
                            "--max-length", "24"], capsys)
    assert code == 1 and "FAILED" in out


def test_naive_check_bfloat16_model(capsys, gpt2_dir, data_file):
    """bf16 weights: the engine accumulates in float32 while the naive reference's weight
    gradients are bf16, so agreement is to bf16 precision (~4e-3 relative per rounding,
    measured ~3e-3 here); the default tolerance for 16-bit models is 2e-2."""
    code, out, err = run_cli(["naive-check", "--model", gpt2_dir, "--data", data_file, "--dtype", "bfloat16",
                              "--max-length", "24", "--rank", "64"], capsys)
    assert code == 0, out + err
    assert "within 0.02" in out
