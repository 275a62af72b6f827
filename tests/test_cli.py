"""The flax-qmha command line and the demo."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

from flax_qmha._cli import main
from flax_qmha._modules_file import load_modules, save_modules

torch = pytest.importorskip("torch")


def _run(*args, block_torch=False):
  prelude = "import sys\n" + ("sys.modules['torch'] = None\n" if block_torch else "")
  code = prelude + "from flax_qmha._cli import main; raise SystemExit(main(sys.argv[1:]))"
  return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)


def test_demo_runs_without_torch_and_agrees_with_torch():
  result = _run("demo", block_torch=True)
  assert result.returncode == 0, result.stderr
  assert "within one step: 100.00%" in result.stdout, result.stdout
  assert "torch int8:" in result.stdout and "flax-qmha int8:" in result.stdout
  assert "latency" in result.stdout and "KiB" in result.stdout


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
  torch.manual_seed(0)
  layer = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32)
  encoder = torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
  path = tmp_path_factory.mktemp("ckpt") / "encoder.pt"
  torch.save(encoder.state_dict(), path)
  return encoder, path


def test_inspect_lists_every_attention(encoder_file, capsys):
  _, path = encoder_file
  assert main(["inspect", str(path)]) == 0
  out = capsys.readouterr().out
  assert "3 attention module(s)" in out
  for i in range(3):
    assert f"layers.{i}.self_attn: float" in out
  assert "in_proj_weight" in out and "float32 (48, 16)" in out


def test_inspect_shows_int8_qparams():
  from importlib.resources import files

  path = files("flax_qmha") / "data" / "demo_int8_mha.pt"
  result = _run("inspect", str(path), block_torch=True)
  assert result.returncode == 0, result.stderr
  assert "mha: int8 (converted)" in result.stdout
  assert "qint8 (128, 128) per-channel axis 0, scale" in result.stdout


@pytest.mark.parametrize("ext", ["safetensors", "msgpack"])
def test_convert_writes_modules_that_match_torch(encoder_file, tmp_path, capsys, ext):
  encoder, path = encoder_file
  out = tmp_path / f"encoder.{ext}"
  assert main(["convert", str(path), "-o", str(out), "--num-heads", "4"]) == 0
  captured = capsys.readouterr()
  assert "3/3 layers.2.self_attn" in captured.err  # progress bar for several layers
  modules = load_modules(out)
  assert list(modules) == [f"layers.{i}.self_attn" for i in range(3)]
  x = np.random.default_rng(0).normal(size=(5, 2, 16)).astype(np.float32)
  for i, (module, variables) in enumerate(modules.values()):
    ours, _ = module.apply(variables, x, x, x)
    with torch.no_grad():
      theirs, _ = encoder.layers[i].self_attn(*(torch.tensor(x),) * 3)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)


def test_export_float_dequantizes_an_int8_checkpoint_for_torch(tmp_path):
  from importlib.resources import files

  from safetensors.torch import load_file

  path = files("flax_qmha") / "data" / "demo_int8_mha.pt"
  out = tmp_path / "float.safetensors"
  assert main(["export-float", str(path), "-o", str(out), "--num-heads", "4"]) == 0
  state = {k.removeprefix("mha."): v for k, v in load_file(out).items()}
  mha = torch.nn.MultiheadAttention(128, 4)
  mha.load_state_dict(state, strict=True)
  ref = np.load(files("flax_qmha") / "data" / "demo_reference.npz")
  with torch.no_grad():
    out_float, _ = mha(*(torch.tensor(ref["x"]),) * 3,
                       key_padding_mask=torch.tensor(ref["key_padding_mask"]))
  # The dequantized weights are close to the original float ones: same output up to
  # int8 weight noise (the demo's SQNR is ~31 dB with activation noise on top).
  noise = out_float.numpy() - ref["float_output"]
  assert 10 * np.log10(np.sum(ref["float_output"] ** 2) / np.sum(noise**2)) > 35


@pytest.mark.parametrize(
    "args, words",
    [
        (["inspect", "/nonexistent.pt"], ["No such file"]),
        (["inspect", __file__], ["not a zip archive"]),
        (["convert", "CKPT", "-o", "out.txt", "--num-heads", "4"], [".txt"]),
        (["export-float", "CKPT", "-o", "out.pt", "--num-heads", "4"], [".safetensors"]),
        (["convert", "CKPT", "-o", "OUT.msgpack", "--num-heads", "3"], ["16", "3"]),
    ],
    ids=["missing", "not_a_checkpoint", "bad_extension", "export_needs_safetensors",
         "heads_do_not_divide"],
)
def test_bad_inputs_give_one_line_errors(encoder_file, tmp_path, args, words):
  _, path = encoder_file
  args = [str(path) if a == "CKPT" else str(tmp_path / "out.msgpack") if a == "OUT.msgpack"
          else a for a in args]
  result = _run(*args)
  assert result.returncode == 1, result.stdout + result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("flax-qmha: error:")]
  assert len(lines) == 1, result.stderr
  for word in words:
    assert word in lines[0], lines[0]


def test_modules_file_round_trip_and_refusals(tmp_path):
  import flax_qmha as fq
  from flax_qmha._errors import CheckpointError

  m = fq.MultiheadAttention(8, 2, add_bias_kv=True, qconfig=fq.get_default_qat_qconfig())
  x = np.ones((3, 2, 8), np.float32)
  variables = m.init(jax.random.key(0), x, x, x)
  save_modules(tmp_path / "m.safetensors", {"attn": (m, variables)})
  (back, back_vars), = load_modules(tmp_path / "m.safetensors").values()
  assert back == m
  jax.tree.map(np.testing.assert_array_equal, back_vars, jax.device_get(variables))
  fq.save_variables(tmp_path / "plain.safetensors", variables)
  with pytest.raises(CheckpointError, match="no module description"):
    load_modules(tmp_path / "plain.safetensors")
  with pytest.raises(TypeError, match="modules\\['x'\\] must be a MultiheadAttention"):
    save_modules(tmp_path / "bad.safetensors", {"x": (object(), variables)})
