"""An ONNX graph that takes a photo: the model's own reading put in front of its exported graph.

Input ``photos``: uint8 RGB, (batch, H, W, 3), any H and W (one size per batch). Inside: [0, 1] floats, the model's
resize (``shorter``: the short side to ``size / crop_pct``, then a centre crop of ``size``; ``stretch``: straight to
``size`` x ``size``) with ONNX's linear Resize (half-pixel centres as OpenCV's INTER_LINEAR, the albumentations
reader; antialiased as PIL's, the torchvision reader), then the exported model (each branch's normalisation is in
it) and a softmax. Output ``probabilities`` (batch, classes). The decoder is the caller's; decoders and resize
kernels differ a little from fusionnet's own pipeline (measured: experiments/README.md).
"""

from __future__ import annotations

PHOTOS, IMAGES, LOGITS, PROBS = "photos", "images", "logits", "probabilities"


def with_photo_input(model_bytes: bytes, *, size: int, resize: str, crop_pct: float, reader: str) -> bytes:
    """``model_bytes`` (an ONNX graph from ``images`` (B, 3, size, size) in [0, 1] to ``logits``) with the
    preprocessing in front and a softmax behind (see the module docstring)."""
    import onnx
    from onnx import TensorProto, compose, helper

    model = onnx.load_from_string(model_bytes)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    pre = helper.make_model(_preprocess_graph(size, resize, crop_pct, antialias=reader == "torchvision"),
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


def _preprocess_graph(size: int, resize: str, crop_pct: float, *, antialias: bool):
    from onnx import TensorProto, helper

    def const(name, values, kind=TensorProto.INT64):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, kind, [len(values)], values))

    # resized on the 0-255 scale and rounded to whole values, as OpenCV and PIL resize uint8 images; then [0, 1]
    nodes = [helper.make_node("Cast", [PHOTOS], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["f"], ["x"], perm=[0, 3, 1, 2]),
             helper.make_node("Shape", ["x"], ["shape"]), const("i0", [0]), const("i2", [2]), const("i4", [4]),
             helper.make_node("Slice", ["shape", "i0", "i2"], ["nc"]),
             helper.make_node("Slice", ["shape", "i2", "i4"], ["hw"])]
    resize_attrs = dict(mode="linear", coordinate_transformation_mode="half_pixel", antialias=int(antialias))
    if resize == "stretch":
        nodes += [const("ss", [size, size]), helper.make_node("Concat", ["nc", "ss"], ["sizes"], axis=0),
                  helper.make_node("Resize", ["x", "", "", "sizes"], ["cropped"], **resize_attrs)]
    else:
        target = int(round(size / crop_pct))
        nodes += [helper.make_node("Cast", ["hw"], ["hw_f"], to=TensorProto.FLOAT),
                  helper.make_node("ReduceMin", ["hw_f"], ["short"], keepdims=1),
                  const("target", [float(target)], TensorProto.FLOAT),
                  helper.make_node("Div", ["target", "short"], ["scale"]),
                  helper.make_node("Mul", ["hw_f", "scale"], ["new_f"]),
                  helper.make_node("Round", ["new_f"], ["new_r"]),
                  helper.make_node("Cast", ["new_r"], ["new_hw"], to=TensorProto.INT64),
                  helper.make_node("Concat", ["nc", "new_hw"], ["sizes"], axis=0),
                  helper.make_node("Resize", ["x", "", "", "sizes"], ["resized"], **resize_attrs),
                  const("crop", [size, size]), const("two", [2, 2]), const("axes", [2, 3]),
                  helper.make_node("Sub", ["new_hw", "crop"], ["extra"]),
                  helper.make_node("Div", ["extra", "two"], ["starts"]),
                  helper.make_node("Add", ["starts", "crop"], ["ends"]),
                  helper.make_node("Slice", ["resized", "starts", "ends", "axes"], ["cropped"])]
    scalar = dict(data_type=TensorProto.FLOAT, dims=[])
    nodes += [helper.make_node("Constant", [], ["lo"], value=helper.make_tensor("lo", vals=[0.0], **scalar)),
              helper.make_node("Constant", [], ["hi"], value=helper.make_tensor("hi", vals=[255.0], **scalar)),
              helper.make_node("Round", ["cropped"], ["whole"]),
              helper.make_node("Clip", ["whole", "lo", "hi"], ["clipped"]),
              helper.make_node("Div", ["clipped", "hi"], [IMAGES])]
    return helper.make_graph(
        nodes, "fusionnet_preprocess",
        [helper.make_tensor_value_info(PHOTOS, TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info(IMAGES, TensorProto.FLOAT, ["batch", 3, size, size])])
