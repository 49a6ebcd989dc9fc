"""An ONNX graph that takes a photo: the model's own reading put in front of its exported graph.

Input ``photos``: uint8 RGB, (batch, H, W, 3), any H and W (one size per batch). Inside: the model's reading of
:mod:`fusionnet.config.reading` (``shorter``: the short side to ``size / crop_pct``, then a centre crop of
``size``; ``stretch``: the whole image to a square), then [0, 1] floats, the exported model (each branch's
normalisation is in it) and a softmax. Output ``probabilities`` (batch, classes).

* ``reader="albumentations"`` (models fusionnet trained): OpenCV's uint8 ``INTER_LINEAR`` resize reproduced bit
  for bit in integer ops (its float32 source positions, weights quantised to 1/2048, a horizontal then a vertical
  pass with OpenCV's SIMD rounding), with albumentations' output sizes and centre crop. The pixels equal
  fusionnet's reader's exactly (tests/test_pretrained.py; checked against cv2 5.1 on random sizes).
* ``reader="torchvision"`` (plain torchvision members): torchvision's sizes and crop offsets exactly, resized by
  ONNX's antialiased linear Resize, within one grey level of PIL's (PIL rounds its fixed-point passes itself).

The decoder is the caller's: decoders differ a little from fusionnet's own (which applies EXIF rotation);
measured in experiments/README.md.
"""

from __future__ import annotations

PHOTOS, IMAGES, LOGITS, PROBS = "photos", "images", "logits", "probabilities"

# OpenCV's fixed point for 8-bit linear resize (imgproc/src/resize.cpp): weights scaled by 2^11
INTER_RESIZE_COEF_SCALE = 2048


def with_photo_input(model_bytes: bytes, *, size: int, resize: str, crop_pct: float, reader: str) -> bytes:
    """``model_bytes`` (an ONNX graph from ``images`` (B, 3, size, size) in [0, 1] to ``logits``) with the
    preprocessing in front and a softmax behind (see the module docstring)."""
    import onnx
    from onnx import TensorProto, compose, helper

    model = onnx.load_from_string(model_bytes)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    pre = helper.make_model(preprocess_graph(size, resize, crop_pct, reader=reader),
                            opset_imports=[helper.make_opsetid("", opset)])
    pre.ir_version = model.ir_version
    merged = compose.merge_models(compose.add_prefix(pre, "pre/", rename_inputs=False, rename_outputs=False), model,
                                  io_map=[(IMAGES, IMAGES)])
    merged.graph.node.append(helper.make_node("Softmax", [LOGITS], [PROBS], axis=1, name="probabilities"))
    del merged.graph.output[:]
    merged.graph.output.append(helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, ["batch", None]))
    del merged.metadata_props[:]
    for prop in model.metadata_props:
        merged.metadata_props.add(key=prop.key, value=prop.value)
    onnx.checker.check_model(merged)
    return merged.SerializeToString()


