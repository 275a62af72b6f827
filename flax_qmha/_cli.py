"""The ``flax-qmha`` command line: demo, inspect, convert, export-float.

Errors are one line on stderr (``flax-qmha: error: ...``) with exit status 1;
usage errors exit with 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from flax_qmha._errors import CheckpointError

KIND_NAMES = {"float": "float", "float_linears": "float (quantizable layout)",
              "observed": "observed (calibration/QAT statistics)", "converted": "int8 (converted)"}


def _progress(done: int, total: int, label: str) -> None:
  """A one-line progress bar on stderr, for checkpoints with several attentions."""
  if total < 2:
    return
  width = 24
  filled = width * done // total
  end = "\n" if done == total else ""
  sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<40.40s}{end}")
  sys.stderr.flush()


def _describe_array(value) -> str:
  from flax_qmha._torch_pickle import QuantizedTensor

  if isinstance(value, QuantizedTensor):
    scale = np.atleast_1d(np.asarray(value.scale, np.float64))
    how = f"per-channel axis {value.axis}" if value.axis is not None else "per-tensor"
    return (f"{value.dtype} {tuple(value.int_repr.shape)} {how}, scale"
            f" {scale.min():.3g}..{scale.max():.3g}")
  if isinstance(value, tuple):
    return "(" + ", ".join(_describe_array(v) for v in value if v is not None) + ")"
  if isinstance(value, np.ndarray):
    if value.size == 1 and value.dtype.kind in "fiu":
      return f"{value.dtype} {tuple(value.shape)} = {value.reshape(-1)[0]:.6g}"
    if value.dtype.kind == "f" and value.size:
      finite = value[np.isfinite(value)]
      span = f", range {finite.min():.3g}..{finite.max():.3g}" if finite.size else ""
      return f"{value.dtype} {tuple(value.shape)}{span}"
    return f"{value.dtype} {tuple(value.shape)}"
  return repr(value)


def inspect_file(path: str, out=None) -> int:
  """Prints every attention found in a checkpoint, with its tensors and qparams."""
  from flax_qmha import _from_torch

  out = out or sys.stdout
  src = _from_torch._load_source(path, "inspect")
  found = _from_torch._find_attentions(src.entries)
  if not found:
    raise ValueError(f"inspect: no multi-head attention found in {src.label}"
                     f" ({len(src.entries)} entries)")
  print(f"{src.label}: {len(src.entries)} entries, {len(found)} attention module(s)", file=out)
  for prefix, kind in found.items():
    kind = _from_torch._refine_kind(src.entries, prefix, kind)
    name = prefix[:-1] if prefix.endswith(".") else prefix
    print(f"\n{name or '<root>'}: {KIND_NAMES.get(kind, kind)}", file=out)
    for key, value in src.entries.items():
      if key.startswith(prefix) and not key.endswith("._packed_params.dtype"):
        print(f"  {key[len(prefix):]:<48s} {_describe_array(value)}", file=out)
  return 0


def _import_all(path: str, num_heads: int, batch_first: bool):
  from flax_qmha._from_torch import from_torch_checkpoint

  result = from_torch_checkpoint(path, num_heads=num_heads, batch_first=batch_first)
  for prefix, reason in result.skipped:
    print(f"flax-qmha: skipped {prefix or '<root>'}: {reason}", file=sys.stderr)
  if not result:
    first = f" (first: {result.skipped[0][0]}: {result.skipped[0][1]})" if result.skipped else ""
    raise ValueError(f"no attention in {path} could be imported{first}")
  return result


def convert_file(path: str, output: str, num_heads: int, batch_first: bool) -> int:
  """Imports every attention and writes their Flax variables (int8 when quantized)."""
  from flax_qmha._modules_file import save_modules

  modules = {}
  found = _import_all(path, num_heads, batch_first)
  for i, (prefix, (module, variables)) in enumerate(found.items(), 1):
    modules[prefix or "root"] = (module, variables)
    _progress(i, len(found), prefix)
  save_modules(output, modules)
  summary = {p: type(m).__name__ for p, (m, _) in modules.items()}
  print(f"wrote {output}: {json.dumps(summary)}")
  return 0


def export_float_file(path: str, output: str, num_heads: int) -> int:
  """Writes every attention as a float torch.nn.MultiheadAttention state_dict
  (int8 weights dequantized) to one .safetensors file, keys prefixed as in the source."""
  from flax_qmha._export import to_torch_state_dict
  from flax_qmha._safetensors import save_safetensors

  if not output.lower().endswith(".safetensors"):
    raise ValueError(f"export-float writes .safetensors files (torch loads them with the"
                     f" safetensors package), got {output!r}")
  tensors = {}
  found = _import_all(path, num_heads, False)
  for i, (prefix, (module, variables)) in enumerate(found.items(), 1):
    for key, value in to_torch_state_dict(module, variables).items():
      tensors[f"{prefix}.{key}" if prefix else key] = np.ascontiguousarray(value)
    _progress(i, len(found), prefix)
  save_safetensors(output, tensors, {"format": "pt"})
  print(f"wrote {output}: {len(tensors)} tensors from {len(found)} attention module(s)")
  return 0


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="flax-qmha",
      description="PyTorch's quantizable multi-head attention for JAX/Flax.",
  )
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser(
      "demo", help="run an int8 checkpoint made by torch's quantization flow, without torch")
  inspect = commands.add_parser("inspect", help="list every attention in a checkpoint")
  inspect.add_argument("file", help=".pt/.pth/.bin (torch.save) or .safetensors")
  convert = commands.add_parser(
      "convert", help="import every attention into a Flax variables file (int8 if quantized)")
  convert.add_argument("file")
  convert.add_argument("-o", "--output", required=True, help=".safetensors or .msgpack")
  convert.add_argument("--num-heads", type=int, required=True)
  convert.add_argument("--batch-first", action="store_true")
  export = commands.add_parser(
      "export-float", help="write float torch.nn.MultiheadAttention weights (dequantized)")
  export.add_argument("file")
  export.add_argument("-o", "--output", required=True, help=".safetensors")
  export.add_argument("--num-heads", type=int, required=True)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _build_parser().parse_args(argv)
  try:
    if args.command == "demo":
      from flax_qmha._demo import run_demo

      return run_demo()
    if args.command == "inspect":
      return inspect_file(args.file)
    if args.command == "convert":
      return convert_file(args.file, args.output, args.num_heads, args.batch_first)
    return export_float_file(args.file, args.output, args.num_heads)
  except (CheckpointError, ValueError, TypeError, OSError) as e:
    message = " ".join(str(e).split())  # one line
    print(f"flax-qmha: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
