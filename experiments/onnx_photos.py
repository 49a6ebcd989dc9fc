"""Top-1 agreement of an ONNX graph that takes photos (``fusionnet export --preprocess``) with fusionnet's own
pipeline (``fusionnet predict --images``: fusionnet's decoder and reader, then the model) on the same files.

The graph gets each file decoded by PIL (``Image.open(f).convert("RGB")``, no EXIF rotation: what a caller of the
graph typically does) as uint8 (1, H, W, 3); fusionnet reads the file its own way. Default model: the packaged
ImageNet EfficientNet-Lite0 (1,000 classes, a strict test of near-ties), at sizes unlike its training size.

    python experiments/onnx_photos.py --images ../shared/data/flowers5_128/test --sizes 96 160 \
        --out runs/onnx_photos.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> None:
    from fusionnet.data.transforms import apply_transform, decoder_of, reading_transform
    from fusionnet.models.export import export_checked
    from fusionnet.models.plain import load_member
    from fusionnet.utils.files import atomic_write_json
    from fusionnet.utils.images import images_in
    from fusionnet.workflows.demo import imagenet_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="a folder of photos (any depth)")
    ap.add_argument("--model", default=None, help="a model fusionnet reads (default: ImageNet Lite0)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 160])
    ap.add_argument("--out", default="runs/onnx_photos.json")
    args = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(2)
    model = (load_member(args.model) if args.model else imagenet_model()).eval()
    files = images_in(Path(args.images))
    result = {"images": args.images, "n": len(files), "model": args.model or "imagenet efficientnet_lite0",
              "reader": model.config.reader, "resize": model.config.resize, "sizes": {}}
    for size in args.sizes:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "photos.onnx"
            export_checked(model, path, torch.rand(2, 3, size, size), size=size, photos=True)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        tf = reading_transform(model.config.reading(size))
        decode = decoder_of(tf)  # fusionnet's own decoder for this reader, as predict --images reads a file
        agree, max_dp = 0, 0.0
        for f in files:
            photo = np.asarray(Image.open(f).convert("RGB"))[None]
            (p,) = session.run(["probabilities"], {"photos": photo})
            with torch.no_grad():
                q = model(apply_transform(tf, decode(f))[None])
            q = q.softmax(1).numpy()
            agree += int(p.argmax() == q.argmax())
            max_dp = max(max_dp, float(np.abs(p - q).max()))
        result["sizes"][str(size)] = {"top1_agreement": agree / len(files), "max_abs_prob_diff": max_dp,
                                      "seconds": round(time.perf_counter() - t0, 1)}
        print(size, result["sizes"][str(size)])
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