def preprocess_graph(size: int, resize: str, crop_pct: float, *, reader: str):
    """The preprocessing alone: ``photos`` (uint8 (B, H, W, 3)) -> ``images`` (float (B, 3, size, size) in [0, 1])."""
    from onnx import TensorProto, helper

    g = _Nodes()
    shape = g("Shape", PHOTOS)
    height, width = (g("Gather", shape, g.const(axis, TensorProto.INT64)) for axis in (1, 2))  # int64 scalars
    if reader == "torchvision":
        out = _torchvision_resize(g, height, width, size, resize, crop_pct)
    else:
        out = _opencv_resize(g, height, width, size, resize, crop_pct)
    out = g("Div", g("Cast", out, to=TensorProto.FLOAT), g.const(255.0, TensorProto.FLOAT))
    g("Transpose", out, perm=[0, 3, 1, 2], out=IMAGES)
    return helper.make_graph(
        g.nodes, "fusionnet_preprocess",
        [helper.make_tensor_value_info(PHOTOS, TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info(IMAGES, TensorProto.FLOAT, ["batch", 3, size, size])])


class _Nodes:
    """Builds a node list: ``g(op, *inputs, **attributes)`` appends a node and returns its (fresh) output name."""

    def __init__(self) -> None:
        self.nodes: list = []

    def __call__(self, op: str, *inputs: str, out: str | None = None, **attributes) -> str:
        from onnx import helper

        out = out or f"{op.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attributes))
        return out

    def const(self, value, kind) -> str:
        """A scalar constant (``value`` a number) or a 1-D one (a list)."""
        from onnx import helper

        dims = [len(value)] if isinstance(value, list) else []
        values = value if isinstance(value, list) else [value]
        return self("Constant", value=helper.make_tensor("value", kind, dims, values))


# ------------------------------------------------------------------------------------------------------------------
# albumentations: SmallestMaxSize / Resize + CenterCrop, each resize a cv2.resize(INTER_LINEAR) of uint8 pixels


def _opencv_resize(g: _Nodes, height: str, width: str, size: int, resize: str, crop_pct: float) -> str:
    """The (B, size, size, 3) int32 crop of the resized photo, pixel for pixel what albumentations gives."""
    from onnx import TensorProto

    if resize == "stretch":  # A.Resize(size, size): crop_pct plays no part
        new_h = new_w = g.const(size, TensorProto.INT64)
        top = left = g.const(0, TensorProto.INT64)
    else:
        new_h, new_w = _smallest_max_size(g, height, width, int(round(size / crop_pct)))
        # A.CenterCrop: the offset (resized - crop) // 2
        two, crop = g.const(2, TensorProto.INT64), g.const(size, TensorProto.INT64)
        top, left = (g("Div", g("Sub", new, crop), two) for new in (new_h, new_w))
    # only the output pixels inside the crop are computed: OpenCV's weights depend on the output index alone
    y0, y1, b0, b1 = _opencv_taps(g, height, new_h, top, size, clamp_weights=False)
    x0, x1, a0, a1 = _opencv_taps(g, width, new_w, left, size, clamp_weights=True)
    rows = [g("Cast", g("Gather", PHOTOS, y, axis=1), to=TensorProto.INT32) for y in (y0, y1)]
    # horizontal pass (HResizeLinear): src[x0] * a0 + src[x1] * a1, exact integers on the 2^11 scale
    a0, a1 = (g("Unsqueeze", a, g.const([1], TensorProto.INT64)) for a in (a0, a1))  # (size, 1): per column
    s0, s1 = (g("Add", g("Mul", g("Gather", r, x0, axis=2), a0), g("Mul", g("Gather", r, x1, axis=2), a1))
              for r in rows)
    b0, b1 = (g("Unsqueeze", b, g.const([1, 2], TensorProto.INT64)) for b in (b0, b1))  # (size, 1, 1): per row
    return _opencv_vertical(g, s0, s1, b0, b1)


def _smallest_max_size(g: _Nodes, height: str, width: str, target: int) -> tuple[str, str]:
    """albumentations' SmallestMaxSize: ``scale = target / min(H, W)`` and ``max(1, round(side * scale))`` in
    Python floats (doubles; round half to even, as ONNX's Round)."""
    from onnx import TensorProto

    h, w = (g("Cast", side, to=TensorProto.DOUBLE) for side in (height, width))
    scale = g("Div", g.const(float(target), TensorProto.DOUBLE), g("Min", h, w))
    one = g.const(1.0, TensorProto.DOUBLE)
    return tuple(g("Cast", g("Max", g("Round", g("Mul", side, scale)), one), to=TensorProto.INT64) for side in (h, w))


def _opencv_taps(g: _Nodes, src: str, dst: str, start: str, count: int, *, clamp_weights: bool):
    """cv::hal::resize's table for one axis (``src`` pixels to ``dst``), output indices ``start`` ..
    ``start + count``: source indices (i0, i1) and int32 weights (w0, w1) summing to 2048.

    OpenCV: ``scale = 1 / (dst / src)`` (doubles), ``f = (float)((d + 0.5) * scale - 0.5)``, ``s = floor(f)``,
    ``f -= s``, weights ``cvRound((1 - f) * 2048)`` and ``cvRound(f * 2048)`` (round half to even). Along x a tap
    left of the image or on its last pixel becomes ``s`` clamped with ``f = 0`` (``clamp_weights``); along y only
    the row indices are clamped, the weights stay (two equal rows then).
    """
    from onnx import TensorProto

    def f32(v): return g.const(v, TensorProto.FLOAT)
    def f64(v): return g.const(v, TensorProto.DOUBLE)
    def i64(v): return g.const(v, TensorProto.INT64)

    n, m = (g("Cast", v, to=TensorProto.DOUBLE) for v in (src, dst))
    scale = g("Div", f64(1.0), g("Div", m, n))
    d = g("Cast", g("Range", start, g("Add", start, i64(count)), i64(1)), to=TensorProto.DOUBLE)
    f = g("Cast", g("Sub", g("Mul", g("Add", d, f64(0.5)), scale), f64(0.5)), to=TensorProto.FLOAT)
    s = g("Floor", f)
    frac = g("Sub", f, s)
    s = g("Cast", s, to=TensorProto.INT64)
    last = g("Sub", src, i64(1))
    if clamp_weights:
        left, right = g("Less", s, i64(0)), g("GreaterOrEqual", s, last)
        frac = g("Where", g("Or", left, right), f32(0.0), frac)
        s = g("Where", left, i64(0), g("Where", right, last, s))
    i0, i1 = (g("Max", g("Min", v, last), i64(0)) for v in (s, g("Add", s, i64(1))))
    w0, w1 = (g("Cast", g("Round", g("Mul", v, f32(float(INTER_RESIZE_COEF_SCALE)))), to=TensorProto.INT32)
              for v in (g("Sub", f32(1.0), frac), frac))
    return i0, i1, w0, w1


def _opencv_vertical(g: _Nodes, s0: str, s1: str, b0: str, b1: str) -> str:
    """The vertical pass of two horizontally resized rows (VResizeLinearVec_32s8u, the SIMD path cv2 takes):
    ``(((s0 >> 4) * b0 >> 16) + ((s1 >> 4) * b1 >> 16) + 2) >> 2`` saturated to 0..255 (all terms are
    non-negative, so integer division is the shift)."""
    from onnx import TensorProto

    def shr(x, bits): return g("Div", x, g.const(1 << bits, TensorProto.INT32))

    v = g("Add", shr(g("Mul", shr(s0, 4), b0), 16), shr(g("Mul", shr(s1, 4), b1), 16))
    v = shr(g("Add", v, g.const(2, TensorProto.INT32)), 2)
    return g("Max", g("Min", v, g.const(255, TensorProto.INT32)), g.const(0, TensorProto.INT32))


# ------------------------------------------------------------------------------------------------------------------
# torchvision: T.Resize (PIL, antialiased bilinear) + T.CenterCrop


def _torchvision_resize(g: _Nodes, height: str, width: str, size: int, resize: str, crop_pct: float) -> str:
    """The (B, size, size, 3) float crop on the 0-255 scale, rounded to whole levels as PIL's uint8 resize is:
    torchvision's output size and crop offsets exactly, ONNX's antialiased linear Resize for the pixels."""
    from onnx import TensorProto

    from fusionnet.config.reading import resize_target

    side = resize_target(size, crop_pct)  # floor(size / crop_pct)
    i64 = lambda v: g.const(v, TensorProto.INT64)  # noqa: E731
    if resize == "stretch":  # Resize((side, side))
        new_h = new_w = i64(side)
    else:  # Resize(side): the short side to side, the long one to int(side * long / short)
        short = g("Min", height, width)
        new_h, new_w = (g("Div", g("Mul", i64(side), v), short) for v in (height, width))
    sizes = g("Concat", g("Slice", g("Shape", PHOTOS), i64([0]), i64([1])), g("Unsqueeze", new_h, i64([0])),
              g("Unsqueeze", new_w, i64([0])), i64([3]), axis=0)
    x = g("Cast", PHOTOS, to=TensorProto.FLOAT)
    # antialiased as PIL; exclude_outside: taps outside the image dropped and the rest renormalised, as PIL does
    x = g("Resize", x, "", "", sizes, mode="linear", coordinate_transformation_mode="half_pixel", antialias=1,
          exclude_outside=1)
    x = g("Clip", g("Round", x), g.const(0.0, TensorProto.FLOAT), g.const(255.0, TensorProto.FLOAT))
    # CenterCrop: offsets int(round((resized - size) / 2)), round half to even as Python's round
    half = g.const(2.0, TensorProto.DOUBLE)
    top, left = (g("Cast", g("Round", g("Div", g("Cast", g("Sub", v, i64(size)), to=TensorProto.DOUBLE), half)),
                   to=TensorProto.INT64) for v in (new_h, new_w))
    starts = g("Concat", g("Unsqueeze", top, i64([0])), g("Unsqueeze", left, i64([0])), axis=0)
    return g("Slice", x, starts, g("Add", starts, i64([size, size])), i64([1, 2]))
