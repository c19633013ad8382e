"""Convert an exported model for other runtimes: ONNX.

    python -m jobs.export --model URI --onnx [--out PATH] [--root ROOT] [--opset N] [--no-check]

``--model`` is a directory written by :func:`tans.selection.export.export_model` (local, ``s3://``,
or a path under the storage root such as ``searches/<run>/model``), as ``tans predict`` takes it.
Every export already holds ``model.pt``, ``model.safetensors``, ``config.json``, a model card
``README.md`` and ``model.json``; this command adds the formats that need a conversion.

``--onnx`` writes an ONNX file (:mod:`tans.selection.onnx_export`): input ``pixel_values``, the
preprocessed float batch ``N x C x H x W`` (dynamic ``N``); output ``logits``; the preprocessing,
class names and export id in its metadata. ``--out`` defaults to ``model.onnx`` in the export's
directory when it is local, else ``./model.onnx``; an existing directory gets ``model.onnx``
inside, ``s3://`` works too. The file is written atomically. Unless ``--no-check``, onnxruntime
(when installed) runs it on a few inputs and the largest difference from PyTorch is printed.
Needs ``pip install 'tans[export]'`` (onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import run_main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tans export", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="exported model dir (local, s3://, or under the root)")
    p.add_argument("--onnx", action="store_true", help="write an ONNX file (needs pip install 'tans[export]')")
    p.add_argument("--out", help="output file (default: model.onnx in the export dir if local, else ./model.onnx)")
    p.add_argument("--root", help="storage root for a relative --model (default: $TANS_ROOT, else ~/.cache/tans)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: 17)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs PyTorch comparison")
    args = p.parse_args(argv)
    if not args.onnx:
        p.error("say which format to write: --onnx (model.safetensors, config.json and README.md are in "
                "every export already)")
    if args.opset is not None and not 14 <= args.opset <= 21:
        p.error(f"--opset must be between 14 and 21, got {args.opset}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from tans.selection.export import ModelLoadError
    from tans.selection.onnx_export import DEFAULT_OPSET, ExportError, export_onnx

    model = args.model
    if args.root:
        from jobs.predict import model_location

        model = model_location(model, args.root)
    try:
        out, diff = export_onnx(model, args.out, args.opset or DEFAULT_OPSET, check=not args.no_check)
    except (ModelLoadError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if diff is not None:
        print(f"[export] onnxruntime vs PyTorch: max |logit difference| {diff:.2e} on 3 inputs")
    print(f"[export] written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
