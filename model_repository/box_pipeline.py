"""The box pipeline's steps, free of Triton: one request's inputs in, cells (boxes, scores, masks) out.

The core of ``<family>`` (pipeline.py wraps it for Triton's Python backend), kept free of Triton
so that the very same steps run on plain ONNX Runtime sessions too (the raw row of
``make bench-default``). ``call(stage, model, inputs, outputs)`` runs a composing model: a BLS
request when served. Steps: validate -> encoder -> prompts (given boxes, or detector + selection,
then only the detections whose centre lies in the optional ``core``) -> decoder in chunks ->
IoU filter. With ``tta`` 2 or 4 (cellfinder_lite only) the detector also reads the encoder's
embedding of the mirrored tile(s), one encoder call each; the views' boxes are fused
(selection.fuse_views) and the masks decoded on the tile's own embedding. With
``decoder_context`` "roi" each box is decoded on an embedding window (roi_windows.py) by
``<family>_roi_decoder``, boxes too large for every window by the full decoder. Zero detections
is an empty answer, not an error.
"""

import numpy as np

try:  # a package in the project, loose files beside model.py inside Triton
    from ..contracts import NAMES, TTA_VIEWS
    from . import roi_windows, selection
    from .request_checks import RequestError, check, required, scalar
except ImportError:
    import roi_windows
    import selection
    from contracts import NAMES, TTA_VIEWS
    from request_checks import RequestError, check, required, scalar

DEFAULT_MAX_PROMPTS = 4096  # given boxes per request; 4096 masks of 256x256 FP16 = 512 MiB answer
FP16_MAX = float(np.finfo(np.float16).max)


