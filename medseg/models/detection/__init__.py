"""Detection building blocks for instance segmentation of lesions (Mask R-CNN, issue 19), written
on plain ``torch`` ops (torchvision does not import beside the CPU torch build these machines
use): box arithmetic and encoding (:mod:`.boxes`), anchors sized from the dataset's lesions
(:mod:`.anchors`), bilinear RoIAlign (:mod:`.roi_align`).

Conventions: boxes are ``(x1, y1, x2, y2)`` in **pixel-edge** coordinates of the image they were
drawn on (pixel ``(r, c)`` covers ``[c, c + 1) x [r, r + 1)``; a box holding exactly pixels
``c0..c1`` has ``x1 = c0, x2 = c1 + 1``), float32, shape ``(N, 4)``.
"""
