"""The box pipeline's steps, free of Triton: one request's inputs in, cells (boxes, scores, masks) out.

The core of ``<family>`` (pipeline.py wraps it for Triton's Python backend), kept free of Triton
so that the very same steps run on plain ONNX Runtime sessions too (the raw row of
``make bench-default``). ``call(stage, model, inputs, outputs)`` runs a composing model: a BLS
request when served. Steps: validate -> encoder -> prompts (given boxes, or detector + selection,
then only the detections whose centre lies in the optional ``core``) -> decoder in chunks ->
IoU filter. With ``decoder_context`` "roi" each box is decoded on an embedding window
(roi_windows.py) by ``<family>_roi_decoder``, boxes too large for every window by the full
decoder. Zero detections is an empty answer, not an error.
"""

import numpy as np

try:  # a package in the project, loose files beside model.py inside Triton
    from . import roi_windows, selection
    from .request_checks import RequestError, check, required, scalar
except ImportError:
    import roi_windows
    import selection
    from request_checks import RequestError, check, required, scalar

DEFAULT_MAX_PROMPTS = 4096  # given boxes per request; 4096 masks of 256x256 FP16 = 512 MiB answer
FP16_MAX = float(np.finfo(np.float16).max)


class BoxPipeline:
    """The pipeline of one ``family`` (its JSON dict); ``call`` reaches the composing models."""

    def __init__(self, family, call, nms_iou=0.5, max_detections=1000, max_prompts=DEFAULT_MAX_PROMPTS):
        self.family, self.call = family, call
        self.nms_iou, self.max_detections, self.max_prompts = float(nms_iou), int(max_detections), int(max_prompts)
        name = family["name"]
        self.encoder, self.detector, self.decoder = f"{name}_encoder", f"{name}_detector", f"{name}_decoder"
        self.roi_decoder = f"{name}_roi_decoder"
        size = int(family["input_size"])
        self.image_shape = (1, 3, size, size)
        self.low_res = int(family["low_res_size"])
        self.embed_size = int(family["embed_size"])
        self.chunk = max(1, int(family["decoder_chunk"]))
        self.roi = family.get("decoder_context", "full") == "roi"
        self.roi_windows = tuple(int(w) for w in family.get("roi_windows", ()))
        self.roi_margin = int(family.get("roi_margin", 0))

    def _call(self, stage, model, inputs, outputs):
        """Run a composing model; any failure becomes a RequestError naming the stage."""
        try:
            return self.call(stage, model, inputs, outputs)
        except RequestError:
            raise
        except Exception as exc:  # the call's own error type (BLS, ONNX Runtime)
            raise RequestError(str(exc), invalid_argument=False) from None

    def _detect(self, inputs, embeddings, bbox_threshold):
        """(boxes [N,4], scores [N]) chosen by the family's detector and selection rule."""
        if self.family["detector"] == "cellfinder":
            image = inputs.get("detector_image")
            if image is None:
                raise RequestError("input 'detector_image' is required when no 'boxes' are given")
            check("detector_image", image, np.float32, self.image_shape)
            logits, boxes = self._call("detector", self.detector, {"image": image}, ("pred_logits", "pred_boxes"))
            return selection.select_cellfinder(logits[0], boxes[0], self.image_shape[-1], bbox_threshold)
        scores, boxes = self._call(
            "detector", self.detector, {"image_embeddings": embeddings}, ("pred_scores", "pred_boxes")
        )
        return selection.select_lite(scores[0], boxes[0], bbox_threshold, self.nms_iou, self.max_detections)

    def _run_decoder(self, model, inputs, count):
        """(mask logits [n,1,h,w], IoU [n,1]) of one decoder call for ``count`` boxes."""
        low_res, iou = self._call("decoder", model, inputs, ("low_res_masks", "iou_predictions"))
        if low_res.shape[0] != count or iou.shape[0] != count:
            raise RequestError(f"decoder ({model}) returned {low_res.shape[0]} masks for {count} boxes", invalid_argument=False)
        return low_res, iou

    def decode(self, embeddings, boxes):
        """Mask logits [N,m,m] (FP16, the wire form) and IoU predictions [N] for N boxes.

        Full context: decoder_chunk boxes per call on the whole embedding. ROI: boxes grouped by
        window side, decoder_chunk * e / side boxes per call (64 at side 16: ~2.6 ms a box on 2 cores).
        """
        count = len(boxes)
        masks = np.empty((count, self.low_res, self.low_res), np.float16)
        ious = np.zeros((count,), np.float32)
        if self.roi:
            sides, origins = roi_windows.plan_windows(
                boxes, self.embed_size, self.image_shape[-1] // self.embed_size, self.roi_windows, self.roi_margin)
        else:
            sides, origins = np.zeros(count, np.int64), np.zeros((count, 2), np.int64)
        scale = self.low_res // self.embed_size
        for side in np.unique(sides):
            rows = np.flatnonzero(sides == side)
            step = self.chunk if side == 0 else self.chunk * max(1, self.embed_size // int(side))
            for start in range(0, len(rows), step):
                part = rows[start:start + step]
                if side == 0:
                    low_res, iou = self._run_decoder(
                        self.decoder, {"image_embeddings": embeddings, "boxes": boxes[part]}, len(part))
                    masks[part] = np.clip(low_res[:, 0], -FP16_MAX, FP16_MAX)
                else:
                    inputs = {
                        "embedding_windows": roi_windows.crop_windows(embeddings, origins[part], int(side)),
                        "window_origins": origins[part].astype(np.float32),
                        "boxes": boxes[part],
                    }
                    low_res, iou = self._run_decoder(self.roi_decoder, inputs, len(part))
                    roi_windows.paste_windows(masks, part, np.clip(low_res, -FP16_MAX, FP16_MAX), origins[part], scale, -FP16_MAX)
                ious[part] = iou[:, 0]
        return masks, ious

    def segment(self, inputs):
        """Outputs of one request (named numpy arrays) from its named inputs; RequestError on bad input."""
        image = required(inputs, "image", np.float32, self.image_shape)
        bbox_threshold = scalar(inputs, "bbox_threshold", np.float32, float(self.family["bbox_threshold"]))
        iou_threshold = scalar(inputs, "iou_threshold", np.float32, float(self.family["iou_threshold"]))
        prompts = inputs.get("boxes")
        if prompts is not None:
            check("boxes", prompts, np.float32, (-1, 4))
            if len(prompts) > self.max_prompts:
                raise RequestError(f"{len(prompts)} boxes given; at most {self.max_prompts} per request")
        core = inputs.get("core")
        if core is not None:
            core = check("core", core, np.float32, (4,))
        (embeddings,) = self._call("encoder", self.encoder, {"image": image}, ("image_embeddings",))
        if prompts is not None:
            boxes, scores = prompts, np.ones(len(prompts), np.float32)
        else:
            boxes, scores = self._detect(inputs, embeddings, bbox_threshold)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scores = np.asarray(scores, np.float32).reshape(-1)
        if core is not None and prompts is None:  # detections the client's tile does not own
            x0, y0, x1, y1 = (float(v) for v in core)
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
            boxes, scores = boxes[inside], scores[inside]
        masks, ious = self.decode(embeddings, boxes)
        keep = np.ones(len(ious), bool) if iou_threshold < 0 else ious >= iou_threshold
        return {
            "boxes": boxes[keep],
            "scores": scores[keep],
            "iou_predictions": ious[keep],
            "masks": masks if keep.all() else masks[keep],
            "prompt_index": np.flatnonzero(keep).astype(np.int32),
        }