class BoxPipeline:
    """The pipeline of one ``family`` (a contracts.Family); ``call`` reaches the composing models."""

    def __init__(self, family, call, max_prompts=DEFAULT_MAX_PROMPTS):
        self.family, self.call, self.max_prompts = family, call, int(max_prompts)
        self.encoder, self.detector, self.decoder = family.encoder_name, family.detector_name, family.decoder_name
        self.roi_decoder = family.roi_decoder_name
        self.image_shape = (1, 3, family.input_size, family.input_size)
        self.low_res, self.embed_size = family.low_res_size, family.embed_size
        self.chunk = max(1, family.decoder_chunk)
        self.roi = family.decoder_context == "roi"

    def _call(self, stage, model, inputs, outputs):
        """Run a composing model; any failure becomes a RequestError naming the stage."""
        try:
            return self.call(stage, model, inputs, outputs)
        except RequestError:
            raise
        except Exception as exc:  # the call's own error type (BLS, ONNX Runtime)
            raise RequestError(str(exc), invalid_argument=False) from None

    def _detect(self, inputs, embeddings, bbox_threshold, tta=1):
        """(boxes [N,4], scores [N]) chosen by the family's detector and selection rule; ``tta``
        views of the tile (cellfinder_lite) fused before the threshold."""
        if self.family.detector == "cellfinder":
            image = inputs.get(NAMES.detector_image)
            if image is None:
                raise RequestError("input 'detector_image' is required when no 'boxes' are given")
            check(NAMES.detector_image, image, np.float32, self.image_shape)
            logits, boxes = self._call("detector", self.detector, {NAMES.image: image}, (NAMES.pred_logits, NAMES.pred_boxes))
            return selection.select_cellfinder(logits[0], boxes[0], self.image_shape[-1], bbox_threshold)
        if tta == 1:
            scores, boxes = self._lite_detections(embeddings, inputs[NAMES.image])
            return selection.select_lite(scores, boxes, bbox_threshold, self.family.nms_iou, self.family.max_detections)
        views = []
        for view in range(tta):
            seen, mirrored = embeddings, inputs[NAMES.image]
            if view:
                mirrored = selection.flip_view(inputs[NAMES.image], view)
                (seen,) = self._call("encoder", self.encoder, {NAMES.image: mirrored}, (NAMES.image_embeddings,))
            scores, boxes = self._lite_detections(seen, mirrored)
            kept, kept_scores = selection.select_lite(
                scores, boxes, selection.TTA_CANDIDATE_THRESHOLD, self.family.nms_iou, self.family.max_detections)
            views.append((selection.unflip_boxes(kept, view, self.image_shape[-1]), kept_scores))
        fused, fused_scores = selection.fuse_views(views)
        return selection.select_lite(fused_scores, fused, bbox_threshold, self.family.nms_iou, self.family.max_detections)

    def _lite_detections(self, embeddings, image):
        """CellFinder-lite's raw (scores [L], boxes [L,4]) on one embedding (and its tile ``image``
        when the detector reads it)."""
        inputs = {NAMES.image_embeddings: embeddings}
        if self.family.detector_reads_image:
            inputs[NAMES.image] = image
        scores, boxes = self._call("detector", self.detector, inputs, (NAMES.pred_scores, NAMES.pred_boxes))
        return scores[0], boxes[0]

    def _tta(self, inputs, prompts):
        """The request's detector views (1 when absent); INVALID_ARGUMENT outside TTA_VIEWS or with given boxes."""
        if self.family.detector != "cellfinder_lite" or NAMES.tta not in inputs:
            return 1
        views = scalar(inputs, NAMES.tta, np.int32, 1)
        if views not in TTA_VIEWS:
            raise RequestError(f"input 'tta' must be one of {', '.join(map(str, TTA_VIEWS))}, got {views}")
        if views > 1 and prompts is not None:
            raise RequestError("input 'tta' flips the detector; it does not apply with given 'boxes'")
        return views

    def _run_decoder(self, model, inputs, count):
        """(mask logits [n,1,h,w], IoU [n,1]) of one decoder call for ``count`` boxes."""
        low_res, iou = self._call("decoder", model, inputs, (NAMES.low_res_masks, NAMES.iou_predictions))
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
                boxes, self.embed_size, self.image_shape[-1] // self.embed_size, self.family.roi_windows, self.family.roi_margin)
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
                        self.decoder, {NAMES.image_embeddings: embeddings, NAMES.boxes: boxes[part]}, len(part))
                    masks[part] = np.clip(low_res[:, 0], -FP16_MAX, FP16_MAX)
                else:
                    inputs = {
                        NAMES.embedding_windows: roi_windows.crop_windows(embeddings, origins[part], int(side)),
                        NAMES.window_origins: origins[part].astype(np.float32),
                        NAMES.boxes: boxes[part],
                    }
                    low_res, iou = self._run_decoder(self.roi_decoder, inputs, len(part))
                    roi_windows.paste_windows(masks, part, np.clip(low_res, -FP16_MAX, FP16_MAX), origins[part], scale, -FP16_MAX)
                ious[part] = iou[:, 0]
        return masks, ious

    def segment(self, inputs):
        """Outputs of one request (named numpy arrays) from its named inputs; RequestError on bad input."""
        image = required(inputs, NAMES.image, np.float32, self.image_shape)
        bbox_threshold = scalar(inputs, NAMES.bbox_threshold, np.float32, self.family.bbox_threshold)
        iou_threshold = scalar(inputs, NAMES.iou_threshold, np.float32, self.family.iou_threshold)
        prompts = inputs.get(NAMES.boxes)
        if prompts is not None:
            check(NAMES.boxes, prompts, np.float32, (-1, 4))
            if len(prompts) > self.max_prompts:
                raise RequestError(f"{len(prompts)} boxes given; at most {self.max_prompts} per request")
        core = inputs.get(NAMES.core)
        if core is not None:
            core = check(NAMES.core, core, np.float32, (4,))
        tta = self._tta(inputs, prompts)
        (embeddings,) = self._call("encoder", self.encoder, {NAMES.image: image}, (NAMES.image_embeddings,))
        if prompts is not None:
            boxes, scores = prompts, np.ones(len(prompts), np.float32)
        else:
            boxes, scores = self._detect(inputs, embeddings, bbox_threshold, tta)
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
            NAMES.boxes: boxes[keep],
            NAMES.scores: scores[keep],
            NAMES.iou_predictions: ious[keep],
            NAMES.masks: masks if keep.all() else masks[keep],
            NAMES.prompt_index: np.flatnonzero(keep).astype(np.int32),
        }
