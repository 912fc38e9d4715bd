"""PACS in and out: query, retrieve and import series from an archive, store DICOM SEGs back.

Modules: :mod:`.config` (the ``pacs:`` config section, torch-free), :mod:`.credentials`
(user and password from the environment or a file, never the config), :mod:`.client` (the
:class:`~.client.PacsClient` contract, DICOMweb through ``dicomweb-client``, retries),
:mod:`.dimse` (the same contract over C-ECHO / C-FIND / C-GET / C-STORE with ``pynetdicom``),
:mod:`.ledger` (``pacs_ledger.csv``: which series were answered with which SEG),
:mod:`.transfer` (:func:`~.transfer.pull` and :func:`~.transfer.push`, used by ``medseg pacs``
and the ``pacs_pull`` / ``pacs_push`` pipeline stages). See docs/dicom.md, "PACS: query,
retrieve, store back".

Nothing is imported here: ``medseg.config`` imports :mod:`.config`, which must stay light.
"""
