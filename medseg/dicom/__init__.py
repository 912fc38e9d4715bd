"""DICOM beyond reading image series (:mod:`medseg.io` reads those): the source instances of a
series on medseg's voxel grid (:mod:`.series`), DICOM Segmentation objects written with
highdicom (:mod:`.seg_writer`) and read onto an image grid (:mod:`.seg_reader`), RTSTRUCT contours
rasterised onto an image grid (:mod:`.rtstruct`), and label objects paired with the image series
they reference (:mod:`.pairing`).

Patient attributes stay inside DICOM files: a SEG copies its source's patient and study modules
(it goes back to the same patient), but nothing medseg logs or tabulates reads them.
"""
