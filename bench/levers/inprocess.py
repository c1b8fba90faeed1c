"""In-process levers for the served forward pass, measured against what is shipped, on the full-size photos:
Pillow's JPEG `draft` decoding and ONNX Runtime instead of eager PyTorch.

    .venv/bin/python bench/levers/inprocess.py [--models resnet18 resnet34] [--images 220]

ONNX Runtime is not a dependency of the service: `.venv/bin/pip install onnxruntime onnx` first, or its
columns stay empty (the PyTorch forward time per image, one thread, is printed either way). Each lever is
judged on speed and on whether the predictions stay exactly the same (the same label for every photo;
probabilities within float rounding).
"""

from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps

from bench.latency import median_seconds
from skinlesion.image import decode_image, preprocess, to_rgb
from skinlesion.predictor import Predictor

ROOT = Path(__file__).resolve().parents[2]

BATCH_SIZES = (1, 4, 8)


def decode_draft(data: bytes, image_size: tuple[int, int]) -> Image.Image:
    """decode_image's result, but decoded by libjpeg at the smallest 1/2^k scale that still covers the input."""
    image = Image.open(io.BytesIO(data))
    height, width = image_size
    image.draft("RGB", (width, height))
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def compare(name: str, reference: torch.Tensor, candidate: torch.Tensor) -> str:
    agree = (reference.argmax(1) == candidate.argmax(1)).sum().item()
    return f"{name}: same label {agree}/{len(reference)}, max |dp| {(reference - candidate).abs().max().item():.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000-fullres")
    parser.add_argument("--images", type=int, default=220)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet34"])
    parser.add_argument("--weights-dir", type=Path, default=ROOT / "model_store")
    args = parser.parse_args()
    raw = [p.read_bytes() for p in sorted(args.data.glob("*.jpg"))[: args.images]]
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
        print("onnxruntime is not installed: its columns stay empty (.venv/bin/pip install onnxruntime onnx)")
    torch.set_num_threads(1)  # as in a served worker
    print(f"{len(raw)} photos from {args.data}; one thread, as in a served worker\n")

    for arch in args.models:
        report(Predictor.from_checkpoint(args.weights_dir / f"{arch}.pt"), raw, onnxruntime)


def report(predictor: Predictor, raw: list[bytes], onnxruntime) -> None:
    size = predictor.image_size
    inputs = torch.stack([preprocess(decode_image(r), size) for r in raw])
    shipped = predictor.probabilities(inputs)
    drafted = predictor.probabilities(torch.stack([preprocess(decode_draft(r, size), size) for r in raw]))
    full_ms = median_seconds(lambda: preprocess(decode_image(raw[0]), size), 20) * 1000
    draft_ms = median_seconds(lambda: preprocess(decode_draft(raw[0], size), size), 20) * 1000
    print(f"## {predictor.arch}")
    print(f"decode + preprocess of one photo: shipped {full_ms:.2f} ms, draft {draft_ms:.2f} ms; "
          + compare("draft", shipped, drafted))
    session = onnx_session(predictor, onnxruntime) if onnxruntime else None
    if session:
        onnx = torch.cat([torch.from_numpy(session.run(None, {"x": chunk.numpy()})[0]) for chunk in inputs.split(64)])
        print(compare("ONNX Runtime", shipped, onnx.softmax(dim=1)))
    print("| batch | PyTorch ms/image | ONNX Runtime ms/image | speed-up |")
    print("|---|---|---|---|")
    for batch in BATCH_SIZES:
        x = inputs[:batch]
        eager = median_seconds(lambda x=x: predictor.probabilities(x), 20) * 1000 / batch
        if session:
            ort = median_seconds(lambda x=x: session.run(None, {"x": x.numpy()}), 20) * 1000 / batch
            print(f"| {batch} | {eager:.1f} | {ort:.1f} | {eager / ort:.2f}x |")
        else:
            print(f"| {batch} | {eager:.1f} | - | - |")
    print()


def onnx_session(predictor: Predictor, onnxruntime):
    """The predictor's network exported to ONNX (any batch size), in a one-thread ONNX Runtime session."""
    height, width = predictor.image_size
    model = predictor.model.to(memory_format=torch.contiguous_format)
    buffer = io.BytesIO()
    # The TorchScript-based exporter (deprecated, still shipped) exports this plain ResNet without extra packages.
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
    torch.onnx.export(model, (torch.zeros(2, 3, height, width),), buffer, dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}})
    predictor.model.to(memory_format=torch.channels_last)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


if __name__ == "__main__":
    main()
